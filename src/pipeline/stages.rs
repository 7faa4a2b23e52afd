//! Envelope stages: connect, HELO, MAIL, RCPT, DATA.

use super::{Connection, Pending, Transaction, TransactionRecord, new_transaction_id};
use crate::relay::{Envelope, RcptAnswer};
use crate::smtp::extensions::{unoffered_mail_parameter, unoffered_rcpt_parameter};
use crate::smtp::reply::Reply;
use smtp_proto::{MAIL_BODY_8BITMIME, MAIL_SMTPUTF8, MailFrom, RcptTo};
use tokio::time::Instant;

/// The ESMTP parameters of MAIL that matter downstream.
#[derive(Clone, Copy, Debug, Default)]
pub struct MailParams {
    pub size: Option<u64>,
    pub eight_bit: bool,
    pub smtputf8: bool,
}

impl Connection {
    /// A client connected. `Err` is the reply that refuses it. The iprev check starts
    /// now and runs while the client talks.
    pub fn on_connect(&mut self) -> Result<(), Reply> {
        if self.health_check {
            return Ok(());
        }
        self.policy_at_connect()?;
        if let Some(auth) = self.auth.clone() {
            let ip = self.client_ip;
            let policy = self.snapshot.policy.clone();
            self.iprev = Some(Pending::spawn(async move {
                auth.iprev(ip, &policy.trusted_hosts).await
            }));
        }
        Ok(())
    }

    pub fn on_helo(&mut self, name: &str, esmtp: bool) -> Result<(), Reply> {
        let name = name.trim();
        if name.is_empty() || name.len() > 255 {
            return Err(Reply::bad_helo());
        }
        if self.helo.as_deref() != Some(name) {
            self.helo_spf = self.auth.clone().map(|auth| {
                let (ip, helo) = (self.client_ip, name.to_string());
                Pending::spawn(async move { auth.spf_helo(ip, &helo).await })
            });
        }
        self.helo = Some(name.to_string());
        self.esmtp = esmtp;
        Ok(())
    }

    pub async fn on_mail(&mut self, mail: MailFrom<String>) -> Result<Transaction, Reply> {
        if self.health_check {
            return Err(Reply::health_check_no_mail());
        }
        let snapshot = &self.snapshot;
        if let Some(param) = unoffered_mail_parameter(&mail) {
            return Err(Reply::unsupported_parameter(param));
        }
        let smtputf8 = mail.flags & MAIL_SMTPUTF8 != 0;
        if !mail.address.is_ascii() && !smtputf8 {
            return Err(Reply::smtputf8_required());
        }
        let size = (mail.size > 0).then_some(mail.size as u64);
        if size.is_some_and(|s| s > snapshot.limits.max_message_size) {
            return Err(Reply::message_too_big_declared(
                snapshot.limits.max_message_size,
            ));
        }
        self.start_policy_checks(&mail.address);
        let id = new_transaction_id();
        let record = TransactionRecord::new(&id, self, &mail.address);
        let spf = self.auth.clone().map(|auth| {
            let ip = self.client_ip;
            let helo = self.helo.clone().unwrap_or_default();
            let from = mail.address.clone();
            Pending::spawn(async move { auth.spf_mail_from(ip, &helo, &from).await })
        });
        let mut tx = Transaction {
            id,
            mail_from: mail.address,
            params: MailParams {
                size,
                eight_bit: mail.flags & MAIL_BODY_8BITMIME != 0,
                smtputf8,
            },
            rcpts: Vec::new(),
            spf,
            policy_hit: None,
            dns_facts: Default::default(),
            // Shadow rules that matched at connect were counted there, for the first
            // transaction; later transactions count their own.
            shadow_seen: std::mem::take(&mut self.shadow_seen),
            record,
            started: Instant::now(),
        };
        if let Err(reply) = self.policy_at_mail(&mut tx).await {
            tx.record.rule = tx.policy_hit.as_ref().map(|h| h.rule.to_string());
            tx.record.finish(
                super::Outcome::from_reply(&reply, false),
                &reply,
                tx.started.elapsed(),
            );
            return Err(reply);
        }
        Ok(tx)
    }

    pub async fn on_rcpt(&mut self, tx: &mut Transaction, rcpt: RcptTo<String>) -> Reply {
        if let Some(param) = unoffered_rcpt_parameter(&rcpt) {
            return Reply::unsupported_parameter(param);
        }
        if !rcpt.address.is_ascii() && !tx.params.smtputf8 {
            return Reply::smtputf8_required();
        }
        if tx.rcpts.len() >= self.snapshot.limits.max_recipients {
            return Reply::too_many_recipients();
        }
        let address = match self.snapshot.local_recipient(&rcpt.address) {
            Ok(address) => address,
            Err(not_local) => {
                tx.record.rejected_rcpts += 1;
                return not_local.reply(&rcpt.address);
            }
        };
        if let Some(reply) = self.policy_at_rcpt(tx, &address) {
            tx.record.rejected_rcpts += 1;
            return reply;
        }
        // The backend verifies the recipient now, while the client waits; no connection
        // is held once it has answered (see `relay`).
        let reply = match self
            .snapshot
            .relay
            .verify_recipient(&tx.envelope(), &address)
            .await
        {
            Ok(RcptAnswer::Rcpt(reply) | RcptAnswer::MailRefused(reply)) => reply.to_reply(),
            Ok(RcptAnswer::NoSmtputf8) => Reply::smtputf8_unsupported_by_backend(),
            Err(err) => {
                tx.record.note_relay_error(&err);
                err.reply()
            }
        };
        if reply.is_positive() {
            tx.rcpts.push(address);
        } else {
            tx.record.rejected_rcpts += 1;
        }
        reply
    }

    /// DATA or the first BDAT: is there anyone to deliver to?
    pub fn on_data(&self, tx: &Transaction) -> Result<(), Reply> {
        if tx.rcpts.is_empty() {
            return Err(Reply::no_valid_recipients());
        }
        Ok(())
    }

    /// The transaction ended without a message being relayed (RSET, QUIT, a new EHLO,
    /// disconnect, or a rejection): log it.
    pub async fn on_abort(&mut self, tx: Transaction, reason: &'static str) {
        tx.record.finish_aborted(reason, tx.started.elapsed());
    }

    /// The message was received but cannot be taken (too big, bare line endings, spool
    /// failure): record the refusal, return the reply.
    pub async fn refuse_message(&mut self, mut tx: Transaction, reply: Reply) -> Reply {
        tx.record.rcpts = tx.rcpts.clone();
        let outcome = crate::pipeline::Outcome::from_reply(&reply, false);
        tx.record.finish(outcome, &reply, tx.started.elapsed());
        reply
    }
}

impl Transaction {
    /// The envelope as the backend sees it, for verification and delivery.
    pub fn envelope(&self) -> Envelope {
        Envelope {
            mail_from: self.mail_from.clone(),
            smtputf8: self.params.smtputf8,
            eight_bit: self.params.eight_bit,
            size: self.params.size,
        }
    }
}
