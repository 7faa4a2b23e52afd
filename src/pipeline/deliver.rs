//! End of data: build the outgoing header fields and relay (only now is a backend
//! connection taken); the backend's answer becomes the client's final reply.

use super::assess::EnvelopeChecks;
use super::evaluate::{Evaluation, Input, Sources, Unchecked, evaluate};
use super::record::Outcome;
use super::rules::PolicyDecision;
use super::verdict::{Action, Verdict};
use super::{Connection, Transaction, metrics};
use crate::auth::{Authenticator, MessageVerification};
use crate::findings::{AuthReport, AuthResult};
use crate::relay::{BackendReply, Delivery, OutboundMessage};
use crate::rewrite::arc::{NotSealed, SealOutcome, Sealer};
use crate::rewrite::auth_results::unfolded;
use crate::rewrite::headers::{sanitize, write_folded};
use crate::rewrite::metrics as arc_metrics;
use crate::rewrite::received::{ReceivedFields, write_received};
use crate::rewrite::section::read_section;
use crate::rewrite::strip::forged_results;
use crate::smtp::reply::Reply;
use crate::spool::MessageBytes;
use mail_auth::AuthenticatedMessage;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use tokio::time::Instant;

impl Connection {
    /// The whole message has been received: check it, decide, and relay it (or refuse
    /// it). Returns the final reply.
    pub async fn on_message(&mut self, mut tx: Transaction, message: MessageBytes) -> Reply {
        let end_of_data = Instant::now();
        metrics::message_received(message.len());
        tx.record.size = message.len() as u64;
        tx.record.rcpts = tx.rcpts.clone();

        // The one reading of the header section every decision below is made on.
        let snapshot = self.snapshot.clone();
        let section = read_section(&message, snapshot.limits.header_section);
        let parsed = OnceLock::new();
        let input = Input {
            raw: &message,
            section: section.as_ref(),
            parsed: &parsed,
        };
        let (client_ip, trusted) = (self.client_ip, self.trusted);
        let evaluation = evaluate(
            &snapshot,
            client_ip,
            trusted,
            input,
            &mut Live {
                conn: self,
                tx: &mut tx,
            },
        )
        .await;
        match (&evaluation.report, evaluation.unchecked, &section) {
            (Some(report), _, _) => record_checks(&mut tx, report, &evaluation.verdict),
            (None, Some(Unchecked::Disabled), _) => {
                tx.record.rule = evaluation.verdict.rule().map(|r| r.to_string());
                tx.record.action = Some(evaluation.verdict.action().as_str());
            }
            (None, Some(Unchecked::HeaderSection), Err(err)) => {
                tracing::info!(id = %tx.id, problem = err.label(), detail = %err, "header section refused");
            }
            (None, Some(Unchecked::ReadDifferently), _) => {
                // Our reader refuses every case we know of where mail-auth's differs;
                // reaching this is a case we did not know of. Refuse, never guess.
                tracing::error!(
                    id = %tx.id,
                    "mail-auth read the header section differently from mxgate; refusing the message"
                );
            }
            _ => {}
        }
        let Evaluation {
            verdict,
            report,
            verification,
            results,
            ..
        } = evaluation;
        let (headers, redirect) = match &verdict {
            Verdict::Refuse { reply, .. } => {
                metrics::end_of_data(end_of_data.elapsed());
                return self.refuse_message(tx, reply.clone()).await;
            }
            Verdict::Deliver {
                headers, redirect, ..
            } => (headers, redirect),
        };
        // A section we could not read was refused above.
        let skip = section
            .as_ref()
            .map(|section| forged_results(&section.fields, self.hostname()))
            .unwrap_or_default();
        let mut prefix = Vec::with_capacity(4096);
        let client_name = report
            .as_ref()
            .and_then(|r| r.iprev.confirmed.first().cloned());
        if let Some(value) = &results {
            if let (Some(sealer), Some(Some(parsed)), Some(verification)) =
                (&snapshot.sealer, parsed.get(), &verification)
            {
                self.seal(
                    sealer,
                    &message,
                    parsed,
                    &skip,
                    verification,
                    value,
                    &mut prefix,
                );
            }
            write_folded(&mut prefix, "Authentication-Results", value);
        }
        for (name, value) in headers {
            write_folded(&mut prefix, name, &sanitize(value, 900));
        }
        if redirect.is_some() {
            write_folded(
                &mut prefix,
                "X-Mxgate-Quarantined-For",
                &sanitize(&tx.rcpts.join(", "), 900),
            );
        }
        write_received(
            &mut prefix,
            &ReceivedFields {
                helo: self.helo.as_deref(),
                client_name: client_name.as_deref(),
                client_ip: self.client_ip,
                by: self.hostname(),
                esmtp: self.esmtp,
                smtputf8: tx.params.smtputf8,
                tls: self.tls.as_ref(),
                id: &tx.id,
                single_recipient: (tx.rcpts.len() == 1).then(|| tx.rcpts[0].as_str()),
                timestamp: crate::metrics::unix_now(),
            },
        );
        let outbound = OutboundMessage {
            prefix: &prefix,
            original: &message,
            skip: &skip,
        };
        let reply = self.relay(&mut tx, redirect.as_deref(), &outbound).await;
        metrics::end_of_data(end_of_data.elapsed());
        let quarantined = verdict.action() == Action::Quarantine;
        tx.record.finish(
            Outcome::from_reply(&reply, quarantined),
            &reply,
            tx.started.elapsed(),
        );
        reply
    }

    /// Adds the ARC set for the message as it will be relayed. A message that cannot be
    /// sealed is still delivered (unsealed), and the reason logged.
    #[allow(clippy::too_many_arguments)]
    fn seal(
        &self,
        sealer: &Sealer,
        message: &[u8],
        parsed: &AuthenticatedMessage<'_>,
        skip: &[std::ops::Range<usize>],
        verification: &MessageVerification<'_>,
        results: &str,
        out: &mut Vec<u8>,
    ) {
        if verification.arc_malformed {
            arc_metrics::sealed(SealOutcome::SkippedChainFailed);
            return;
        }
        let line = unfolded(results);
        // The seal covers the message as relayed: without the forged results we drop.
        let stripped;
        let reparsed;
        let relayed = if skip.is_empty() {
            parsed
        } else {
            stripped = OutboundMessage {
                prefix: b"",
                original: message,
                skip,
            }
            .to_vec();
            match AuthenticatedMessage::parse(&stripped) {
                Some(p) => {
                    reparsed = p;
                    &reparsed
                }
                None => return,
            }
        };
        match sealer.seal(relayed, &verification.arc_output, &line) {
            Ok(headers) => {
                arc_metrics::sealed(SealOutcome::Sealed);
                out.extend_from_slice(&headers);
            }
            Err(NotSealed::ChainFailed) => arc_metrics::sealed(SealOutcome::SkippedChainFailed),
            Err(NotSealed::ChainFull) => arc_metrics::sealed(SealOutcome::SkippedChainFull),
            Err(NotSealed::Error(err)) => {
                arc_metrics::sealed(SealOutcome::Error);
                tracing::warn!(error = %err, "ARC sealing failed; relaying unsealed");
            }
        }
    }

    /// Relays the message, received in full, to its recipients, or only to the
    /// quarantine address `redirect_to`; the backend's answer becomes the final reply.
    async fn relay(
        &mut self,
        tx: &mut Transaction,
        redirect_to: Option<&str>,
        outbound: &OutboundMessage<'_>,
    ) -> Reply {
        if tx.rcpts.is_empty() {
            return Reply::no_valid_recipients();
        }
        let targets = match redirect_to {
            Some(to) => vec![to.to_string()],
            None => tx.rcpts.clone(),
        };
        let attempt = self
            .snapshot
            .relay
            .deliver(&tx.envelope(), &targets, outbound)
            .await;
        tx.record.backend = attempt.backend;
        match (attempt.result, redirect_to) {
            // The backend refusing our quarantine address (or the sender, for it) is a
            // configuration problem, not the sender's: defer (451) rather than bounce
            // mail we meant to keep.
            (Ok(Delivery::MailRefused(reply)), Some(to)) => {
                tracing::error!(quarantine_to = %to, backend_reply = %reply.summary(), "the backend refuses the sender for quarantine; deferring the message");
                Reply::quarantine_refused()
            }
            (Ok(Delivery::RcptRefused(refused)), Some(to)) => {
                let reply = refused
                    .first()
                    .map(|(_, r)| r.summary())
                    .unwrap_or_default();
                tracing::error!(quarantine_to = %to, backend_reply = %reply, "the backend refuses the quarantine address; deferring the message");
                Reply::quarantine_refused()
            }
            (Ok(delivery), _) => final_reply(delivery, &tx.id),
            (Err(err), _) => {
                tx.record.note_relay_error(&err);
                err.reply()
            }
        }
    }
}

/// The SMTP path's sources for [`evaluate`]: the envelope checks started while the
/// client talked, and the policy decided stage by stage.
struct Live<'a> {
    conn: &'a mut Connection,
    tx: &'a mut Transaction,
}

impl Sources for Live<'_> {
    fn envelope_checks(
        &mut self,
        _auth: &Arc<Authenticator>,
    ) -> impl Future<Output = EnvelopeChecks> + Send {
        self.conn.envelope_checks(self.tx)
    }

    fn policy_at_data(&mut self, report: Option<&AuthReport>) -> PolicyDecision {
        self.conn.policy_at_data(self.tx, report)
    }
}

/// What the transaction log and the metrics get from the checks.
fn record_checks(tx: &mut Transaction, report: &AuthReport, verdict: &Verdict) {
    let record = &mut tx.record;
    record.auth.push(("iprev", report.iprev.result.to_string()));
    record.auth.push((
        "spf",
        format!("{}({})", report.spf.result, report.spf.domain),
    ));
    record
        .auth
        .push(("helo_spf", report.helo_spf.result.to_string()));
    for dkim in &report.dkim {
        record
            .auth
            .push(("dkim", format!("{}({})", dkim.result, dkim.domain)));
    }
    if report.dkim.is_empty() {
        record.auth.push(("dkim", "none".into()));
    }
    record.auth.push(("arc", report.arc.result.to_string()));
    record.auth.push((
        "dmarc",
        format!("{}({})", report.dmarc.result, report.dmarc.domain),
    ));
    record.action = Some(verdict.action().as_str());
    record.rule = verdict.rule().map(|r| r.to_string());
    if let Some(unsure) = &verdict.why().temperror {
        tracing::info!(
            id = %tx.id,
            unsure = %unsure,
            reason = %verdict.reason(),
            "refusal deferred: DNS trouble kept evidence that would have let the message through from being checked"
        );
    }
    let guard_refused = own_domain_record(tx, verdict);
    let label = match (report.dmarc.result, verdict.action()) {
        // The own-domain guard refused, not DMARC (counted as reason `own_domain`).
        _ if guard_refused => None,
        (AuthResult::Fail, Action::Reject) => Some("reject"),
        (AuthResult::Fail, Action::Quarantine) => Some("quarantine"),
        (AuthResult::Fail, _) if verdict.dmarc_override().is_some() => Some("override"),
        (AuthResult::Fail, _) => Some("none"),
        (AuthResult::TempError, Action::Tempfail) => Some("tempfail"),
        (AuthResult::TempError, _) => Some("none"),
        _ => None,
    };
    if let Some(label) = label {
        crate::auth::metrics::DMARC_ACTIONS
            .with_label_values(&[label])
            .inc();
    }
    if let Some(sealer) = verdict.dmarc_override().and_then(|n| n.sealer.as_deref()) {
        arc_metrics::override_applied(sealer);
    }
}

/// The own-domain guard's decision in the transaction log, and a line of its own when
/// it refuses. Returns whether it refused.
fn own_domain_record(tx: &mut Transaction, verdict: &Verdict) -> bool {
    let Some(note) = verdict.own_domain() else {
        return false;
    };
    tx.record
        .auth
        .push(("own_domain", format!("{}({})", note.decision, note.domain)));
    let refused = matches!(note.decision, "refuse" | "tempfail");
    if refused {
        tracing::info!(
            id = %tx.id,
            domain = %note.domain,
            decision = note.decision,
            reason = %note.reason,
            "own-domain guard: message From one of our domains refused (dmarc.protect_own_domains)"
        );
    }
    refused
}

/// The client's final reply from the backend's answer.
///
/// SMTP gives one reply: it passes through. LMTP gives one per recipient while our
/// client expects one for the message; when they disagree we pick the reply that never
/// hides a failure: any temporary failure -> 451 (the sender retries; recipients already
/// delivered may get a duplicate, none loses the message); otherwise any permanent
/// failure -> 5xx naming who failed and who was delivered, so the sender learns of it.
pub fn final_reply(delivery: Delivery, id: &str) -> Reply {
    match delivery {
        Delivery::Single(reply) | Delivery::MailRefused(reply) => reply.to_reply(),
        Delivery::RcptRefused(refused) => {
            let (rcpts, replies): (Vec<String>, Vec<String>) = refused
                .into_iter()
                .map(|(rcpt, reply)| (rcpt, reply.summary()))
                .unzip();
            tracing::warn!(id, refused = ?rcpts, backend_replies = ?replies, "the backend refused at delivery recipients it had accepted when verified; the whole message is deferred");
            Reply::recipients_refused_at_delivery(&rcpts)
        }
        Delivery::NoSmtputf8 => Reply::smtputf8_unsupported_by_backend(),
        Delivery::Stored(_) => Reply::delivered(id),
        Delivery::PerRecipient(replies) => fold_per_recipient(&replies),
    }
}

fn fold_per_recipient(replies: &[(String, BackendReply)]) -> Reply {
    let Some((_, first)) = replies.first() else {
        return Reply::backend_protocol_error();
    };
    let same_class = replies
        .iter()
        .all(|(_, r)| r.code / 100 == first.code / 100);
    if same_class {
        return first.to_reply();
    }
    let failed: Vec<String> = replies
        .iter()
        .filter(|(_, r)| !r.is_positive())
        .map(|(rcpt, _)| rcpt.clone())
        .collect();
    // A failure that is not a clean 5xx (a 4xx, or a code no final reply may carry) is
    // uncertain for its recipient: the sender must retry, so the message is deferred.
    let uncertain = |r: &BackendReply| !r.is_positive() && !(500..600).contains(&r.code);
    if replies.iter().any(|(_, r)| uncertain(r)) {
        return Reply::partial_delivery_retry(&failed);
    }
    let delivered: Vec<String> = replies
        .iter()
        .filter(|(_, r)| r.is_positive())
        .map(|(rcpt, _)| rcpt.clone())
        .collect();
    let worst = replies
        .iter()
        .map(|(_, r)| r)
        .find(|r| !r.is_positive())
        .unwrap_or(first);
    Reply::partial_delivery_failed(worst.code, worst.status, &failed, &delivered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::reply::Status;

    fn reply(code: u16) -> BackendReply {
        BackendReply {
            code,
            status: Some(Status((code / 100) as u8, 0, 0)),
            lines: vec![format!("backend {code}")],
        }
    }

    fn lmtp(codes: &[u16]) -> Reply {
        let replies = codes
            .iter()
            .enumerate()
            .map(|(n, c)| (format!("r{n}@x.test"), reply(*c)))
            .collect();
        final_reply(Delivery::PerRecipient(replies), "ID")
    }

    #[test]
    fn smtp_reply_passes_through() {
        let r = final_reply(Delivery::Single(reply(554)), "ID");
        assert_eq!(r.code(), 554);
        assert_eq!(r.text(), "backend 554");
    }

    #[test]
    fn lmtp_agreeing_replies_pass_through() {
        assert_eq!(lmtp(&[250, 250]).code(), 250);
        assert_eq!(lmtp(&[452, 451]).code(), 452);
        assert_eq!(lmtp(&[550, 552]).code(), 550);
    }

    #[test]
    fn lmtp_disagreement_never_hides_a_failure() {
        let r = lmtp(&[250, 452]);
        assert_eq!(r.code(), 451);
        assert!(r.text().contains("<r1@x.test>"), "{r}");
        let r = lmtp(&[250, 550, 451]);
        assert_eq!(r.code(), 451);
        // A code no final reply may carry is uncertain, never a permanent failure.
        for odd in [199, 334, 650] {
            let r = lmtp(&[250, odd]);
            assert_eq!(
                (r.code(), r.status()),
                (451, Some(Status(4, 3, 0))),
                "{odd}: {r}"
            );
        }
        let r = lmtp(&[250, 552]);
        assert_eq!(r.code(), 552);
        assert!(
            r.text()
                .contains("failed for <r1@x.test>; delivered to <r0@x.test>"),
            "{r}"
        );
    }
}
