//! The backend: recipients are verified with it while the client waits, and the message
//! is relayed to it once it has been received in full.
//!
//! The backend is held only while it is needed (Postfix's `smtpd_proxy_options =
//! speed_adjust`), so pool occupancy does not depend on how fast clients send:
//! - **At RCPT** each recipient is verified by a probe on a pooled connection (MAIL with
//!   the real sender and parameters, RCPT, RSET; one round trip when the backend
//!   pipelines), and the connection goes straight back to the pool. The backend's
//!   definite answers (2xx, 5xx) are kept in [`recipient_cache`] so a recipient is not
//!   probed for every message. The backend's reply to RCPT is the client's reply.
//! - **At end of data** (after the checks and the verdict) a pooled connection is taken
//!   again for MAIL, every RCPT, and DATA or BDAT. A recipient refused now although the
//!   probe accepted it makes the whole message a `451 4.3.0`: there is no local queue,
//!   so we never answer `250` for a subset.
//!
//! There is no queue: anything uncertain becomes a [`RelayError`], which becomes a 4xx.
//! A backend reply of the 421 kind (the backend is closing the channel) is never passed
//! on as such: it is a [`RelayError::Closing`] (`451 4.4.2` to the client) and its
//! connection is dropped.
//!
//! Backends are tried in order; a backend that cannot be connected to, or greets with
//! 4xx/5xx, or fails STARTTLS when TLS is required, is skipped for the next one, as long
//! as nothing of the message has been sent to it.

mod client;
mod maildir;
mod message;
pub mod metrics;
mod pool;
mod probe;
mod recipient_cache;
mod transaction;

pub use client::Capabilities;
pub use message::OutboundMessage;

use crate::config::RelayRecipientCache;
use crate::config::{BackendSpec, RelayTimeouts, RelayTls};
use crate::smtp::reply::{Reply, Status};
use pool::Pool;
use recipient_cache::RecipientCache;
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
    pub recipient_cache: RelayRecipientCache,
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
        if self.code == 421 {
            return Reply::backend_closing();
        }
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

/// What lies under a [`RelayError`]: the error we were given (io, TLS, SMTP parsing),
/// kept so that `source()` reaches it, or our own words when there was none. It reads
/// exactly as the error it holds, so `RelayError`'s text is what it was with strings.
#[derive(Debug)]
pub enum Cause {
    Message(String),
    Error(Box<dyn std::error::Error + Send + Sync>),
}

impl Cause {
    pub fn of(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Cause::Error(Box::new(err))
    }

    /// The wrapped error itself (for downcasting), if there is one.
    pub fn error(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        match self {
            Cause::Message(_) => None,
            Cause::Error(err) => Some(err.as_ref()),
        }
    }
}

impl From<&str> for Cause {
    fn from(text: &str) -> Self {
        Cause::Message(text.into())
    }
}

impl From<String> for Cause {
    fn from(text: String) -> Self {
        Cause::Message(text)
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Message(text) => f.write_str(text),
            Cause::Error(err) => err.fmt(f),
        }
    }
}

// Transparent: the chain goes on with what the wrapped error wraps, so a chain printer
// does not repeat the wrapped error's text.
impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Cause::Message(_) => None,
            Cause::Error(err) => err.source(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot connect: {0}")]
    Connect(#[source] Cause),
    #[error("backend refused the session: {0}")]
    Refused(BackendReply),
    #[error("TLS to backend failed: {0}")]
    Tls(#[source] Cause),
    #[error("timeout waiting for {0}")]
    Timeout(&'static str),
    #[error("connection lost: {0}")]
    Lost(#[source] Cause),
    #[error("protocol error: {0}")]
    Protocol(#[source] Cause),
    #[error("all backend connections are busy")]
    Busy,
    #[error("local delivery failed: {0}")]
    Local(#[source] Cause),
    #[error("no backend available ({0})")]
    Unavailable(String),
    /// A 421 reply: the backend is closing the channel (idle timeout, shutdown).
    #[error("backend is closing the connection: {0}")]
    Closing(BackendReply),
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
            RelayError::Closing(_) => Reply::backend_closing(),
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
            RelayError::Closing(_) => "closing",
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
                | RelayError::Closing(_)
        )
    }

    /// A pooled connection the backend closed while it idled (silently, or with a 421
    /// that then answers our first command) fails like this: worth one retry, fresh.
    fn stale_connection(&self) -> bool {
        matches!(
            self,
            RelayError::Lost(_) | RelayError::Protocol(_) | RelayError::Closing(_)
        )
    }

    /// What the client learns when no backend could be used.
    fn after_failover(last: Option<RelayError>) -> RelayError {
        match last {
            Some(err @ (RelayError::Busy | RelayError::Timeout(_) | RelayError::Closing(_))) => err,
            Some(err) => RelayError::Unavailable(err.to_string()),
            None => RelayError::Unavailable("no backend configured".into()),
        }
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

impl Envelope {
    /// Non-ASCII addresses: the backend must offer SMTPUTF8 (RFC 6531).
    fn needs_smtputf8<'a>(&self, rcpts: impl IntoIterator<Item = &'a str>) -> bool {
        self.smtputf8 && !(self.mail_from.is_ascii() && rcpts.into_iter().all(str::is_ascii))
    }
}

/// The backend's answer about one recipient.
#[derive(Debug)]
pub enum RcptAnswer {
    /// Its reply to RCPT (from a probe, or kept from an earlier one).
    Rcpt(BackendReply),
    /// It refused MAIL (the sender, or a parameter); its reply goes to the client.
    MailRefused(BackendReply),
    /// The envelope needs SMTPUTF8 and the backend does not offer it.
    NoSmtputf8,
}

/// The backend's answer to the message.
#[derive(Debug)]
pub enum Delivery {
    /// SMTP: one reply for the message.
    Single(BackendReply),
    /// The backend refused MAIL at delivery; nothing was sent.
    MailRefused(BackendReply),
    /// The backend refused these recipients at delivery although it accepted them when
    /// they were verified; nothing was sent (the whole message must be retried).
    RcptRefused(Vec<(String, BackendReply)>),
    /// The envelope needs SMTPUTF8 and the backend does not offer it.
    NoSmtputf8,
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
    /// Emptied by a reload (the backends may have changed); costs only probes.
    recipients: RecipientCache,
}

/// Which backend took (or failed to take) a message, and how it went.
pub struct DeliveryAttempt {
    /// The backend's label; `None` when no backend could be used.
    pub backend: Option<String>,
    pub result: Result<Delivery, RelayError>,
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
        Ok(Relay {
            backends,
            recipients: RecipientCache::new(&settings.recipient_cache),
        })
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

    /// After a reload installed a newer relay: see [`Pool::retire`].
    pub fn retire(&self) {
        for backend in &self.backends {
            if let BackendKind::Remote(pool) = &backend.kind {
                pool.retire();
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

    /// Asks the backend about one recipient while the client waits for its RCPT reply:
    /// a kept answer, or a probe on the first backend that works. No connection is held
    /// afterwards.
    pub async fn verify_recipient(
        &self,
        envelope: &Envelope,
        rcpt: &str,
    ) -> Result<RcptAnswer, RelayError> {
        if let Some(BackendKind::Maildir(_)) = self.backends.first().map(|b| &b.kind) {
            return Ok(RcptAnswer::Rcpt(local_rcpt_ok()));
        }
        // A non-ASCII envelope is always probed: the backend must also offer SMTPUTF8,
        // which only a connection can tell.
        let needs_smtputf8 = envelope.needs_smtputf8([rcpt]);
        if !needs_smtputf8 && let Some(reply) = self.recipients.get(envelope, rcpt) {
            return Ok(RcptAnswer::Rcpt(reply));
        }
        let mut last_error = None;
        for backend in &self.backends {
            let pool = match &backend.kind {
                BackendKind::Maildir(_) => return Ok(RcptAnswer::Rcpt(local_rcpt_ok())),
                BackendKind::Remote(pool) => pool,
            };
            match probe::probe(backend, pool, envelope, rcpt, needs_smtputf8).await {
                Ok(answer) => {
                    if let RcptAnswer::Rcpt(reply) = &answer {
                        self.recipients.offer(envelope, rcpt, reply);
                    }
                    return Ok(answer);
                }
                Err(err) if err.fails_over() => {
                    metrics::backend_error(&backend.label, err.label());
                    tracing::warn!(backend = %backend.label, error = %err, "backend unavailable, trying the next one");
                    last_error = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(RelayError::after_failover(last_error))
    }

    /// Relays a message received in full: MAIL, every RCPT, then the content, on the
    /// first backend that takes the envelope. Once content has been sent to a backend,
    /// no other backend is tried (it may have stored the message).
    pub async fn deliver(
        &self,
        envelope: &Envelope,
        rcpts: &[String],
        message: &OutboundMessage<'_>,
    ) -> DeliveryAttempt {
        let mut last_error = None;
        for backend in &self.backends {
            let result = match &backend.kind {
                BackendKind::Maildir(maildir) => {
                    let started = tokio::time::Instant::now();
                    let result = maildir
                        .deliver(&envelope.mail_from, rcpts, message)
                        .map(Delivery::Stored)
                        .map_err(|err| RelayError::Local(Cause::of(err)));
                    metrics::delivery(&backend.label, &result, started.elapsed());
                    result
                }
                BackendKind::Remote(pool) => {
                    let opened = match transaction::open(pool, envelope, rcpts).await {
                        Err(err) if err.fails_over() => {
                            metrics::backend_error(&backend.label, err.label());
                            tracing::warn!(backend = %backend.label, error = %err, "backend unavailable, trying the next one");
                            last_error = Some(err);
                            continue;
                        }
                        other => other,
                    };
                    let started = tokio::time::Instant::now();
                    let result = match opened {
                        Ok(transaction::Opened::Ready(lease, data_reply)) => {
                            transaction::send(lease, rcpts, message, data_reply).await
                        }
                        Ok(transaction::Opened::Refused(delivery)) => Ok(delivery),
                        Err(err) => Err(err),
                    };
                    metrics::delivery(&backend.label, &result, started.elapsed());
                    result
                }
            };
            if result.is_ok() {
                backend.mark_success();
            }
            return DeliveryAttempt {
                backend: Some(backend.label.clone()),
                result,
            };
        }
        DeliveryAttempt {
            backend: None,
            result: Err(RelayError::after_failover(last_error)),
        }
    }
}

fn local_rcpt_ok() -> BackendReply {
    BackendReply {
        code: 250,
        status: Some(Status(2, 1, 5)),
        lines: vec!["Recipient OK".into()],
    }
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

fn rcpt_command(rcpt: &str) -> String {
    format!("RCPT TO:<{}>\r\n", smtp_path(rcpt))
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

#[cfg(test)]
mod cause_tests {
    use super::{Cause, RelayError};
    use std::error::Error;

    #[test]
    fn the_wrapped_error_is_kept_and_the_text_unchanged() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = RelayError::Connect(Cause::of(io));
        assert_eq!(err.to_string(), "cannot connect: refused");
        let source = err.source().expect("a source");
        assert_eq!(source.to_string(), "refused");
        let RelayError::Connect(cause) = &err else {
            unreachable!()
        };
        let kept = cause
            .error()
            .and_then(|e| e.downcast_ref::<std::io::Error>());
        assert_eq!(
            kept.map(std::io::Error::kind),
            Some(std::io::ErrorKind::ConnectionRefused)
        );

        let err = RelayError::Tls("backend does not offer STARTTLS".into());
        assert_eq!(
            err.to_string(),
            "TLS to backend failed: backend does not offer STARTTLS"
        );
        assert!(err.source().unwrap().source().is_none());
    }
}
