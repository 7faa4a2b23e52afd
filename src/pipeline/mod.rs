//! The only module that knows the order of the stages a message goes through:
//! connect -> HELO -> MAIL -> RCPT -> DATA -> end of data -> verdict -> relay.
//!
//! The SMTP session calls one stage function per command and sends back the [`Reply`]
//! it returns. Checks return data, the policy turns data into a decision, and the
//! decision becomes a reply and header changes in one place (`verdict`).

mod assess;
mod deliver;
pub mod evaluate;
pub mod metrics;
pub mod own_domain;
mod pending;
mod record;
pub mod rules;
mod session_stages;
mod stages;
pub mod verdict;

pub use assess::{EnvelopeChecks, assess};
pub use evaluate::{Evaluation, evaluate};
pub use record::{Outcome, TransactionRecord};
pub use stages::MailParams;

use crate::auth::Authenticator;
use crate::findings::{IprevCheck, SpfCheck};
use crate::limits::ClientBudget;
use crate::snapshot::Snapshot;
use crate::tls::TlsInfo;
use pending::Pending;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::time::Instant;

/// Everything known about one client connection.
pub struct Connection {
    pub snapshot: Arc<Snapshot>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// The client address, IPv4-mapped IPv6 unwrapped.
    pub client_ip: IpAddr,
    pub tls: Option<TlsInfo>,
    pub helo: Option<String>,
    pub esmtp: bool,
    /// In `server.trusted_networks`: relayed without sender checks.
    pub trusted: bool,
    pub started: Instant,
    /// A load balancer's own connection (PROXY `UNKNOWN` / v2 `LOCAL`): greeted, never
    /// given a transaction, and never checked (its address is not a sender's).
    pub health_check: bool,
    /// The sender checks, unless the client is trusted or checks are disabled.
    auth: Option<Arc<Authenticator>>,
    iprev: Option<Pending<IprevCheck>>,
    helo_spf: Option<Pending<SpfCheck>>,
    /// Results of the SPF records the policy refers to, for the client IP.
    spf_records: Option<Pending<std::collections::HashMap<String, crate::findings::AuthResult>>>,
    /// A policy decision made at connect (it holds for every transaction).
    policy_hit: Option<rules::PolicyHit>,
    /// Shadow rules already counted for this connection.
    shadow_seen: Vec<Arc<str>>,
    /// What this client may still spend (`limits:`); holds its connection slot.
    pub budget: ClientBudget,
}

/// One mail transaction: from MAIL to the final reply (or RSET / disconnect).
pub struct Transaction {
    pub id: String,
    pub mail_from: String,
    pub params: MailParams,
    /// Recipients accepted (by us and by the backend's verification). No backend
    /// connection is held for them: the message is relayed once received in full.
    pub rcpts: Vec<String>,
    /// SPF for MAIL FROM, started when MAIL was accepted.
    spf: Option<Pending<SpfCheck>>,
    /// The policy decision for this transaction, once a rule decided.
    policy_hit: Option<rules::PolicyHit>,
    /// DNS facts gathered for the policy at MAIL.
    dns_facts: rules::DnsFacts,
    /// Shadow rules already counted for this transaction.
    shadow_seen: Vec<Arc<str>>,
    pub record: TransactionRecord,
    pub started: Instant,
}

impl Connection {
    pub fn new(
        snapshot: Arc<Snapshot>,
        peer: SocketAddr,
        local: SocketAddr,
        budget: ClientBudget,
    ) -> Self {
        let client_ip = crate::config::canonical_ip(peer.ip());
        let trusted = snapshot.is_trusted(&client_ip);
        let auth = if trusted { None } else { snapshot.auth.clone() };
        Connection {
            auth,
            iprev: None,
            helo_spf: None,
            spf_records: None,
            policy_hit: None,
            shadow_seen: Vec::new(),
            budget,
            snapshot,
            peer,
            local,
            client_ip,
            tls: None,
            helo: None,
            esmtp: false,
            trusted,
            started: Instant::now(),
            health_check: false,
        }
    }

    /// A connection a load balancer opened for itself (a health check).
    pub fn health_check(
        snapshot: Arc<Snapshot>,
        peer: SocketAddr,
        local: SocketAddr,
        budget: ClientBudget,
    ) -> Self {
        let mut conn = Connection::new(snapshot, peer, local, budget);
        conn.auth = None;
        conn.health_check = true;
        conn
    }

    pub fn hostname(&self) -> &str {
        &self.snapshot.hostname
    }

    /// STARTTLS completed: the session starts over (RFC 3207 section 4.2).
    pub fn on_tls_established(&mut self, info: TlsInfo) {
        self.tls = Some(info);
        self.helo = None;
        self.esmtp = false;
    }
}

/// A transaction id: unique per process and sortable by time, short enough for logs.
pub fn new_transaction_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:011X}{:04X}", micros & 0xFFF_FFFF_FFFF, n & 0xFFFF)
}
