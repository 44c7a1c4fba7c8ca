//! Whole-VM health figures for heartbeats: CPU from `/proc/stat` (busy share since the last
//! sample), memory from `/proc/meminfo` (used = total - available), disk from `statvfs("/")`.

use miglet_proto::event::HealthFigures;

#[derive(Debug, Default)]
pub struct Sampler {
    last: Option<(u64, u64)>,
}

/// (busy, total) jiffies of the `cpu` line.
fn cpu_times(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 4 {
        return None;
    }
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    // guest and guest_nice are already counted in user and nice.
    let total: u64 = v.iter().take(8).sum();
    Some((total.saturating_sub(idle), total))
}

fn meminfo(text: &str) -> Option<(i64, i64)> {
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<i64>().ok())
            .map(|kb| kb * 1024)
    };
    let total = field("MemTotal:")?;
    let avail = field("MemAvailable:")?;
    Some((total - avail, total))
}

impl Sampler {
    pub fn sample(&mut self) -> HealthFigures {
        let mut h = HealthFigures::default();
        if let Some((busy, total)) = std::fs::read_to_string("/proc/stat")
            .ok()
            .as_deref()
            .and_then(cpu_times)
        {
            if let Some((b0, t0)) = self.last {
                let dt = total.saturating_sub(t0);
                if dt > 0 {
                    h.cpu_percent = Some(busy.saturating_sub(b0) as f64 * 100.0 / dt as f64);
                }
            }
            self.last = Some((busy, total));
        }
        if let Some((used, total)) = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .as_deref()
            .and_then(meminfo)
        {
            h.memory_used_bytes = Some(used);
            h.memory_total_bytes = Some(total);
        }
        if let Ok(st) = nix::sys::statvfs::statvfs("/") {
            let frag = st.fragment_size() as i64;
            let total = st.blocks() as i64 * frag;
            let free = st.blocks_free() as i64 * frag;
            h.disk_total_bytes = Some(total);
            h.disk_used_bytes = Some(total - free);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_formats() {
        assert_eq!(
            cpu_times("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n"),
            Some((150, 1000))
        );
        assert_eq!(
            meminfo("MemTotal:       1000 kB\nMemFree: 10 kB\nMemAvailable:    250 kB\n"),
            Some((750 * 1024, 1000 * 1024))
        );
    }

    #[test]
    fn samples_this_machine() {
        let mut s = Sampler::default();
        let _ = s.sample();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let h = s.sample();
        assert!(
            h.cpu_percent.is_some_and(|c| (0.0..=100.0).contains(&c)),
            "{h:?}"
        );
        assert!(h.memory_total_bytes.unwrap_or(0) > 0 && h.disk_total_bytes.unwrap_or(0) > 0);
    }
}
