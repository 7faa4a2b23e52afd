//! A scriptable mailbox server for relay tests: speaks SMTP or LMTP on 127.0.0.1:0,
//! records what it receives byte for byte, and can be told to refuse, stall or drop.
//! It stands in for Postfix/Dovecot (external systems), never for mxgate code.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Debug)]
pub struct Behaviour {
    pub lmtp: bool,
    pub greeting: String,
    pub pipelining: bool,
    pub mail_reply: String,
    /// Reply per recipient; others get `250 2.1.5 OK`.
    pub rcpt_replies: HashMap<String, String>,
    /// Wait this long before replying to RCPT for these recipients.
    pub rcpt_delays: HashMap<String, Duration>,
    pub data_reply: String,
    /// LMTP: final reply per recipient; others get `data_reply`.
    pub lmtp_replies: HashMap<String, String>,
    /// Wait this long before the final reply to DATA.
    pub data_delay: Option<Duration>,
    /// Close the connection after this many bytes of DATA content.
    pub drop_mid_data: Option<usize>,
    /// Close after the end of data instead of replying.
    pub drop_after_data: bool,
    /// Offer CHUNKING (BDAT), as Postfix does.
    pub chunking: bool,
    /// Offer STARTTLS with this server configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// After this long without a command, say `421 4.4.2` and close, as Postfix's
    /// smtpd does when its timeout expires.
    pub idle_421: Option<Duration>,
    /// Answer STARTTLS with this refusal (e.g. `454 4.7.0 TLS not available`) although
    /// it is offered, as a server with a broken certificate setup does.
    pub starttls_refusal: Option<String>,
    /// Offer SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// Answer DATA with this refusal and keep the transaction open, as Postfix does
    /// when `smtpd_data_restrictions` refuse (e.g. `reject_multi_recipient_bounce`):
    /// until RSET, another MAIL gets `503 5.5.1 Error: nested MAIL command`.
    pub data_refusal: Option<String>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            lmtp: false,
            greeting: "220 backend.test ESMTP".into(),
            pipelining: true,
            mail_reply: "250 2.1.0 Ok".into(),
            rcpt_replies: HashMap::new(),
            rcpt_delays: HashMap::new(),
            data_reply: "250 2.0.0 Ok: queued as BACKEND1".into(),
            lmtp_replies: HashMap::new(),
            data_delay: None,
            drop_mid_data: None,
            drop_after_data: false,
            chunking: false,
            tls: None,
            idle_421: None,
            starttls_refusal: None,
            smtputf8: true,
            data_refusal: None,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Received {
    pub mail_from: String,
    pub rcpts: Vec<String>,
    /// DATA content exactly as it came over the wire (dot-stuffed), without the final
    /// `.` CRLF; or the BDAT chunks, concatenated.
    pub raw: Vec<u8>,
    /// Received with BDAT (no dot-stuffing).
    pub chunked: bool,
}

impl Received {
    /// The content with dot-stuffing removed.
    pub fn content(&self) -> Vec<u8> {
        if self.chunked {
            return self.raw.clone();
        }
        let mut out = Vec::with_capacity(self.raw.len());
        for line in self.raw.split_inclusive(|&b| b == b'\n') {
            match line.strip_prefix(b".") {
                Some(rest) => out.extend_from_slice(rest),
                None => out.extend_from_slice(line),
            }
        }
        out
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.content()).into_owned()
    }
}

#[derive(Default)]
pub struct Log {
    pub messages: Vec<Received>,
    pub connections: usize,
    pub commands: Vec<String>,
    /// STARTTLS handshakes completed, with the client certificate (DER) if one was sent.
    pub tls_sessions: Vec<Option<Vec<u8>>>,
}

pub struct FakeBackend {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Log>>,
    pub behaviour: Arc<Mutex<Behaviour>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeBackend {
    pub async fn start(behaviour: Behaviour) -> FakeBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let behaviour = Arc::new(Mutex::new(behaviour));
        let (task_log, task_behaviour) = (log.clone(), behaviour.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                task_log.lock().unwrap().connections += 1;
                // Replies are written one at a time: without this, Nagle holds each
                // pipelined reply until the previous one is acknowledged.
                let _ = stream.set_nodelay(true);
                let behaviour = task_behaviour.clone();
                let log = task_log.clone();
                tokio::spawn(async move {
                    let _ = serve(Box::pin(stream), behaviour, log).await;
                });
            }
        });
        FakeBackend {
            addr,
            log,
            behaviour,
            task,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.behaviour.lock().unwrap().lmtp {
            "lmtp"
        } else {
            "smtp"
        };
        format!("{scheme}://{}", self.addr)
    }

    pub fn messages(&self) -> Vec<Received> {
        self.log.lock().unwrap().messages.clone()
    }

    pub fn commands(&self) -> Vec<String> {
        self.log.lock().unwrap().commands.clone()
    }

    pub fn connections(&self) -> usize {
        self.log.lock().unwrap().connections
    }

    /// Changes the behaviour for new connections and for the next transaction (MAIL) on
    /// connections already open, pooled ones included.
    pub fn set(&self, change: impl FnOnce(&mut Behaviour)) {
        change(&mut self.behaviour.lock().unwrap());
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An address where nothing listens.
pub async fn dead_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

async fn serve(
    mut stream: std::pin::Pin<Box<dyn Io>>,
    shared: Arc<Mutex<Behaviour>>,
    log: Arc<Mutex<Log>>,
) -> std::io::Result<()> {
    let mut b = shared.lock().unwrap().clone();
    let mut buf = Vec::new();
    let mut current = Received::default();
    // Between an accepted MAIL and the end of the transaction (as a real server: a
    // nested MAIL is refused).
    let mut in_transaction = false;
    let mut tls_active = false;
    write_line(&mut stream, &b.greeting).await?;
    if !b.greeting.starts_with("220") {
        return Ok(());
    }
    loop {
        let line = match b.idle_421 {
            None => read_line(&mut stream, &mut buf).await?,
            Some(idle) => {
                match tokio::time::timeout(idle, read_line(&mut stream, &mut buf)).await {
                    Ok(line) => line?,
                    Err(_) => {
                        write_line(
                            &mut stream,
                            "421 4.4.2 backend.test Error: timeout exceeded",
                        )
                        .await?;
                        return Ok(());
                    }
                }
            }
        };
        let Some(line) = line else {
            return Ok(());
        };
        log.lock().unwrap().commands.push(line.clone());
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("EHLO") || upper.starts_with("LHLO") {
            let mut caps = vec!["backend.test".to_string()];
            if b.pipelining {
                caps.push("PIPELINING".into());
            }
            caps.push("8BITMIME".into());
            if b.smtputf8 {
                caps.push("SMTPUTF8".into());
            }
            caps.extend(["SIZE 100000000".into(), "ENHANCEDSTATUSCODES".into()]);
            if b.chunking {
                caps.push("CHUNKING".into());
            }
            if b.tls.is_some() && !tls_active {
                caps.push("STARTTLS".into());
            }
            let last = caps.len() - 1;
            let mut out = String::new();
            for (n, cap) in caps.iter().enumerate() {
                out.push_str(&format!(
                    "250{}{cap}\r\n",
                    if n == last { ' ' } else { '-' }
                ));
            }
            stream.write_all(out.as_bytes()).await?;
        } else if upper.starts_with("MAIL FROM:") && in_transaction {
            write_line(&mut stream, "503 5.5.1 Error: nested MAIL command").await?;
        } else if upper.starts_with("MAIL FROM:") {
            let tls = b.tls.clone();
            b = Behaviour {
                tls,
                ..shared.lock().unwrap().clone()
            };
            current = Received {
                mail_from: angle(&line),
                ..Default::default()
            };
            in_transaction = b.mail_reply.starts_with('2');
            write_line(&mut stream, &b.mail_reply).await?;
        } else if upper.starts_with("RCPT TO:") {
            let rcpt = angle(&line);
            let reply = b
                .rcpt_replies
                .get(&rcpt)
                .cloned()
                .unwrap_or_else(|| "250 2.1.5 OK".into());
            if let Some(delay) = b.rcpt_delays.get(&rcpt) {
                tokio::time::sleep(*delay).await;
            }
            if reply.starts_with('2') {
                current.rcpts.push(rcpt);
            }
            write_line(&mut stream, &reply).await?;
        } else if upper == "DATA" {
            if current.rcpts.is_empty() {
                write_line(&mut stream, "554 5.5.1 no valid recipients").await?;
                continue;
            }
            if let Some(refusal) = &b.data_refusal {
                write_line(&mut stream, refusal).await?;
                continue;
            }
            in_transaction = false;
            write_line(&mut stream, "354 go ahead").await?;
            let Some(raw) = read_data(&mut stream, &mut buf, b.drop_mid_data).await? else {
                return Ok(());
            };
            current.raw = raw;
            if b.drop_after_data {
                return Ok(());
            }
            if let Some(delay) = b.data_delay {
                tokio::time::sleep(delay).await;
            }
            commit(&mut stream, &b, &log, std::mem::take(&mut current)).await?;
        } else if upper.starts_with("BDAT ") && b.chunking {
            let mut words = upper.split_whitespace().skip(1);
            let size: usize = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            let last = words.next() == Some("LAST");
            while buf.len() < size {
                if !fill(&mut stream, &mut buf).await? {
                    return Ok(());
                }
            }
            current.raw.extend(buf.drain(..size));
            current.chunked = true;
            if !last {
                write_line(&mut stream, &format!("250 2.0.0 {size} octets")).await?;
                continue;
            }
            in_transaction = false;
            if b.drop_after_data {
                return Ok(());
            }
            if let Some(delay) = b.data_delay {
                tokio::time::sleep(delay).await;
            }
            commit(&mut stream, &b, &log, std::mem::take(&mut current)).await?;
        } else if upper == "STARTTLS"
            && let Some(refusal) = b.starttls_refusal.clone()
        {
            write_line(&mut stream, &refusal).await?;
        } else if upper == "STARTTLS" && b.tls.is_some() && !tls_active {
            write_line(&mut stream, "220 2.0.0 Ready to start TLS").await?;
            buf.clear();
            let acceptor = tokio_rustls::TlsAcceptor::from(b.tls.clone().unwrap());
            let tls = acceptor.accept(stream).await?;
            let client_cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .map(|c| c.as_ref().to_vec());
            log.lock().unwrap().tls_sessions.push(client_cert);
            stream = Box::pin(tls);
            tls_active = true;
        } else if upper == "RSET" {
            current = Received::default();
            in_transaction = false;
            write_line(&mut stream, "250 2.0.0 Ok").await?;
        } else if upper == "NOOP" {
            write_line(&mut stream, "250 2.0.0 Ok").await?;
        } else if upper == "QUIT" {
            write_line(&mut stream, "221 2.0.0 Bye").await?;
            return Ok(());
        } else {
            write_line(&mut stream, "502 5.5.2 unexpected command").await?;
            panic!("fake backend got an unexpected command: {line:?}");
        }
    }
}

/// Records the message, then answers: a real server commits before it replies, so a
/// test that saw the reply finds the message recorded.
async fn commit<S: AsyncWrite + Unpin + ?Sized>(
    stream: &mut S,
    b: &Behaviour,
    log: &Arc<Mutex<Log>>,
    message: Received,
) -> std::io::Result<()> {
    let rcpts = message.rcpts.clone();
    log.lock().unwrap().messages.push(message);
    if b.lmtp {
        for rcpt in &rcpts {
            let reply = b
                .lmtp_replies
                .get(rcpt)
                .cloned()
                .unwrap_or_else(|| b.data_reply.clone());
            write_line(stream, &reply).await?;
        }
        Ok(())
    } else {
        write_line(stream, &b.data_reply).await
    }
}

fn angle(line: &str) -> String {
    let start = line.find('<').map_or(0, |p| p + 1);
    let end = line[start..].find('>').map_or(line.len(), |p| start + p);
    line[start..end].to_string()
}

async fn write_line<S: AsyncWrite + Unpin + ?Sized>(
    stream: &mut S,
    line: &str,
) -> std::io::Result<()> {
    stream.write_all(format!("{line}\r\n").as_bytes()).await?;
    stream.flush().await
}

async fn fill<S: AsyncRead + Unpin + ?Sized>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> std::io::Result<bool> {
    let mut chunk = [0u8; 16384];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

async fn read_line<S: AsyncRead + Unpin + ?Sized>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<String>> {
    loop {
        if let Some(pos) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..pos]).into_owned();
            buf.drain(..pos + 2);
            return Ok(Some(line));
        }
        if !fill(stream, buf).await? {
            return Ok(None);
        }
    }
}

/// Reads DATA content up to the strict `CRLF.CRLF` terminator.
async fn read_data<S: AsyncRead + Unpin + ?Sized>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    drop_after: Option<usize>,
) -> std::io::Result<Option<Vec<u8>>> {
    loop {
        if let Some(limit) = drop_after
            && buf.len() >= limit
        {
            return Ok(None);
        }
        // The content may be empty, in which case the terminator is just ".\r\n".
        if buf.starts_with(b".\r\n") {
            buf.drain(..3);
            return Ok(Some(Vec::new()));
        }
        if let Some(pos) = buf.windows(5).position(|w| w == b"\r\n.\r\n") {
            let raw = buf[..pos + 2].to_vec();
            buf.drain(..pos + 5);
            return Ok(Some(raw));
        }
        if !fill(stream, buf).await? {
            return Ok(None);
        }
    }
}

/// A STARTTLS server configuration for a fake backend, with a fresh self-signed
/// certificate for `backend.test`; `client_ca` (a PEM certificate) makes it ask for and
/// verify a client certificate signed by it (or equal to it).
pub fn tls_config(client_ca: Option<&str>) -> (Arc<rustls::ServerConfig>, String) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certified = rcgen::generate_simple_self_signed(vec!["backend.test".into()]).unwrap();
    let cert = CertificateDer::from(certified.cert.der().to_vec());
    let key =
        PrivateKeyDer::from_pem_slice(certified.signing_key.serialize_pem().as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(cert.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    (
        Arc::new(builder.with_single_cert(vec![cert], key).unwrap()),
        certified.cert.pem(),
    )
}
