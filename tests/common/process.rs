//! `flowgate serve` as a child process: the real binary, its real signal handling.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;
// Waits for real processes and servers: tokio's clock (clippy.toml keeps std's out).
use tokio::time::Instant;

/// A gateway running as a child process.
pub struct ChildGateway {
    child: Child,
    /// `http://127.0.0.1:port`.
    pub base: String,
    log: PathBuf,
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl ChildGateway {
    /// Starts `flowgate serve` with `config` (its `__LISTEN__` replaced by a free loopback
    /// address), written to `dir`, and waits until `/readyz` answers 200.
    pub async fn start(dir: &Path, name: &str, config: &str) -> ChildGateway {
        let port = free_port();
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            config.replace("__LISTEN__", &format!("127.0.0.1:{port}")),
        )
        .expect("write config");
        let log = dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_flowgate"))
            .args(["serve", "--config"])
            .arg(&path)
            .env("FLOWGATE_LOG", "info")
            .env_remove("FLOWGATE_STORE_URL")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn flowgate");
        let gateway = ChildGateway {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        gateway.wait_ready().await;
        gateway
    }

    async fn wait_ready(&self) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(r) = http.get(format!("{}/readyz", self.base)).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("flowgate did not become ready; its log:\n{}", self.log());
    }

    /// What the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` (a `kill` signal name: TERM, INT, KILL) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit (at most `timeout`) and returns how it exited.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "flowgate did not exit within {timeout:?}; its log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait(Duration::from_secs(30)).await
    }
}

impl Drop for ChildGateway {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
