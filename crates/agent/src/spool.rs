//! The on-disk event spool: every event is written here (and fsynced) before it is sent, and
//! removed only when the controller has acknowledged it. After a restart or an outage the
//! remaining events are sent again, in order. Bounded: past `max_events` new events are
//! refused (and logged) rather than growing without limit; events already spooled are never
//! dropped. Heartbeats are never spooled.

use miglet_proto::json::EventBody;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SpoolError {
    #[error("spool I/O failed at {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the spool holds {0} events, its limit; the event was not recorded")]
    Full(usize),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One spooled event.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub seq: u64,
    pub body: EventBody,
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    next: u64,
    max_events: usize,
}

impl Spool {
    /// Opens (creating) the spool in `dir`.
    pub fn open(dir: &Path, max_events: usize) -> Result<Spool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut s = Spool {
            dir: dir.to_owned(),
            next: 1,
            max_events,
        };
        s.next = s.seqs()?.last().map_or(1, |l| l + 1);
        Ok(s)
    }

    fn seqs(&self) -> Result<Vec<u64>, SpoolError> {
        let mut v: Vec<u64> = std::fs::read_dir(&self.dir)
            .map_err(io(&self.dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".json").and_then(|n| n.parse().ok())
            })
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.json"))
    }

    /// Durably appends an event.
    pub fn push(&mut self, body: &EventBody) -> Result<u64, SpoolError> {
        let count = self.len()?;
        if count >= self.max_events {
            return Err(SpoolError::Full(count));
        }
        let seq = self.next;
        let tmp = self.dir.join(format!(".{seq}.tmp"));
        let bytes = serde_json::to_vec(body).map_err(|e| SpoolError::Io {
            path: tmp.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        {
            let mut f = File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&bytes).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        let path = self.path(seq);
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        self.next += 1;
        Ok(seq)
    }

    /// The oldest spooled event. A file that does not parse (a torn write cannot happen, but
    /// a hand edit can) is moved to `rejected/` so it cannot block the queue.
    pub fn first(&self) -> Result<Option<Entry>, SpoolError> {
        for seq in self.seqs()? {
            let path = self.path(seq);
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            match serde_json::from_slice(&bytes) {
                Ok(body) => return Ok(Some(Entry { seq, body })),
                Err(_) => self.reject(seq)?,
            }
        }
        Ok(None)
    }

    /// Removes an acknowledged event.
    pub fn remove(&self, seq: u64) -> Result<(), SpoolError> {
        let path = self.path(seq);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Moves an event the controller refuses for good out of the queue (kept for inspection).
    pub fn reject(&self, seq: u64) -> Result<(), SpoolError> {
        let dir = self.dir.join("rejected");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let from = self.path(seq);
        std::fs::rename(&from, dir.join(format!("{seq:020}.json"))).map_err(io(&from))
    }

    pub fn len(&self) -> Result<usize, SpoolError> {
        Ok(self.seqs()?.len())
    }

    pub fn is_empty(&self) -> Result<bool, SpoolError> {
        Ok(self.len()? == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: &str) -> EventBody {
        EventBody {
            event_type: t.into(),
            timestamp: None,
            vm_id: Some("vm".into()),
            pool_id: None,
            org_id: None,
            metadata: None,
            event_id: Some(format!("id-{t}")),
            boot_id: None,
            fields: Default::default(),
        }
    }

    #[test]
    fn order_survives_reopen_and_acks_remove() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut s = Spool::open(dir.path(), 10)?;
        let a = s.push(&ev("a"))?;
        s.push(&ev("b"))?;
        drop(s);
        let mut s = Spool::open(dir.path(), 10)?;
        assert_eq!(s.first()?.map(|e| e.body.event_type), Some("a".into()));
        s.remove(a)?;
        s.push(&ev("c"))?;
        assert_eq!(s.first()?.map(|e| e.body.event_type), Some("b".into()));
        assert_eq!(s.len()?, 2);
        Ok(())
    }

    #[test]
    fn bounded_and_garbage_is_set_aside() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut s = Spool::open(dir.path(), 2)?;
        s.push(&ev("a"))?;
        s.push(&ev("b"))?;
        assert!(matches!(s.push(&ev("c")), Err(SpoolError::Full(2))));
        std::fs::write(dir.path().join(format!("{:020}.json", 0)), b"{not json")?;
        assert_eq!(s.first()?.map(|e| e.body.event_type), Some("a".into()));
        assert!(
            dir.path()
                .join("rejected")
                .join(format!("{:020}.json", 0))
                .exists()
        );
        Ok(())
    }
}
