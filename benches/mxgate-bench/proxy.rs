//! The relay ceiling: a TCP proxy that only copies bytes, run where the gateway runs.
//!
//! On one machine the load generator, the sink and whatever sits between them share the
//! same cores. Anything in-line between client and sink pays, per message, for the
//! reads and writes of both of its sides at least, even if it understands nothing of
//! SMTP. This proxy does exactly that and nothing more (no parsing, no headers, no
//! checks), so its messages/s are the most any in-line relay can reach in the same run:
//! the figure the gateway's ratio is to be read against.
//!
//! It runs as its own process, as the gateway does (the bench binary started again with
//! the hidden `--proxy-to ADDR`), on a tokio runtime with as many workers as the
//! gateway's, with TCP_NODELAY on both sides as the gateway sets it.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// The line the child prints once it listens.
const LISTENING: &str = "listening proxy ";

/// The child's side: listens on 127.0.0.1:0, prints the address, then forwards every
/// connection to `target` until killed.
pub fn serve(target: SocketAddr) -> ! {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let mut stdout = std::io::stdout();
        let _ = writeln!(stdout, "{LISTENING}{addr}");
        let _ = stdout.flush();
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (mut client, mut server) = (client, server);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    })
}

/// The parent's side: the proxy process, killed when dropped.
pub struct Proxy {
    child: Child,
    pub pid: i32,
    pub addr: SocketAddr,
}

impl Proxy {
    pub fn spawn(target: SocketAddr) -> Result<Proxy, String> {
        let exe = std::env::current_exe().map_err(|e| format!("bench executable: {e}"))?;
        let mut child = Command::new(&exe)
            .arg("--proxy-to")
            .arg(target.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the proxy ({}): {e}", exe.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut lines = std::io::BufReader::new(stdout).lines();
            let addr = lines
                .by_ref()
                .map_while(Result::ok)
                .find_map(|line| line.strip_prefix(LISTENING)?.trim().parse().ok());
            let _ = tx.send(addr);
            for _ in lines {}
        });
        let pid = child.id() as i32;
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(addr)) => Ok(Proxy { child, pid, addr }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                Err("the proxy did not report its address".into())
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
