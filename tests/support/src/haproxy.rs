//! HAProxy (Debian's package) as the load balancer in front of mxgate instances: TCP
//! mode, `send-proxy-v2` to each server, SMTP health checks (which HAProxy sends with a
//! PROXY v2 `LOCAL` header), retries and redispatch when a server dies. Started in the
//! foreground (`-db`) with its own config in a temporary directory; killed on drop.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Haproxy {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// Starts HAProxy on a free port in front of `servers`. `None` (a skip) when
    /// HAProxy is not installed.
    pub fn start(servers: &[SocketAddr]) -> Option<Haproxy> {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut config = format!(
            "global\n    maxconn 500\n\
             defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 30s\n    timeout server 30s\n    retries 3\n    option redispatch\n\
             frontend smtp\n    bind {addr}\n    default_backend mx\n\
             backend mx\n    balance roundrobin\n    option smtpchk EHLO haproxy.test\n"
        );
        for (n, server) in servers.iter().enumerate() {
            config.push_str(&format!(
                "    server mx{n} {server} send-proxy-v2 check inter 200ms fall 1 rise 1\n"
            ));
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let spawned = Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                super::skip("haproxy not installed (apt-get install haproxy)");
                return None;
            }
            Err(e) => panic!("run haproxy: {e}"),
        };
        let log = Arc::new(Mutex::new(String::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let sink = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut text = sink.lock().unwrap();
                    text.push_str(&line);
                    text.push('\n');
                }
            });
        }
        let haproxy = Haproxy {
            child,
            addr,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen on {addr}:\n{}",
                haproxy.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(haproxy)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
