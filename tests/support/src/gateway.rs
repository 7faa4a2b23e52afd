//! Starting mxgate for a test: in-process (fast, port 0) or as a real process (for
//! signals). Each gateway gets its own temporary directory with config, certificate and
//! Maildir.

// kill(2) to our own child.
#![allow(unsafe_code)]

use super::client::{Reply, SmtpClient};
use mxgate::app::Running;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

#[derive(Clone)]
pub struct TestConfig {
    pub hostname: String,
    pub domains: Vec<String>,
    pub trusted: Vec<String>,
    /// Backend URLs; empty means the gateway's own Maildir in the temp dir.
    pub backends: Vec<String>,
    pub tls: bool,
    pub require_tls: bool,
    /// Extra lines inside `server:` (indented by the caller with two spaces).
    pub server_extra: String,
    /// Extra top-level YAML.
    pub extra: String,
}

impl Default for TestConfig {
    fn default() -> Self {
        TestConfig {
            hostname: "mx.example.test".into(),
            domains: vec!["example.test".into()],
            trusted: vec![],
            backends: vec![],
            tls: true,
            require_tls: false,
            server_extra: String::new(),
            extra: String::new(),
        }
    }
}

impl TestConfig {
    pub fn yaml(&self, dir: &std::path::Path) -> String {
        let list = |items: &[String]| {
            items
                .iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let backends = if self.backends.is_empty() {
            vec![format!("maildir:{}", dir.join("mail").display())]
        } else {
            self.backends.clone()
        };
        let mut yaml = format!(
            "server:\n  hostname: {}\n  listen: [\"127.0.0.1:0\"]\n  domains: [{}]\n  trusted_networks: [{}]\n{}",
            self.hostname,
            list(&self.domains),
            list(&self.trusted),
            self.server_extra
        );
        if !self.server_extra.contains("timeouts:") {
            // Tests leave transactions open; do not wait the production grace period.
            yaml.push_str("  timeouts:\n    shutdown_grace: 1s\n");
        }
        if self.tls {
            yaml.push_str(&format!(
                "tls:\n  certificate: cert.pem\n  private_key: key.pem\n  require: {}\n  generate_if_missing: true\n  reload_interval: 200ms\n",
                self.require_tls
            ));
        }
        yaml.push_str("backend:\n");
        for backend in backends {
            yaml.push_str(&format!("  - \"{backend}\"\n"));
        }
        yaml.push_str(&self.extra);
        yaml
    }
}

pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub smtp: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub running: Option<Running>,
}

impl Gateway {
    pub async fn start(config: TestConfig) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let yaml = config.yaml(dir.path());
        Gateway::start_yaml(dir, &yaml).await
    }

    /// Starts with the given YAML written to `dir/mxgate.yaml`.
    pub async fn start_yaml(dir: tempfile::TempDir, yaml: &str) -> Gateway {
        super::init_logging();
        let config_path = dir.path().join("mxgate.yaml");
        std::fs::write(&config_path, yaml).unwrap();
        let (loaded, _) = mxgate::config::load(&config_path).unwrap_or_else(|errors| {
            panic!(
                "test config invalid:\n{}",
                errors
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        let running = mxgate::app::start(&config_path, loaded)
            .await
            .unwrap_or_else(|errors| panic!("gateway did not start: {errors:?}"));
        Gateway {
            smtp: running.smtp[0],
            metrics: running.metrics,
            running: Some(running),
            config_path,
            dir,
        }
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    pub fn maildir(&self) -> PathBuf {
        self.dir.path().join("mail")
    }

    /// Messages delivered into the gateway's own Maildir, oldest first.
    pub fn delivered(&self) -> Vec<String> {
        read_maildir(&self.maildir())
    }

    /// Connects and checks the greeting.
    pub async fn connect(&self) -> SmtpClient {
        let (client, greeting) = SmtpClient::connect(self.smtp).await;
        assert_eq!(greeting.code, 220, "greeting: {greeting}");
        client
    }

    /// Connects and says EHLO; returns the client and the EHLO reply.
    pub async fn ehlo(&self) -> (SmtpClient, Reply) {
        let mut client = self.connect().await;
        let reply = client.cmd("EHLO client.example.net").await;
        assert_eq!(reply.code, 250, "EHLO: {reply}");
        (client, reply)
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
    }
}

pub fn read_maildir(root: &std::path::Path) -> Vec<String> {
    let mut names: Vec<_> = match std::fs::read_dir(root.join("new")) {
        Ok(entries) => entries.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
        Err(_) => return Vec::new(),
    };
    names.sort_by_key(|path| delivery_order(path));
    names
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}

/// Maildir names start `<seconds>.` and carry `M<microseconds>` unpadded (mxgate's and
/// Postfix's alike), so a plain string sort misorders two deliveries in one second.
fn delivery_order(path: &std::path::Path) -> (u64, u64, String) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut parts = name.split('.');
    let seconds = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let micros = parts
        .next()
        .and_then(|unique| unique.split_once('M'))
        .map(|(_, rest)| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|digits| digits.parse().ok())
        .unwrap_or(0);
    (seconds, micros, name)
}

/// mxgate as a real process (for SIGTERM, SIGHUP and kill -9 tests).
pub struct GatewayProcess {
    pub child: Child,
    pub smtp: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl GatewayProcess {
    pub fn spawn(config_path: &std::path::Path) -> GatewayProcess {
        GatewayProcess::spawn_with_env(config_path, &[])
    }

    /// Like [`Self::spawn`], with extra environment variables (e.g. `SSL_CERT_FILE`).
    pub fn spawn_with_env(config_path: &std::path::Path, env: &[(&str, &str)]) -> GatewayProcess {
        let mut child = Command::new(crate::mxgate_binary())
            .arg("serve")
            .arg("--config")
            .arg(config_path)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mxgate");
        let stderr_text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = stderr_text.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut text = sink.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut smtp = None;
        let mut metrics = None;
        while let Some(Ok(line)) = lines.next() {
            if let Some(addr) = line.strip_prefix("listening smtp ") {
                smtp.get_or_insert(addr.parse().unwrap());
            } else if let Some(addr) = line.strip_prefix("listening metrics ") {
                metrics = Some(addr.parse().unwrap());
            } else if line == "ready" {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        let smtp = smtp
            .unwrap_or_else(|| panic!("mxgate did not start:\n{}", stderr_text.lock().unwrap()));
        GatewayProcess {
            child,
            smtp,
            metrics,
            stderr: stderr_text,
        }
    }

    pub fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    pub fn wait(&mut self, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
