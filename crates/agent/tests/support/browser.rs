//! The dashboard in headless Chromium (Debian's `chromium` and `chromium-driver`, driven over
//! WebDriver by fantoccini). The dashboard re-renders on live updates, so an element found a
//! moment ago may be gone: [`fresh`] finds it again (a few times, bounded) when the browser
//! says it went stale. Screenshots go to `target/screenshots/`.

use super::*;
use fantoccini::{Client, Locator};

/// Debian's chromedriver and chromium, if installed.
fn chromedriver() -> Option<(PathBuf, PathBuf)> {
    let driver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())?;
    let browser = ["/usr/bin/chromium", "/usr/lib/chromium/chromium"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())?;
    Some((driver, browser))
}

/// A browser session and its driver process (killed when dropped).
pub struct Browser {
    pub c: Client,
    driver: tokio::process::Child,
}

/// Where screenshots go (created).
pub fn screenshots() -> std::io::Result<PathBuf> {
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots");
    std::fs::create_dir_all(&shots)?;
    Ok(shots)
}

impl Browser {
    /// A headless browser, or `None` (said on stderr) where Chromium is not installed; CI
    /// must have it.
    pub async fn open() -> Result<Option<Browser>, Box<dyn std::error::Error + Send + Sync>> {
        let Some((driver, browser)) = chromedriver() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must install chromium and chromium-driver (see .ci/run)"
            );
            eprintln!(
                "SKIPPED: chromium / chromedriver not installed (apt-get install chromium chromium-driver)"
            );
            return Ok(None);
        };
        // Port 0: chromedriver picks a free port and says which.
        let mut child = tokio::process::Command::new(&driver)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let port = {
            use tokio::io::AsyncBufReadExt;
            let out = child.stdout.take().ok_or("chromedriver stdout")?;
            let mut lines = tokio::io::BufReader::new(out).lines();
            let read = async {
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(p) = line
                        .split("started successfully on port ")
                        .nth(1)
                        .and_then(|p| p.trim_end_matches('.').trim().parse::<u16>().ok())
                    {
                        return Some(p);
                    }
                }
                None
            };
            tokio::time::timeout(Duration::from_secs(20), read)
                .await
                .ok()
                .flatten()
                .ok_or("chromedriver did not say its port")?
        };
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": browser,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"],
            }),
        );
        let webdriver = format!("http://127.0.0.1:{port}");
        for _ in 0..50 {
            let mut b = fantoccini::ClientBuilder::new(
                hyper_util::client::legacy::connect::HttpConnector::new(),
            );
            if let Ok(c) = b.capabilities(caps.clone()).connect(&webdriver).await {
                return Ok(Some(Browser { c, driver: child }));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err("chromedriver did not start".into())
    }

    /// Opens the dashboard at `base` and signs in with `token`.
    pub async fn sign_in(
        &self,
        base: &str,
        token: &str,
    ) -> Result<(), fantoccini::error::CmdError> {
        self.c.goto(&format!("{base}/dashboard/")).await?;
        self.c
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css("#token"))
            .await?
            .send_keys(token.trim())
            .await?;
        self.c
            .find(Locator::Css("#login button[type=submit]"))
            .await?
            .click()
            .await
    }

    pub async fn close(mut self) {
        let _ = self.c.clone().close().await;
        let _ = self.driver.kill().await;
    }
}

fn stale(e: &fantoccini::error::CmdError) -> bool {
    e.to_string().contains("stale element")
}

/// Finds `at` (waiting up to 20 s) and does `act` on it, finding it again (up to 10 times)
/// while the browser says the element went stale.
pub async fn fresh<T, F, Fut>(
    c: &Client,
    at: Locator<'_>,
    act: F,
) -> Result<T, fantoccini::error::CmdError>
where
    F: Fn(fantoccini::elements::Element) -> Fut,
    Fut: std::future::Future<Output = Result<T, fantoccini::error::CmdError>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        let found = c
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(at)
            .await?;
        match act(found).await {
            Err(e) if stale(&e) && tries < 10 => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => return other,
        }
    }
}

pub async fn fresh_text(
    c: &Client,
    at: Locator<'_>,
) -> Result<String, fantoccini::error::CmdError> {
    fresh(c, at, |e| async move { e.text().await }).await
}

pub async fn fresh_click(c: &Client, at: Locator<'_>) -> Result<(), fantoccini::error::CmdError> {
    fresh(c, at, |e| async move { e.click().await.map(|_| ()) }).await
}

/// The text and labels of every chart on the page (bounded wait: up to `limit`, re-read
/// every 500 ms) until `ok` holds for them; the last read if it never does.
pub async fn charts_until(
    c: &Client,
    limit: Duration,
    ok: impl Fn(&str) -> bool,
) -> Result<(bool, String), fantoccini::error::CmdError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut labels = String::new();
        for chart in c.find_all(Locator::Css("svg.chart")).await? {
            labels.push_str(&chart.text().await.unwrap_or_default());
            labels.push_str(
                &chart
                    .attr("aria-label")
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_default(),
            );
            labels.push('\n');
        }
        if ok(&labels) {
            return Ok((true, labels));
        }
        if tokio::time::Instant::now() > deadline {
            return Ok((false, labels));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
