//! One SMTP or LMTP client connection to a backend: connect, greeting, EHLO/LHLO,
//! STARTTLS, commands and replies, each wait under its own RFC 5321 deadline.
//!
//! Reply parsing is smtp-proto's. This module knows nothing about pools or failover.

use super::{BackendReply, Cause, RelayError, RelaySettings};
use crate::config::RelayTls;
use smtp_proto::response::parser::ResponseReceiver;
use smtp_proto::{EXT_8BIT_MIME, EXT_CHUNKING, EXT_PIPELINING, EXT_SMTP_UTF8, EXT_START_TLS};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

/// What the backend's EHLO/LHLO reply offered.
#[derive(Clone, Copy, Debug, Default)]
pub struct Capabilities {
    pub pipelining: bool,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub starttls: bool,
    pub chunking: bool,
    pub size: Option<u64>,
}

pub enum Stream {
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

pub struct ClientConn {
    stream: Stream,
    rbuf: Vec<u8>,
    rpos: usize,
    pub caps: Capabilities,
    pub lmtp: bool,
    /// Set when the connection is known to be unusable (timeout, protocol error).
    pub broken: bool,
    pub idle_since: Instant,
}

impl ClientConn {
    /// Connects, reads the greeting, says EHLO/LHLO and negotiates STARTTLS as configured.
    /// A 4xx/5xx greeting is an error, so the caller can fail over.
    pub async fn open(
        host: &str,
        port: u16,
        lmtp: bool,
        settings: &RelaySettings,
    ) -> Result<ClientConn, RelayError> {
        let conn = Self::open_plain(host, port, lmtp, settings).await?;
        let want_tls = match settings.tls_mode {
            RelayTls::Off => false,
            RelayTls::Opportunistic => conn.caps.starttls,
            RelayTls::Required => true,
        };
        if !want_tls {
            return Ok(conn);
        }
        if !conn.caps.starttls {
            return Err(RelayError::Tls("backend does not offer STARTTLS".into()));
        }
        match conn.start_tls(host, settings).await {
            Ok(mut conn) => {
                conn.hello(settings).await?;
                Ok(conn)
            }
            // Opportunistic means TLS when it works (Postfix's `may`): a refused
            // STARTTLS or a failed handshake is delivered in plaintext, on a new
            // connection, rather than deferring every message while it lasts.
            Err(err @ (RelayError::Tls(_) | RelayError::Timeout("TLS handshake")))
                if settings.tls_mode == RelayTls::Opportunistic =>
            {
                tracing::warn!(backend = %format!("{host}:{port}"), error = %err, "STARTTLS to the backend failed; relaying in plaintext (relay.tls: opportunistic)");
                Self::open_plain(host, port, lmtp, settings).await
            }
            Err(err) => Err(err),
        }
    }

    /// Connects, reads the greeting and says EHLO/LHLO.
    async fn open_plain(
        host: &str,
        port: u16,
        lmtp: bool,
        settings: &RelaySettings,
    ) -> Result<ClientConn, RelayError> {
        let t = &settings.timeouts;
        let tcp = match timeout(t.connect, TcpStream::connect((host, port))).await {
            Err(_) => return Err(RelayError::Timeout("connect")),
            Ok(Err(err)) => return Err(RelayError::Connect(Cause::of(err))),
            Ok(Ok(tcp)) => tcp,
        };
        let _ = tcp.set_nodelay(true);
        let mut conn = ClientConn {
            stream: Stream::Plain(tcp),
            rbuf: Vec::with_capacity(1024),
            rpos: 0,
            caps: Capabilities::default(),
            lmtp,
            broken: false,
            idle_since: Instant::now(),
        };
        let greeting = conn.read_reply(t.greeting).await?;
        if greeting.code != 220 {
            return Err(RelayError::Refused(greeting));
        }
        conn.hello(settings).await?;
        Ok(conn)
    }

    async fn hello(&mut self, settings: &RelaySettings) -> Result<(), RelayError> {
        let verb = if self.lmtp { "LHLO" } else { "EHLO" };
        let line = format!("{verb} {}\r\n", settings.helo);
        self.write_all(line.as_bytes(), settings.timeouts.mail)
            .await?;
        let reply = self.read_reply(settings.timeouts.mail).await?;
        if reply.code != 250 {
            return Err(RelayError::Refused(reply));
        }
        self.caps = parse_capabilities(&reply);
        Ok(())
    }

    async fn start_tls(
        mut self,
        host: &str,
        settings: &RelaySettings,
    ) -> Result<ClientConn, RelayError> {
        self.write_all(b"STARTTLS\r\n", settings.timeouts.mail)
            .await?;
        let reply = self.read_reply(settings.timeouts.mail).await?;
        if reply.code != 220 {
            return Err(RelayError::Tls(
                format!("STARTTLS refused: {}", reply.summary()).into(),
            ));
        }
        // Anything the server sent after 220 is not trusted (the mirror image of the
        // CVE-2011-0411 rule on our side): drop it.
        self.rbuf.clear();
        self.rpos = 0;
        let Stream::Plain(tcp) = self.stream else {
            return Err(RelayError::Tls("TLS already active".into()));
        };
        let name = settings
            .server_name
            .clone()
            .unwrap_or_else(|| host.to_string());
        let server_name =
            crate::tls::server_name(&name).map_err(|err| RelayError::Tls(err.into()))?;
        let connector = tokio_rustls::TlsConnector::from(settings.client_tls.clone());
        let tls = match timeout(
            settings.timeouts.greeting,
            connector.connect(server_name, tcp),
        )
        .await
        {
            Err(_) => return Err(RelayError::Timeout("TLS handshake")),
            Ok(Err(err)) => return Err(RelayError::Tls(Cause::of(err))),
            Ok(Ok(tls)) => tls,
        };
        Ok(ClientConn {
            stream: Stream::Tls(Box::new(tls)),
            rbuf: Vec::with_capacity(1024),
            rpos: 0,
            caps: Capabilities::default(),
            lmtp: self.lmtp,
            broken: false,
            idle_since: Instant::now(),
        })
    }

    pub async fn write_all(&mut self, bytes: &[u8], limit: Duration) -> Result<(), RelayError> {
        self.usable()?;
        let result = timeout(limit, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await;
        match result {
            Err(_) => {
                self.broken = true;
                Err(RelayError::Timeout("write"))
            }
            Ok(Err(err)) => {
                self.broken = true;
                Err(RelayError::Lost(Cause::of(err)))
            }
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Reads one complete reply (all continuation lines). A 421 is an error.
    pub async fn read_reply(&mut self, limit: Duration) -> Result<BackendReply, RelayError> {
        self.usable()?;
        let deadline = Instant::now() + limit;
        let mut receiver = ResponseReceiver::default();
        loop {
            if self.rpos < self.rbuf.len() {
                let available = &self.rbuf[self.rpos..];
                let mut iter = available.iter();
                let result = receiver.parse(&mut iter);
                self.rpos += available.len() - iter.len();
                match result {
                    Ok(response) => {
                        if self.rpos == self.rbuf.len() {
                            self.rbuf.clear();
                            self.rpos = 0;
                        }
                        let reply = BackendReply::from_response(response);
                        if reply.code == 421 {
                            // The backend is closing the channel (RFC 5321 section 3.8),
                            // whatever command this answers: nothing more is sent on it,
                            // and the reply is never passed on as ours.
                            self.broken = true;
                            return Err(RelayError::Closing(reply));
                        }
                        return Ok(reply);
                    }
                    Err(smtp_proto::Error::NeedsMoreData { .. }) => {}
                    Err(err) => {
                        self.broken = true;
                        return Err(RelayError::Protocol(Cause::of(err)));
                    }
                }
            }
            if self.rpos == self.rbuf.len() {
                self.rbuf.clear();
                self.rpos = 0;
            }
            if self.rbuf.len() > 64 * 1024 {
                self.broken = true;
                return Err(RelayError::Protocol("reply too long".into()));
            }
            self.rbuf.reserve(4096);
            let read =
                tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.rbuf)).await;
            match read {
                Err(_) => {
                    self.broken = true;
                    return Err(RelayError::Timeout("reply"));
                }
                Ok(Err(err)) => {
                    self.broken = true;
                    return Err(RelayError::Lost(Cause::of(err)));
                }
                Ok(Ok(0)) => {
                    self.broken = true;
                    return Err(RelayError::Lost("backend closed the connection".into()));
                }
                Ok(Ok(_)) => {}
            }
        }
    }

    /// After a timeout or a protocol error the replies may be out of step with the
    /// commands (a late reply would answer the next one): nothing more is sent or read.
    fn usable(&self) -> Result<(), RelayError> {
        if self.broken {
            return Err(RelayError::Lost(
                "connection unusable after an earlier error".into(),
            ));
        }
        Ok(())
    }

    /// Sends a command line and reads its reply.
    pub async fn command(
        &mut self,
        line: &[u8],
        limit: Duration,
    ) -> Result<BackendReply, RelayError> {
        self.write_all(line, limit).await?;
        self.read_reply(limit).await
    }

    /// Gracefully ends the session; errors do not matter any more.
    pub async fn quit(mut self) {
        let _ = timeout(Duration::from_secs(2), async {
            let _ = self.stream.write_all(b"QUIT\r\n").await;
            let _ = self.stream.flush().await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

fn parse_capabilities(reply: &BackendReply) -> Capabilities {
    // smtp-proto parses the EHLO reply from its wire form; rebuild it from the lines.
    let mut wire = Vec::new();
    let last = reply.lines.len().saturating_sub(1);
    for (n, line) in reply.lines.iter().enumerate() {
        wire.extend_from_slice(b"250");
        wire.push(if n == last { b' ' } else { b'-' });
        wire.extend_from_slice(line.as_bytes());
        wire.extend_from_slice(b"\r\n");
    }
    let mut caps = Capabilities::default();
    if let Ok(ehlo) = smtp_proto::EhloResponse::parse(&mut wire.iter()) {
        caps.pipelining = ehlo.has_capability(EXT_PIPELINING);
        caps.eight_bit_mime = ehlo.has_capability(EXT_8BIT_MIME);
        caps.smtputf8 = ehlo.has_capability(EXT_SMTP_UTF8);
        caps.starttls = ehlo.has_capability(EXT_START_TLS);
        caps.chunking = ehlo.has_capability(EXT_CHUNKING);
        caps.size = (ehlo.size > 0).then_some(ehlo.size as u64);
    }
    caps
}

#[cfg(test)]
mod tests {
    use super::*;
    use smtp_proto::response::parser::ResponseReceiver;

    #[test]
    fn capabilities_from_an_ehlo_reply() {
        let wire = b"250-backend.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-SIZE 100000000\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250 STARTTLS\r\n";
        let response = ResponseReceiver::default().parse(&mut wire.iter()).unwrap();
        let reply = BackendReply::from_response(response);
        let caps = parse_capabilities(&reply);
        assert!(
            caps.pipelining
                && caps.eight_bit_mime
                && caps.smtputf8
                && caps.chunking
                && caps.starttls,
            "{caps:?} from {reply:?}"
        );
        assert_eq!(caps.size, Some(100_000_000));
    }
}
