//! A raw SMTP client for scripted conversations: exact bytes out, whole replies in.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// The enhanced status code of the first line, e.g. "5.7.1".
    pub fn status(&self) -> &str {
        self.lines
            .first()
            .and_then(|l| l.split_whitespace().next())
            .filter(|s| s.chars().next().is_some_and(|c| c.is_ascii_digit()) && s.contains('.'))
            .unwrap_or("")
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" | "))
    }
}

pub struct SmtpClient {
    io: Pin<Box<dyn Io>>,
    buf: Vec<u8>,
}

const WAIT: Duration = Duration::from_secs(15);

impl SmtpClient {
    /// Connects and reads the greeting.
    pub async fn connect(addr: SocketAddr) -> (SmtpClient, Reply) {
        let tcp = TcpStream::connect(addr).await.expect("connect to gateway");
        SmtpClient::start(tcp).await
    }

    /// Connects from a chosen loopback address (any of 127.0.0.0/8 works on Linux; IPv6
    /// ones must be on `lo`, see `net::source_address`), so tests can play senders at
    /// different IPs.
    pub async fn connect_from(addr: SocketAddr, source: &str) -> (SmtpClient, Reply) {
        let source: std::net::IpAddr = source.parse().unwrap();
        let socket = if source.is_ipv6() {
            tokio::net::TcpSocket::new_v6().unwrap()
        } else {
            tokio::net::TcpSocket::new_v4().unwrap()
        };
        socket
            .bind(SocketAddr::new(source, 0))
            .expect("bind source address");
        let tcp = socket.connect(addr).await.expect("connect to gateway");
        SmtpClient::start(tcp).await
    }

    /// Connects, sends `preamble` at once (a load balancer's PROXY header), then reads
    /// the greeting.
    pub async fn connect_with_preamble(addr: SocketAddr, preamble: &[u8]) -> (SmtpClient, Reply) {
        let mut tcp = TcpStream::connect(addr).await.expect("connect to gateway");
        tcp.write_all(preamble).await.expect("write preamble");
        SmtpClient::start(tcp).await
    }

    /// Like `connect_from`, for clients that retry: `None` when the connection fails or
    /// closes before a greeting.
    pub async fn try_connect_from(addr: SocketAddr, source: &str) -> Option<(SmtpClient, Reply)> {
        let socket = tokio::net::TcpSocket::new_v4().ok()?;
        socket.bind(SocketAddr::new(source.parse().ok()?, 0)).ok()?;
        let tcp = tokio::time::timeout(WAIT, socket.connect(addr))
            .await
            .ok()?
            .ok()?;
        tcp.set_nodelay(true).ok();
        let mut client = SmtpClient {
            io: Box::pin(tcp),
            buf: Vec::new(),
        };
        let greeting = client.try_read_reply().await?;
        Some((client, greeting))
    }

    /// Sends `line` + CRLF and reads one reply; `None` when the connection broke.
    pub async fn try_cmd(&mut self, line: &str) -> Option<Reply> {
        if !self.try_send(format!("{line}\r\n").as_bytes()).await {
            return None;
        }
        self.try_read_reply().await
    }

    /// `false` when the connection broke.
    pub async fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.io.write_all(bytes).await.is_ok() && self.io.flush().await.is_ok()
    }

    async fn start(tcp: TcpStream) -> (SmtpClient, Reply) {
        tcp.set_nodelay(true).ok();
        let mut client = SmtpClient {
            io: Box::pin(tcp),
            buf: Vec::new(),
        };
        let greeting = client.read_reply().await;
        (client, greeting)
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.expect("write to gateway");
        self.io.flush().await.expect("flush");
    }

    /// Sends `line` + CRLF and reads one reply.
    pub async fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.read_reply().await
    }

    /// Reads one complete (possibly multi-line) reply; panics on EOF or timeout.
    pub async fn read_reply(&mut self) -> Reply {
        self.try_read_reply()
            .await
            .unwrap_or_else(|| panic!("connection closed while waiting for a reply"))
    }

    /// `None` when the connection closed before a full reply arrived.
    pub async fn try_read_reply(&mut self) -> Option<Reply> {
        let mut lines = Vec::new();
        loop {
            let line = self.read_line().await?;
            assert!(line.len() >= 3, "short reply line {line:?}");
            let code: u16 = line[..3]
                .parse()
                .unwrap_or_else(|_| panic!("bad reply line {line:?}"));
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line.get(4..).unwrap_or("").to_string());
            if last {
                return Some(Reply { code, lines });
            }
        }
    }

    async fn read_line(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..pos]).into_owned();
                self.buf.drain(..pos + 2);
                return Some(line);
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, self.io.read(&mut chunk))
                .await
                .expect("timed out waiting for the gateway")
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// True when the server closed the connection (EOF) within the wait.
    pub async fn is_closed(&mut self) -> bool {
        let mut chunk = [0u8; 256];
        match tokio::time::timeout(WAIT, self.io.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(n)) => panic!(
                "expected close, got {:?}",
                String::from_utf8_lossy(&chunk[..n])
            ),
            Err(_) => false,
        }
    }

    /// Bytes received but not yet consumed as a reply.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Upgrades to TLS, verifying the server certificate against `ca` for `name`.
    pub async fn starttls(self, ca: &Path, name: &str) -> (SmtpClient, TlsSummary) {
        self.starttls_with(client_config(ca), name).await
    }

    /// Upgrades to TLS with a client configuration of the caller's (versions, say).
    pub async fn starttls_with(
        self,
        config: Arc<rustls::ClientConfig>,
        name: &str,
    ) -> (SmtpClient, TlsSummary) {
        let SmtpClient { io, buf } = self;
        assert!(
            buf.is_empty(),
            "plaintext left in the buffer before TLS: {buf:?}"
        );
        let connector = tokio_rustls::TlsConnector::from(config);
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let tls = tokio::time::timeout(WAIT, connector.connect(server_name, io))
            .await
            .expect("TLS handshake timed out")
            .expect("TLS handshake");
        let (_, conn) = tls.get_ref();
        let summary = TlsSummary {
            version: conn
                .protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default(),
            peer_certificate: conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.as_ref().to_vec())
                .unwrap_or_default(),
        };
        (
            SmtpClient {
                io: Box::pin(tls),
                buf: Vec::new(),
            },
            summary,
        )
    }

    /// A whole transaction, one command at a time. Returns the final reply.
    pub async fn send_mail(&mut self, from: &str, rcpts: &[&str], data: &str) -> Reply {
        let reply = self.cmd(&format!("MAIL FROM:<{from}>")).await;
        if reply.code != 250 {
            return reply;
        }
        for rcpt in rcpts {
            let reply = self.cmd(&format!("RCPT TO:<{rcpt}>")).await;
            assert_eq!(reply.code, 250, "RCPT {rcpt}: {reply}");
        }
        let reply = self.cmd("DATA").await;
        assert_eq!(reply.code, 354, "DATA: {reply}");
        let mut body = super::crlf(data);
        if !body.ends_with("\r\n") {
            body.push_str("\r\n");
        }
        body.push_str(".\r\n");
        self.send(body.as_bytes()).await;
        self.read_reply().await
    }
}

pub struct TlsSummary {
    pub version: String,
    pub peer_certificate: Vec<u8>,
}

pub fn client_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    client_config_versions(ca, rustls::DEFAULT_VERSIONS)
}

/// A client that trusts `ca` and speaks only `versions`.
pub fn client_config_versions(
    ca: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read CA") {
        roots.add(cert.expect("CA PEM")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}
