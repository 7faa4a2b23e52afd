//! End of data: build the outgoing header fields and relay; the backend's answer
//! becomes the client's final reply.

use super::record::Outcome;
use super::{Connection, Transaction, metrics};
use crate::relay::{BackendReply, Delivery, OutboundMessage};
use crate::rewrite::received::{ReceivedFields, write_received};
use crate::smtp::reply::Reply;
use crate::spool::MessageBytes;
use tokio::time::Instant;

impl Connection {
    /// The whole message has been received: relay it and return the final reply.
    pub async fn on_message(&mut self, mut tx: Transaction, message: MessageBytes) -> Reply {
        let end_of_data = Instant::now();
        metrics::message_received(message.len());
        tx.record.size = message.len() as u64;
        tx.record.rcpts = tx.rcpts.clone();

        let mut prefix = Vec::with_capacity(1024);
        write_received(
            &mut prefix,
            &ReceivedFields {
                helo: self.helo.as_deref(),
                client_name: None,
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
            skip: &[],
        };
        let reply = match tx.backend.take() {
            None => Reply::no_valid_recipients(),
            Some(backend) => match backend.send(&outbound).await {
                Ok(delivery) => final_reply(delivery, &tx.id),
                Err(err) => {
                    tx.record.note_relay_error(&err);
                    err.reply()
                }
            },
        };
        metrics::end_of_data(end_of_data.elapsed());
        tx.record.finish(
            Outcome::from_reply(&reply, false),
            &reply,
            tx.started.elapsed(),
        );
        reply
    }
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
        Delivery::Single(reply) => reply.to_reply(),
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
    if replies.iter().any(|(_, r)| r.is_transient()) {
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
        let r = lmtp(&[250, 552]);
        assert_eq!(r.code(), 552);
        assert!(
            r.text()
                .contains("failed for <r1@x.test>; delivered to <r0@x.test>"),
            "{r}"
        );
    }
}
