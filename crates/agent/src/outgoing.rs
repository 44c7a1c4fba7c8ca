//! The events waiting for the controller, in the order they happened: in the fsynced
//! [`Spool`] and, only while the spool refuses writes (disk full, read-only, at its bound),
//! in memory behind it. An event is never dropped because the disk failed: it waits in
//! memory (the agent then takes no new job, see `Input::SpoolUnusable`) and goes back to disk
//! as soon as the disk takes it again. Only a process death while events sit in memory can
//! lose them, which is why the agent stops taking work as soon as that can happen.

use crate::spool::{Spool, SpoolError};
use miglet_proto::json::EventBody;
use std::collections::VecDeque;

/// Events kept in memory at most; past it the oldest is dropped (and logged). With no new
/// job taken, a VM produces a handful of events more, so this is a safety bound only.
pub const MAX_IN_MEMORY: usize = 10_000;

/// Where a queued event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Disk(u64),
    Memory(u64),
}

/// The oldest event waiting.
#[derive(Debug, Clone, PartialEq)]
pub struct Next {
    pub key: Key,
    pub body: EventBody,
}

/// How [`Outgoing::push`] kept an event.
#[derive(Debug)]
pub enum Kept {
    /// On disk: it survives a restart.
    OnDisk,
    /// In memory, because the disk refused it (the error says why).
    InMemory(SpoolError),
}

#[derive(Debug)]
pub struct Outgoing {
    spool: Spool,
    memory: VecDeque<(u64, EventBody)>,
    next_memory: u64,
    /// Events dropped because memory was full too (logged by the caller).
    pub dropped: u64,
}

impl Outgoing {
    pub fn new(spool: Spool) -> Outgoing {
        Outgoing {
            spool,
            memory: VecDeque::new(),
            next_memory: 1,
            dropped: 0,
        }
    }

    /// Queues `body` behind everything queued: on disk if the disk takes it (and takes
    /// everything waiting in memory first, so the order holds), else in memory.
    pub fn push(&mut self, body: EventBody) -> Kept {
        if let Err(e) = self.settle() {
            self.keep_in_memory(body);
            return Kept::InMemory(e);
        }
        match self.spool.push(&body) {
            Ok(_) => Kept::OnDisk,
            Err(e) => {
                self.keep_in_memory(body);
                Kept::InMemory(e)
            }
        }
    }

    fn keep_in_memory(&mut self, body: EventBody) {
        if self.memory.len() >= MAX_IN_MEMORY {
            self.memory.pop_front();
            self.dropped += 1;
        }
        self.memory.push_back((self.next_memory, body));
        self.next_memory += 1;
    }

    /// Moves events waiting in memory to disk, oldest first, while the disk takes them.
    /// `Ok(n)`: all of them are on disk now (`n` moved); `Err`: the disk still refuses.
    pub fn settle(&mut self) -> Result<usize, SpoolError> {
        let mut moved = 0;
        while let Some((_, body)) = self.memory.front() {
            self.spool.push(body)?;
            self.memory.pop_front();
            moved += 1;
        }
        Ok(moved)
    }

    /// The oldest event waiting: on disk first (memory only ever holds newer ones).
    pub fn first(&mut self) -> Result<Option<Next>, SpoolError> {
        if let Some(e) = self.spool.first()? {
            return Ok(Some(Next {
                key: Key::Disk(e.seq),
                body: e.body,
            }));
        }
        Ok(self.memory.front().map(|(id, body)| Next {
            key: Key::Memory(*id),
            body: body.clone(),
        }))
    }

    /// Removes a delivered event.
    pub fn remove(&mut self, key: Key) -> Result<(), SpoolError> {
        match key {
            Key::Disk(seq) => self.spool.remove(seq),
            Key::Memory(id) => {
                self.memory.retain(|(i, _)| *i != id);
                Ok(())
            }
        }
    }

    /// Sets aside an event the controller refuses for good (on disk, for inspection).
    pub fn reject(&mut self, key: Key) -> Result<(), SpoolError> {
        match key {
            Key::Disk(seq) => self.spool.reject(seq),
            Key::Memory(id) => {
                self.memory.retain(|(i, _)| *i != id);
                Ok(())
            }
        }
    }

    /// Events waiting, on disk and in memory.
    pub fn len(&self) -> usize {
        self.spool.len().unwrap_or(0) + self.memory.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Events waiting in memory only.
    pub fn in_memory(&self) -> usize {
        self.memory.len()
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

    fn drain(o: &mut Outgoing) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(Some(n)) = o.first() {
            out.push(n.body.event_type.clone());
            let _ = o.remove(n.key);
        }
        out
    }

    #[test]
    fn a_full_spool_keeps_events_in_memory_in_order_and_hands_them_back_to_disk()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut o = Outgoing::new(Spool::open(dir.path(), 2)?);
        assert!(matches!(o.push(ev("a")), Kept::OnDisk));
        assert!(matches!(o.push(ev("b")), Kept::OnDisk));
        assert!(matches!(
            o.push(ev("c")),
            Kept::InMemory(SpoolError::Full(2))
        ));
        assert!(matches!(o.push(ev("d")), Kept::InMemory(_)));
        assert_eq!((o.len(), o.in_memory()), (4, 2));
        // The controller takes the first two; the disk has room again: memory goes back.
        let a = o.first()?.ok_or("a")?;
        o.remove(a.key)?;
        let b = o.first()?.ok_or("b")?;
        o.remove(b.key)?;
        assert_eq!(o.settle()?, 2);
        assert_eq!(o.in_memory(), 0);
        assert!(
            matches!(o.push(ev("e")), Kept::InMemory(_)),
            "disk full again"
        );
        assert_eq!(drain(&mut o), ["c", "d", "e"]);
        Ok(())
    }

    #[test]
    fn an_unwritable_spool_loses_nothing() -> Result<(), Box<dyn std::error::Error>> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let spool_dir = dir.path().join("spool");
        let mut o = Outgoing::new(Spool::open(&spool_dir, 100)?);
        assert!(matches!(o.push(ev("a")), Kept::OnDisk));
        std::fs::set_permissions(&spool_dir, std::fs::Permissions::from_mode(0o500))?;
        let writable = std::fs::write(spool_dir.join("probe"), b"x").is_ok();
        let _ = std::fs::remove_file(spool_dir.join("probe"));
        if !writable {
            assert!(matches!(
                o.push(ev("b")),
                Kept::InMemory(SpoolError::Io { .. })
            ));
        } else {
            // Running as root: permissions do not bind; the memory path is covered above.
            assert!(matches!(o.push(ev("b")), Kept::OnDisk));
        }
        std::fs::set_permissions(&spool_dir, std::fs::Permissions::from_mode(0o700))?;
        assert!(matches!(o.push(ev("c")), Kept::OnDisk));
        assert_eq!(drain(&mut o), ["a", "b", "c"]);
        Ok(())
    }
}
