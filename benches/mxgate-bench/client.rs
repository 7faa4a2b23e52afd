//! One client SMTP session of the load generator: connect, EHLO, optional STARTTLS,
//! pipelined transactions, QUIT.

use crate::{HELO_NAME, HOSTNAME};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

#[derive(Clone)]
pub struct ClientTls {
    connector: tokio_rustls::TlsConnector,
    name: rustls_pki_types::ServerName<'static>,
}

/// Trusts the gateway's generated development certificate, for `mx.example.test`.
pub fn client_tls(cert: &Path) -> Result<ClientTls, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read {}: {e}", cert.display()))?
    {
        let cert = cert.map_err(|e| format!("bad certificate: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("bad certificate: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every handshake a full one: with one message per connection, resumed sessions
    // would measure a cheaper handshake than a first contact makes.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(ClientTls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        name: rustls_pki_types::ServerName::try_from(HOSTNAME.to_string())
            .map_err(|e| e.to_string())?,
    })
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

fn protocol_error(text: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, text)
}

/// One client SMTP session.
pub struct Client {
    io: Stream,
    buf: Vec<u8>,
    pos: usize,
}

impl Client {
    /// Connects, reads the greeting, says EHLO, and with `tls` does STARTTLS and EHLO
    /// again.
    pub async fn open(target: SocketAddr, tls: Option<&ClientTls>) -> io::Result<Client> {
        let tcp = TcpStream::connect(target).await?;
        tcp.set_nodelay(true)?;
        let mut client = Client {
            io: Stream::Plain(tcp),
            buf: Vec::with_capacity(4096),
            pos: 0,
        };
        client.expect(220, "greeting").await?;
        let ehlo = format!("EHLO {HELO_NAME}\r\n");
        client.command(ehlo.as_bytes(), 250).await?;
        if let Some(tls) = tls {
            client.command(b"STARTTLS\r\n", 220).await?;
            let Stream::Plain(tcp) = client.io else {
                unreachable!("TLS already active");
            };
            let stream = tls.connector.connect(tls.name.clone(), tcp).await?;
            client = Client {
                io: Stream::Tls(Box::new(stream)),
                buf: Vec::with_capacity(4096),
                pos: 0,
            };
            client.command(ehlo.as_bytes(), 250).await?;
        }
        Ok(client)
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    async fn command(&mut self, line: &[u8], want: u16) -> io::Result<()> {
        self.send(line).await?;
        let what = String::from_utf8_lossy(line).trim().to_string();
        self.expect(want, &what).await
    }

    async fn expect(&mut self, want: u16, what: &str) -> io::Result<()> {
        let code = self.reply().await?;
        if code != want {
            return Err(protocol_error(format!("{what}: got {code}, want {want}")));
        }
        Ok(())
    }

    /// Reads one complete (possibly multi-line) reply; returns its code.
    async fn reply(&mut self) -> io::Result<u16> {
        loop {
            while let Some(nl) = memchr::memchr(b'\n', &self.buf[self.pos..]) {
                let line = &self.buf[self.pos..self.pos + nl + 1];
                self.pos += nl + 1;
                let code = line
                    .get(..3)
                    .and_then(|c| std::str::from_utf8(c).ok())
                    .and_then(|c| c.parse::<u16>().ok())
                    .ok_or_else(|| {
                        protocol_error(format!(
                            "bad reply line {:?}",
                            String::from_utf8_lossy(line)
                        ))
                    })?;
                if line.get(3) != Some(&b'-') {
                    if self.pos == self.buf.len() {
                        self.buf.clear();
                        self.pos = 0;
                    }
                    return Ok(code);
                }
            }
            if self.pos == self.buf.len() {
                self.buf.clear();
                self.pos = 0;
            }
            if self.buf.len() > 64 * 1024 {
                return Err(protocol_error("reply too long".into()));
            }
            self.buf.reserve(4096);
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// One pipelined transaction: MAIL, RCPT and DATA in one write, the three replies,
    /// then the content and the final reply. Returns every reply code.
    pub async fn transaction(&mut self, commands: &[u8], message: &[u8]) -> io::Result<[u16; 4]> {
        self.send(commands).await?;
        let mail = self.reply().await?;
        let rcpt = self.reply().await?;
        let data = self.reply().await?;
        if data != 354 {
            self.send(b"RSET\r\n").await?;
            self.reply().await?;
            return Ok([mail, rcpt, data, 0]);
        }
        self.send(message).await?;
        let done = self.reply().await?;
        Ok([mail, rcpt, data, done])
    }

    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            self.send(b"QUIT\r\n").await?;
            self.reply().await?;
            self.io.shutdown().await
        })
        .await;
    }
}
