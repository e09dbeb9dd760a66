//! A real headless Chromium (Debian's `chromium` package) driven over the DevTools protocol:
//! the page is really loaded, its script really runs, its form is really posted.
//!
//! Chromium is required: when it is missing the test fails and says what to install (CI
//! installs it in `.ci/run`); it is never silently skipped.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long one DevTools command or page condition may take.
const WAIT: Duration = Duration::from_secs(20);

/// A Chromium process with one page (tab), killed when dropped.
pub struct Browser {
    child: tokio::process::Child,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Every DevTools event received so far (`Network.requestWillBeSent`, ...).
    pub events: Vec<Value>,
    _profile: tempfile::TempDir,
}

/// The Chromium binary: `FLOWGATE_TEST_CHROMIUM`, else `chromium` or `chromium-browser` on
/// the `PATH`.
fn chromium() -> PathBuf {
    if let Ok(path) = std::env::var("FLOWGATE_TEST_CHROMIUM") {
        return path.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "the usage page tests need a headless Chromium and none was found: \
         install Debian's package (apt-get install -y chromium; .ci/run does) \
         or set FLOWGATE_TEST_CHROMIUM to its path"
    );
}

impl Browser {
    /// Starts Chromium headless with a fresh profile and attaches to its page.
    pub async fn launch() -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let log = std::fs::File::create(profile.path().join("chromium.log")).expect("log file");
        let child = tokio::process::Command::new(chromium())
            .args([
                "--headless",
                // Root (CI, containers) cannot use Chromium's sandbox.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--force-device-scale-factor=1",
                "--window-size=1280,800",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("chromium does not start: {e}"));
        // Chromium writes the port it chose into the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let mut port = None;
        for _ in 0..200 {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                if let Some(p) = text
                    .lines()
                    .next()
                    .and_then(|l| l.trim().parse::<u16>().ok())
                {
                    port = Some(p);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log =
            || std::fs::read_to_string(profile.path().join("chromium.log")).unwrap_or_default();
        let port =
            port.unwrap_or_else(|| panic!("chromium wrote no DevTools port; its log:\n{}", log()));
        let targets: Value = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
            .await
            .expect("DevTools answers")
            .json()
            .await
            .expect("DevTools target list");
        let page = targets
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap_or_else(|| panic!("no page target: {targets}"))
            .to_owned();
        let (ws, _) = tokio_tungstenite::connect_async(page)
            .await
            .expect("DevTools websocket");
        let mut browser = Browser {
            child,
            ws,
            next_id: 1,
            events: Vec::new(),
            _profile: profile,
        };
        browser.call("Page.enable", json!({})).await;
        browser.call("Network.enable", json!({})).await;
        browser.call("Runtime.enable", json!({})).await;
        browser
    }

    /// Sends a DevTools command and returns its result; a protocol error fails the test.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let message = json!({ "id": id, "method": method, "params": params }).to_string();
        self.ws
            .send(Message::text(message))
            .await
            .expect("DevTools send");
        let answer = tokio::time::timeout(WAIT, async {
            loop {
                let message = self
                    .ws
                    .next()
                    .await
                    .expect("DevTools closed")
                    .expect("DevTools read");
                let Message::Text(text) = message else {
                    continue;
                };
                let value: Value = serde_json::from_str(&text).expect("DevTools JSON");
                if value["id"] == id {
                    return value;
                }
                if value.get("method").is_some() {
                    self.events.push(value);
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("DevTools did not answer {method} in {WAIT:?}"));
        if let Some(error) = answer.get("error") {
            panic!("DevTools {method} failed: {error}");
        }
        answer["result"].clone()
    }

    /// Loads `url` and waits for its load event.
    pub async fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")
            .await;
    }

    /// The value of a JavaScript expression in the page (promises awaited); an exception fails
    /// the test.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Waits until `condition` (JavaScript) is true in the page, checking every 100 ms.
    pub async fn wait_for(&mut self, condition: &str) {
        let guarded = format!(
            "(() => {{ try {{ return !!({condition}); }} catch (e) {{ return false; }} }})()"
        );
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if self.eval(&guarded).await == json!(true) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let body = self
                    .eval("document.body ? document.body.innerText : ''")
                    .await;
                panic!("the page never satisfied `{condition}` in {WAIT:?}; it shows:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every URL the page requested so far (from `Network.requestWillBeSent`).
    pub async fn requested_urls(&mut self) -> Vec<String> {
        // A round trip collects the events sent before it.
        self.eval("1").await;
        self.events
            .iter()
            .filter(|e| e["method"] == "Network.requestWillBeSent")
            .filter_map(|e| e["params"]["request"]["url"].as_str().map(str::to_owned))
            .collect()
    }

    /// A PNG of the viewport at `width`×`height` CSS pixels (one device pixel each).
    pub async fn screenshot(&mut self, width: u32, height: u32, mobile: bool) -> Vec<u8> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile }),
        )
        .await;
        // Let the layout settle at the new size.
        self.eval("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
            .await;
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("screenshot base64")
    }

    /// Closes Chromium.
    pub async fn close(mut self) {
        let _ = self
            .ws
            .send(Message::text(
                json!({ "id": 0, "method": "Browser.close", "params": {} }).to_string(),
            ))
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}
