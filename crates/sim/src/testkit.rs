//! What the agent's and the controller's test suites both need, written once: bounded waits,
//! reading back everything a program left on disk, and the secret scan over logs, files and
//! stored rows.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often [`wait_for`] asks again.
const POLL: Duration = Duration::from_millis(25);

/// Polls `cond` until it holds; panics naming `what` once `limit` has passed. Runs on
/// tokio's clock, so a test with paused time advances through it.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Every file under `dir` with its bytes as lossy text (for secret scans).
pub fn all_bytes_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push((p, String::from_utf8_lossy(&bytes).into_owned()));
            }
        }
    }
    out
}

/// The first place a secret shows up: `"<what> in <where>: <line>"`. `secrets` are
/// `(what, value)`; `places` are `(where, text)`, searched line by line. An empty secret is
/// a broken test, not a clean result, so it is reported too.
pub fn first_leak<'a>(
    secrets: &[(String, String)],
    places: impl IntoIterator<Item = (String, &'a str)>,
) -> Option<String> {
    if let Some((what, _)) = secrets.iter().find(|(_, v)| v.is_empty()) {
        return Some(format!("{what} is empty: the scan would find nothing"));
    }
    for (place, text) in places {
        for line in text.lines() {
            if let Some((what, _)) = secrets.iter().find(|(_, v)| line.contains(v.as_str())) {
                return Some(format!("{what} in {place}: {line}"));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leak_is_named_with_its_place_and_line() {
        let secrets = vec![("the token".to_owned(), "s3cr3t".to_owned())];
        let clean = [("log".to_owned(), "a\nb")];
        assert_eq!(first_leak(&secrets, clean), None);
        let leaky = [("log".to_owned(), "a\ntoken=s3cr3t\n")];
        assert_eq!(
            first_leak(&secrets, leaky).as_deref(),
            Some("the token in log: token=s3cr3t")
        );
        let empty = vec![("nothing".to_owned(), String::new())];
        assert!(first_leak(&empty, []).is_some_and(|m| m.contains("is empty")));
    }

    #[test]
    fn every_file_under_a_dir_is_read() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join("sub"))?;
        std::fs::write(dir.path().join("a"), "one")?;
        std::fs::write(dir.path().join("sub/b"), [0xff, b'x'])?;
        let mut got: Vec<String> = all_bytes_under(dir.path())
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        got.sort();
        assert_eq!(got, ["one", "\u{fffd}x"]);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_when_the_condition_holds() {
        let mut n = 0;
        wait_for("three polls", Duration::from_secs(1), || {
            n += 1;
            let done = n >= 3;
            async move { done }
        })
        .await;
        assert_eq!(n, 3);
    }
}
