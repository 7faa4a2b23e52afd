//! The backend transaction: the in-line half of every message.
//!
//! A transaction opens at the client's first accepted RCPT (so mail rejected earlier
//! never costs a backend connection), sends MAIL and that RCPT together when the backend
//! pipelines, passes each recipient's reply through, and at end of data sends the
//! message. The client's final reply is built from the backend's (see `pipeline`). There
//! is no queue: anything uncertain becomes a [`RelayError`], which becomes a 4xx.
//!
//! Backends are tried in order; a backend that cannot be connected to, or greets with
//! 4xx/5xx, or fails STARTTLS when TLS is required, is skipped for the next one.

mod client;
mod maildir;
mod message;
pub mod metrics;
mod pool;

pub use client::Capabilities;
pub use message::OutboundMessage;

use crate::config::{BackendSpec, RelayTimeouts, RelayTls};
use crate::smtp::reply::{Reply, Status};
use pool::{Lease, Pool};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// Compiled relay settings shared by all backends of a snapshot.
pub struct RelaySettings {
    pub helo: String,
    pub tls_mode: RelayTls,
    pub client_tls: Arc<rustls::ClientConfig>,
    pub server_name: Option<String>,
    pub timeouts: RelayTimeouts,
    pub max_connections: usize,
    pub pool_wait: Duration,
    pub idle_timeout: Duration,
}

/// A reply from the backend, kept verbatim (code, enhanced status, lines).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendReply {
    pub code: u16,
    pub status: Option<Status>,
    pub lines: Vec<String>,
}

impl BackendReply {
    fn from_response(response: smtp_proto::Response<String>) -> Self {
        let status = (response.esc[0] != 0).then(|| {
            Status(
                response.esc[0],
                u16::from(response.esc[1]),
                u16::from(response.esc[2]),
            )
        });
        let lines = response
            .message
            .split('\n')
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect();
        BackendReply {
            code: response.code,
            status,
            lines,
        }
    }

    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    pub fn to_reply(&self) -> Reply {
        let lines: Vec<&str> = self.lines.iter().map(String::as_str).collect();
        Reply::from_backend(self.code, self.status, &lines)
    }

    pub fn summary(&self) -> String {
        let mut out = self.code.to_string();
        if let Some(status) = self.status {
            out.push(' ');
            out.push_str(&status.to_string());
        }
        if let Some(line) = self.lines.first() {
            out.push(' ');
            out.push_str(&crate::smtp::reply::clean(line));
        }
        out
    }
}

impl std::fmt::Display for BackendReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.summary())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("backend refused the session: {0}")]
    Refused(BackendReply),
    #[error("TLS to backend failed: {0}")]
    Tls(String),
    #[error("timeout waiting for {0}")]
    Timeout(&'static str),
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("all backend connections are busy")]
    Busy,
    #[error("local delivery failed: {0}")]
    Local(String),
    #[error("no backend available ({0})")]
    Unavailable(String),
}

impl RelayError {
    /// The reply the client gets: always temporary, so the sender retries.
    pub fn reply(&self) -> Reply {
        match self {
            RelayError::Connect(_)
            | RelayError::Refused(_)
            | RelayError::Tls(_)
            | RelayError::Unavailable(_) => Reply::backend_unavailable(),
            RelayError::Timeout(_) => Reply::backend_timeout(),
            RelayError::Lost(_) => Reply::backend_connection_lost(),
            RelayError::Protocol(_) => Reply::backend_protocol_error(),
            RelayError::Busy => Reply::backend_busy(),
            RelayError::Local(_) => Reply::local_error(),
        }
    }

    /// Label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            RelayError::Connect(_) => "connect_error",
            RelayError::Refused(_) => "refused",
            RelayError::Tls(_) => "tls_error",
            RelayError::Timeout(_) => "timeout",
            RelayError::Lost(_) => "connection_lost",
            RelayError::Protocol(_) => "protocol_error",
            RelayError::Busy => "busy",
            RelayError::Local(_) => "local_error",
            RelayError::Unavailable(_) => "unavailable",
        }
    }

    /// Worth trying the next backend (nothing has been committed on this one).
    fn fails_over(&self) -> bool {
        matches!(
            self,
            RelayError::Connect(_)
                | RelayError::Refused(_)
                | RelayError::Tls(_)
                | RelayError::Timeout(_)
                | RelayError::Lost(_)
                | RelayError::Protocol(_)
                | RelayError::Busy
        )
    }
}

/// The envelope as the backend will see it.
#[derive(Clone, Debug)]
pub struct Envelope {
    pub mail_from: String,
    pub smtputf8: bool,
    pub eight_bit: bool,
    pub size: Option<u64>,
}

/// What opening a backend transaction produced.
pub enum Begin {
    /// MAIL was accepted; here is the reply to the first RCPT.
    Open(Box<BackendTx>, BackendReply),
    /// The backend refused MAIL; its reply goes to the client.
    MailRefused(BackendReply),
}

/// The backend's answer to the message.
#[derive(Debug)]
pub enum Delivery {
    /// SMTP: one reply for the message.
    Single(BackendReply),
    /// LMTP: one reply per recipient the backend accepted, in order.
    PerRecipient(Vec<(String, BackendReply)>),
    /// Maildir: stored under this name.
    Stored(String),
}

pub struct Backend {
    pub label: String,
    kind: BackendKind,
    last_success: AtomicI64,
}

enum BackendKind {
    Remote(Arc<Pool>),
    Maildir(maildir::Maildir),
}

impl Backend {
    pub fn last_success_unix(&self) -> i64 {
        self.last_success.load(Ordering::Relaxed)
    }

    fn mark_success(&self) {
        let now = crate::metrics::unix_now();
        self.last_success.store(now, Ordering::Relaxed);
        metrics::health(&self.label, true, now);
    }
}

/// How often backends are probed for `/readyz` (and to keep a warm connection).
pub const PROBE_INTERVAL: Duration = Duration::from_secs(30);

/// The ordered list of backends of one snapshot, each with its connection pool.
pub struct Relay {
    backends: Vec<Arc<Backend>>,
}

impl Relay {
    pub fn new(
        specs: &[(BackendSpec, PathBuf)],
        settings: Arc<RelaySettings>,
    ) -> Result<Relay, String> {
        let mut backends = Vec::with_capacity(specs.len());
        for (spec, maildir_path) in specs {
            let kind = match spec {
                BackendSpec::Smtp { host, port } => BackendKind::Remote(Arc::new(Pool::new(
                    host.clone(),
                    *port,
                    false,
                    settings.clone(),
                ))),
                BackendSpec::Lmtp { host, port } => BackendKind::Remote(Arc::new(Pool::new(
                    host.clone(),
                    *port,
                    true,
                    settings.clone(),
                ))),
                BackendSpec::Maildir { .. } => {
                    BackendKind::Maildir(maildir::Maildir::open(maildir_path)?)
                }
            };
            backends.push(Arc::new(Backend {
                label: spec.to_string(),
                kind,
                last_success: AtomicI64::new(0),
            }));
        }
        Ok(Relay { backends })
    }

    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// After a reload: backends still configured keep their last success, so `/readyz`
    /// does not call a healthy backend unreachable until the next probe round.
    pub fn inherit_health(&self, previous: &Relay) {
        for backend in &self.backends {
            if let Some(old) = previous.backends.iter().find(|b| b.label == backend.label) {
                backend
                    .last_success
                    .store(old.last_success_unix(), Ordering::Relaxed);
            }
        }
    }

    /// Checks that each backend answers (a pooled connection and NOOP, or a writable
    /// Maildir) and records the time of success, which `/readyz` reads.
    pub async fn probe(&self) {
        for backend in &self.backends {
            let ok = match &backend.kind {
                BackendKind::Maildir(maildir) => maildir.is_writable(),
                BackendKind::Remote(pool) => match pool.acquire(false).await {
                    Ok(mut lease) => {
                        let limit = lease.settings().timeouts.mail;
                        match lease.conn().command(b"NOOP\r\n", limit).await {
                            Ok(reply) if reply.is_positive() => {
                                lease.release();
                                true
                            }
                            _ => false,
                        }
                    }
                    Err(err) => {
                        tracing::warn!(backend = %backend.label, error = %err, "backend probe failed");
                        false
                    }
                },
            };
            if ok {
                backend.mark_success();
            } else {
                metrics::health(&backend.label, false, 0);
            }
        }
    }

    /// Opens a transaction on the first backend that works and offers it the first
    /// recipient. MAIL and RCPT go out together when the backend pipelines.
    pub async fn begin(&self, envelope: &Envelope, rcpt: &str) -> Result<Begin, RelayError> {
        let mut last_error = None;
        for backend in &self.backends {
            let outcome = match &backend.kind {
                BackendKind::Maildir(_) => {
                    let tx = BackendTx {
                        backend: backend.clone(),
                        lease: None,
                        accepted: vec![rcpt.to_string()],
                        envelope: envelope.clone(),
                    };
                    return Ok(Begin::Open(Box::new(tx), local_rcpt_ok()));
                }
                BackendKind::Remote(pool) => begin_remote(backend, pool, envelope, rcpt).await,
            };
            match outcome {
                Ok(begin) => return Ok(begin),
                Err(err) if err.fails_over() => {
                    metrics::backend_error(&backend.label, err.label());
                    tracing::warn!(backend = %backend.label, error = %err, "backend unavailable, trying the next one");
                    last_error = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(match last_error {
            Some(RelayError::Busy) => RelayError::Busy,
            Some(RelayError::Timeout(what)) => RelayError::Timeout(what),
            Some(err) => RelayError::Unavailable(err.to_string()),
            None => RelayError::Unavailable("no backend configured".into()),
        })
    }
}

fn local_rcpt_ok() -> BackendReply {
    BackendReply {
        code: 250,
        status: Some(Status(2, 1, 5)),
        lines: vec!["Recipient OK".into()],
    }
}

async fn begin_remote(
    backend: &Arc<Backend>,
    pool: &Arc<Pool>,
    envelope: &Envelope,
    rcpt: &str,
) -> Result<Begin, RelayError> {
    let lease = pool.acquire(false).await?;
    let reused = lease.reused;
    match mail_and_rcpt(backend, lease, envelope, rcpt).await {
        // A pooled connection the backend closed while it idled (silently, or with a
        // 421 that then answers our MAIL): retry once, fresh.
        Err(RelayError::Lost(_) | RelayError::Protocol(_)) if reused => {
            let lease = pool.acquire(true).await?;
            mail_and_rcpt(backend, lease, envelope, rcpt).await
        }
        Err(RelayError::Refused(reply)) if reused && reply.code == 421 => {
            let lease = pool.acquire(true).await?;
            mail_and_rcpt(backend, lease, envelope, rcpt).await
        }
        other => other,
    }
}

async fn mail_and_rcpt(
    backend: &Arc<Backend>,
    mut lease: Lease,
    envelope: &Envelope,
    rcpt: &str,
) -> Result<Begin, RelayError> {
    let settings = lease.settings().clone();
    let conn = lease.conn();
    let mail = mail_command(envelope, &conn.caps);
    let rcpt_line = format!("RCPT TO:<{}>\r\n", smtp_path(rcpt));
    let (mail_reply, rcpt_reply) = if conn.caps.pipelining {
        let mut both = mail.into_bytes();
        both.extend_from_slice(rcpt_line.as_bytes());
        conn.write_all(&both, settings.timeouts.mail).await?;
        let mail_reply = conn.read_reply(settings.timeouts.mail).await?;
        let rcpt_reply = conn.read_reply(settings.timeouts.rcpt).await?;
        (mail_reply, Some(rcpt_reply))
    } else {
        let mail_reply = conn
            .command(mail.as_bytes(), settings.timeouts.mail)
            .await?;
        if !mail_reply.is_positive() {
            (mail_reply, None)
        } else {
            let rcpt_reply = conn
                .command(rcpt_line.as_bytes(), settings.timeouts.rcpt)
                .await?;
            (mail_reply, Some(rcpt_reply))
        }
    };
    if mail_reply.code == 421 {
        lease.conn().broken = true;
        return Err(RelayError::Refused(mail_reply));
    }
    if !mail_reply.is_positive() {
        // The backend's session is back at its initial state: reusable as it is.
        lease.release();
        return Ok(Begin::MailRefused(mail_reply));
    }
    let rcpt_reply = rcpt_reply.unwrap_or_else(|| mail_reply.clone());
    let mut tx = BackendTx {
        backend: backend.clone(),
        lease: Some(lease),
        accepted: Vec::new(),
        envelope: envelope.clone(),
    };
    if rcpt_reply.is_positive() {
        tx.accepted.push(rcpt.to_string());
    }
    Ok(Begin::Open(Box::new(tx), rcpt_reply))
}

/// An address as it must be written in MAIL/RCPT: smtp-proto hands us the local part
/// unquoted, so one that is not a dot-atom (`"john doe"@x`) is quoted again.
pub fn smtp_path(address: &str) -> String {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return address.to_string();
    };
    let atext =
        |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    let dot_atom = !local.is_empty()
        && local
            .split('.')
            .all(|part| !part.is_empty() && part.chars().all(atext));
    if dot_atom {
        return address.to_string();
    }
    let mut quoted = String::with_capacity(local.len() + domain.len() + 4);
    quoted.push('"');
    for c in local.chars().filter(|c| !c.is_control()) {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push_str("\"@");
    quoted.push_str(domain);
    quoted
}

fn mail_command(envelope: &Envelope, caps: &Capabilities) -> String {
    let mut line = format!("MAIL FROM:<{}>", smtp_path(&envelope.mail_from));
    if let (Some(size), Some(_)) = (envelope.size, caps.size) {
        line.push_str(&format!(" SIZE={size}"));
    }
    if envelope.eight_bit && caps.eight_bit_mime {
        line.push_str(" BODY=8BITMIME");
    }
    if envelope.smtputf8 && caps.smtputf8 {
        line.push_str(" SMTPUTF8");
    }
    line.push_str("\r\n");
    line
}

/// An open transaction on one backend.
pub struct BackendTx {
    backend: Arc<Backend>,
    /// `None` for maildir.
    lease: Option<Lease>,
    accepted: Vec<String>,
    envelope: Envelope,
}

impl BackendTx {
    pub fn backend_label(&self) -> &str {
        &self.backend.label
    }

    /// Recipients the backend accepted.
    pub fn accepted(&self) -> &[String] {
        &self.accepted
    }

    /// True when the backend cannot take a non-ASCII envelope.
    pub fn lacks_smtputf8(&mut self) -> bool {
        match &mut self.lease {
            Some(lease) => !lease.conn().caps.smtputf8,
            None => false,
        }
    }

    pub async fn rcpt(&mut self, rcpt: &str) -> Result<BackendReply, RelayError> {
        let reply = match &mut self.lease {
            None => local_rcpt_ok(),
            Some(lease) => {
                let limit = lease.settings().timeouts.rcpt;
                let line = format!("RCPT TO:<{}>\r\n", smtp_path(rcpt));
                lease.conn().command(line.as_bytes(), limit).await?
            }
        };
        if reply.is_positive() {
            self.accepted.push(rcpt.to_string());
        }
        Ok(reply)
    }

    /// Sends the message. Consumes the transaction; the connection goes back to the pool
    /// when the backend's session is clean.
    pub async fn send(mut self, message: &OutboundMessage<'_>) -> Result<Delivery, RelayError> {
        let started = tokio::time::Instant::now();
        let result = match self.lease.take() {
            None => self.send_maildir(message),
            Some(lease) => send_remote(lease, &self.accepted, message).await,
        };
        metrics::delivery(&self.backend.label, &result, started.elapsed());
        if result.is_ok() {
            self.backend.mark_success();
        }
        result
    }

    fn send_maildir(&self, message: &OutboundMessage<'_>) -> Result<Delivery, RelayError> {
        let BackendKind::Maildir(maildir) = &self.backend.kind else {
            return Err(RelayError::Local("not a maildir backend".into()));
        };
        maildir
            .deliver(&self.envelope.mail_from, &self.accepted, message)
            .map(Delivery::Stored)
            .map_err(|err| RelayError::Local(err.to_string()))
    }

    /// Abandons the transaction (RSET) and returns the connection to the pool.
    pub async fn abort(mut self) {
        if let Some(mut lease) = self.lease.take() {
            let limit = lease.settings().timeouts.mail;
            match lease.conn().command(b"RSET\r\n", limit).await {
                Ok(reply) if reply.is_positive() => lease.release(),
                _ => {}
            }
        }
    }
}

async fn send_remote(
    mut lease: Lease,
    accepted: &[String],
    message: &OutboundMessage<'_>,
) -> Result<Delivery, RelayError> {
    let settings = lease.settings().clone();
    let conn = lease.conn();
    let lmtp = conn.lmtp;
    if conn.caps.chunking {
        message
            .write_bdat(conn, settings.timeouts.data_block)
            .await?;
    } else {
        let reply = conn
            .command(b"DATA\r\n", settings.timeouts.data_init)
            .await?;
        if reply.code < 400 && reply.code != 354 {
            // Not an answer DATA can get: the replies are out of step with the commands.
            conn.broken = true;
            return Err(RelayError::Protocol(format!(
                "unexpected reply {} to DATA",
                reply.code
            )));
        }
        if reply.code != 354 {
            // Refused before content (e.g. 554): the session is at its initial state.
            if reply.code != 421 {
                lease.release();
            }
            return Ok(Delivery::Single(reply));
        }
        message
            .write_stuffed(conn, settings.timeouts.data_block)
            .await?;
    }
    let delivery = if lmtp {
        let mut replies = Vec::with_capacity(accepted.len());
        for rcpt in accepted {
            let reply = conn.read_reply(settings.timeouts.data_done).await?;
            replies.push((rcpt.clone(), reply));
        }
        Delivery::PerRecipient(replies)
    } else {
        Delivery::Single(conn.read_reply(settings.timeouts.data_done).await?)
    };
    lease.release();
    Ok(delivery)
}

#[cfg(test)]
mod tests {
    use super::smtp_path;

    #[test]
    fn local_parts_are_quoted_when_needed() {
        assert_eq!(smtp_path("alice@x.test"), "alice@x.test");
        assert_eq!(smtp_path("first.last+tag@x.test"), "first.last+tag@x.test");
        assert_eq!(smtp_path("john doe@x.test"), "\"john doe\"@x.test");
        assert_eq!(
            smtp_path("a;b@x.test"),
            "\"a;b@x.test".replace("@x", "\"@x")
        );
        assert_eq!(smtp_path("a\"b@x.test"), "\"a\\\"b\"@x.test");
        assert_eq!(smtp_path(""), "");
        assert_eq!(smtp_path("jörg@x.test"), "jörg@x.test");
    }
}
