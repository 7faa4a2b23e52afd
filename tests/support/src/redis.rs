//! A private `redis-server` (Debian's package) for a test: a free loopback port, its own
//! temporary directory, no persistence. It can be stopped and started again on the same
//! port (a store that goes away and comes back); dropping it stops it.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// With TLS (see [`Self::start_tls`]): its certificate (PEM) and password.
    tls: Option<(std::path::PathBuf, String)>,
}

impl RedisServer {
    /// `None` (after `support::skip`) when `redis-server` is not installed.
    pub fn start() -> Option<RedisServer> {
        RedisServer::start_with(None)
    }

    /// TLS only (no plain port), a self-signed certificate for 127.0.0.1 (see
    /// [`Self::certificate`]) and a password.
    pub fn start_tls(password: &str) -> Option<RedisServer> {
        RedisServer::start_with(Some(password))
    }

    fn start_with(password: Option<&str>) -> Option<RedisServer> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            super::skip("redis-server is not installed (Debian package redis-server)");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = RedisServer {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            tls: None,
        };
        if let Some(password) = password {
            let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
            let cert = server.dir.path().join("redis.crt");
            std::fs::write(&cert, certified.cert.pem()).unwrap();
            std::fs::write(
                server.dir.path().join("redis.key"),
                certified.signing_key.serialize_pem(),
            )
            .unwrap();
            server.tls = Some((cert, password.to_string()));
        }
        server.resume();
        Some(server)
    }

    pub fn url(&self) -> String {
        match &self.tls {
            None => format!("redis://{}/0", self.addr),
            Some((_, password)) => format!("rediss://:{password}@{}/0", self.addr),
        }
    }

    /// The TLS server's certificate, to trust (PEM).
    pub fn certificate(&self) -> Option<&std::path::Path> {
        self.tls.as_ref().map(|(cert, _)| cert.as_path())
    }

    /// Starts the server (again) on its port and waits until it accepts connections.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let port = self.addr.port().to_string();
        let mut command = Command::new("redis-server");
        command.args(["--bind", "127.0.0.1"]);
        match &self.tls {
            None => command.args(["--port", &port]),
            Some((cert, password)) => command
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(self.dir.path().join("redis.key"))
                .args(["--requirepass", password]),
        };
        let child = command
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(["--enable-debug-command", "local"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(self.addr).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Makes the (plain) server answer nobody for `seconds` (`DEBUG SLEEP`): a store
    /// that is slow, not gone. Returns at once.
    pub fn pause(&self, seconds: u32) {
        use std::io::{Read, Write};
        let mut tcp = TcpStream::connect(self.addr).unwrap();
        tcp.write_all(format!("DEBUG SLEEP {seconds}\r\n").as_bytes())
            .unwrap();
        std::thread::spawn(move || {
            let mut reply = [0u8; 16];
            let _ = tcp.read(&mut reply);
        });
    }

    /// Kills the server (SIGKILL: no goodbye to its clients) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
