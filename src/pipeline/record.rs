//! One log line per transaction, and the transaction metrics.
//!
//! The record is filled in as the transaction goes and written once when it ends. It
//! carries envelope, checks, decision and backend reply; never message content.

use super::Connection;
use crate::relay::RelayError;
use crate::smtp::reply::Reply;
use std::net::IpAddr;
use std::time::Duration;

#[derive(Debug, Default)]
pub struct TransactionRecord {
    pub id: String,
    pub client_ip: Option<IpAddr>,
    pub helo: Option<String>,
    pub tls: Option<String>,
    pub trusted: bool,
    pub mail_from: String,
    pub rcpts: Vec<String>,
    pub rejected_rcpts: u32,
    pub size: u64,
    pub backend: Option<String>,
    pub relay_error: Option<String>,
    /// One `name=result` entry per check (spf, dkim, dmarc, arc, iprev).
    pub auth: Vec<(&'static str, String)>,
    pub rule: Option<String>,
    pub action: Option<&'static str>,
}

/// How a transaction ended, for metrics and the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Quarantined,
    Rejected,
    Tempfailed,
    Aborted,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Quarantined => "quarantined",
            Outcome::Rejected => "rejected",
            Outcome::Tempfailed => "tempfailed",
            Outcome::Aborted => "aborted",
        }
    }

    pub fn from_reply(reply: &Reply, quarantined: bool) -> Outcome {
        if reply.is_positive() {
            if quarantined {
                Outcome::Quarantined
            } else {
                Outcome::Delivered
            }
        } else if reply.is_transient() {
            Outcome::Tempfailed
        } else {
            Outcome::Rejected
        }
    }
}

impl TransactionRecord {
    pub fn new(id: &str, conn: &Connection, mail_from: &str) -> Self {
        TransactionRecord {
            id: id.to_string(),
            client_ip: Some(conn.client_ip),
            helo: conn.helo.clone(),
            tls: conn
                .tls
                .as_ref()
                .map(|t| format!("{} {}", t.version, t.cipher)),
            trusted: conn.trusted,
            mail_from: mail_from.to_string(),
            ..Default::default()
        }
    }

    pub fn note_relay_error(&mut self, err: &RelayError) {
        self.relay_error = Some(err.to_string());
    }

    pub fn finish_aborted(&self, reason: &'static str, elapsed: Duration) {
        super::metrics::transaction(Outcome::Aborted, None, elapsed);
        tracing::info!(
            target: "mxgate::transaction",
            id = %self.id,
            client_ip = %self.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            helo = self.helo.as_deref().unwrap_or(""),
            tls = self.tls.as_deref().unwrap_or("none"),
            mail_from = %self.mail_from,
            rcpts = %self.rcpts.join(","),
            rejected_rcpts = self.rejected_rcpts,
            backend = self.backend.as_deref().unwrap_or(""),
            relay_error = self.relay_error.as_deref().unwrap_or(""),
            outcome = "aborted",
            reason,
            duration_ms = elapsed.as_millis() as u64,
            "transaction ended without a message"
        );
    }

    pub fn finish(&self, outcome: Outcome, reply: &Reply, elapsed: Duration) {
        super::metrics::transaction(outcome, Some(reply), elapsed);
        let auth = self
            .auth
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        tracing::info!(
            target: "mxgate::transaction",
            id = %self.id,
            client_ip = %self.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            helo = self.helo.as_deref().unwrap_or(""),
            tls = self.tls.as_deref().unwrap_or("none"),
            trusted = self.trusted,
            mail_from = %self.mail_from,
            rcpts = %self.rcpts.join(","),
            rejected_rcpts = self.rejected_rcpts,
            size = self.size,
            auth = %auth,
            rule = self.rule.as_deref().unwrap_or(""),
            action = self.action.unwrap_or(""),
            backend = self.backend.as_deref().unwrap_or(""),
            relay_error = self.relay_error.as_deref().unwrap_or(""),
            outcome = outcome.label(),
            reply = %reply,
            duration_ms = elapsed.as_millis() as u64,
            "transaction"
        );
    }
}
