//! The delivery transaction on one backend, opened only once the message has been
//! received in full: MAIL and every RCPT (pipelined in groups when the backend offers
//! PIPELINING, with DATA at the end of the group when they fit in one, as RFC 2920
//! allows: one round trip fewer while the client waits), then the content (`BDAT n
//! LAST`, or dot-stuffed DATA) and the final reply or replies.
//!
//! The envelope is all or nothing: a recipient refused now (although its probe was
//! accepted) abandons the transaction (RSET) before any content is sent, and the caller
//! answers the whole message with a 4xx. No content is sent unless every recipient was
//! accepted: when a pipelined DATA got `354` although a recipient was refused, the
//! connection is closed, which ends the backend's transaction without a message.

use super::client::ClientConn;
use super::pool::{Lease, Pool};
use super::{
    BackendReply, Delivery, Envelope, OutboundMessage, RelayError, mail_command, rcpt_command,
};
use std::sync::Arc;
use std::time::Duration;

/// Recipients written before their replies are read. The replies to a group must fit
/// the backend's socket buffers while we are still writing, or both sides would wait.
const RCPT_GROUP: usize = 100;

pub(super) enum Opened {
    /// MAIL and every RCPT were accepted: the content may go. With the backend's reply
    /// to DATA when DATA was pipelined with them.
    Ready(Lease, Option<BackendReply>),
    /// The backend refused the envelope; nothing was sent, and its session is reset (or,
    /// after a pipelined DATA got `354`, the connection closed).
    Refused(Delivery),
}

/// Sends the envelope; a pooled connection that turns out stale is replaced once.
pub(super) async fn open(
    pool: &Arc<Pool>,
    envelope: &Envelope,
    rcpts: &[String],
) -> Result<Opened, RelayError> {
    let lease = pool.acquire(false).await?;
    let reused = lease.reused;
    match open_on(lease, envelope, rcpts).await {
        Err(err) if reused && err.stale_connection() => {
            let lease = pool.acquire(true).await?;
            open_on(lease, envelope, rcpts).await
        }
        other => other,
    }
}

async fn open_on(
    mut lease: Lease,
    envelope: &Envelope,
    rcpts: &[String],
) -> Result<Opened, RelayError> {
    let settings = lease.settings().clone();
    let limits = &settings.timeouts;
    let conn = lease.conn();
    if envelope.needs_smtputf8(rcpts.iter().map(String::as_str)) && !conn.caps.smtputf8 {
        lease.release();
        return Ok(Opened::Refused(Delivery::NoSmtputf8));
    }
    let mail = mail_command(envelope, &conn.caps);
    let mut refused = Vec::new();
    let mut data_reply = None;
    let mail_reply = if conn.caps.pipelining {
        // MAIL goes with the first group; the others follow only if MAIL was accepted.
        let mut groups = rcpts.chunks(RCPT_GROUP);
        let first = groups.next().unwrap_or_default();
        let mut batch = mail.into_bytes();
        batch.extend(
            first
                .iter()
                .flat_map(|rcpt| rcpt_command(rcpt).into_bytes()),
        );
        // BDAT carries content, so it never goes before the RCPT replies are known.
        let with_data = !conn.caps.chunking && rcpts.len() <= RCPT_GROUP;
        if with_data {
            batch.extend_from_slice(b"DATA\r\n");
        }
        conn.write_all(&batch, limits.mail).await?;
        let mail_reply = conn.read_reply(limits.mail).await?;
        read_rcpt_replies(conn, first, limits.rcpt, &mut refused).await?;
        if with_data {
            data_reply = Some(conn.read_reply(limits.data_init).await?);
        }
        if mail_reply.is_positive() {
            for group in groups {
                let batch: Vec<u8> = group
                    .iter()
                    .flat_map(|rcpt| rcpt_command(rcpt).into_bytes())
                    .collect();
                conn.write_all(&batch, limits.rcpt).await?;
                read_rcpt_replies(conn, group, limits.rcpt, &mut refused).await?;
            }
        }
        mail_reply
    } else {
        let mail_reply = conn.command(mail.as_bytes(), limits.mail).await?;
        if mail_reply.is_positive() {
            for rcpt in rcpts {
                let reply = conn
                    .command(rcpt_command(rcpt).as_bytes(), limits.rcpt)
                    .await?;
                if !reply.is_positive() {
                    refused.push((rcpt.clone(), reply));
                    break;
                }
            }
        }
        mail_reply
    };
    let awaiting_content = data_reply.as_ref().is_some_and(|reply| reply.code == 354);
    if awaiting_content && (!mail_reply.is_positive() || !refused.is_empty()) {
        // The backend waits for content that must not go: closing the connection is the
        // only way to end its transaction without a message.
        lease.conn().broken = true;
        let delivery = if mail_reply.is_positive() {
            Delivery::RcptRefused(refused)
        } else {
            Delivery::MailRefused(mail_reply)
        };
        return Ok(Opened::Refused(delivery));
    }
    if !mail_reply.is_positive() {
        // The backend's session is back at its initial state (the RCPTs and DATA that
        // came with MAIL were answered `need MAIL`): reusable as it is.
        lease.release();
        return Ok(Opened::Refused(Delivery::MailRefused(mail_reply)));
    }
    if !refused.is_empty() {
        let reset = lease.conn().command(b"RSET\r\n", limits.mail).await;
        if matches!(reset, Ok(reply) if reply.is_positive()) {
            lease.release();
        }
        return Ok(Opened::Refused(Delivery::RcptRefused(refused)));
    }
    Ok(Opened::Ready(lease, data_reply))
}

/// Reads the replies to a group of pipelined RCPTs, keeping the refusals.
async fn read_rcpt_replies(
    conn: &mut ClientConn,
    group: &[String],
    limit: Duration,
    refused: &mut Vec<(String, BackendReply)>,
) -> Result<(), RelayError> {
    for rcpt in group {
        let reply = conn.read_reply(limit).await?;
        if !reply.is_positive() {
            refused.push((rcpt.clone(), reply));
        }
    }
    Ok(())
}

/// Sends the content and reads the final reply (SMTP) or one per recipient (LMTP).
/// `data_reply`: the reply to a DATA already sent with the envelope. The connection goes
/// back to the pool when the backend's session is clean.
pub(super) async fn send(
    mut lease: Lease,
    rcpts: &[String],
    message: &OutboundMessage<'_>,
    data_reply: Option<BackendReply>,
) -> Result<Delivery, RelayError> {
    let settings = lease.settings().clone();
    let limits = &settings.timeouts;
    let conn = lease.conn();
    let lmtp = conn.lmtp;
    if conn.caps.chunking {
        message.write_bdat(conn, limits.data_block).await?;
    } else {
        let reply = match data_reply {
            Some(reply) => reply,
            None => conn.command(b"DATA\r\n", limits.data_init).await?,
        };
        if reply.code < 400 && reply.code != 354 {
            // Not an answer DATA can get: the replies are out of step with the commands.
            conn.broken = true;
            return Err(RelayError::Protocol(
                format!("unexpected reply {} to DATA", reply.code).into(),
            ));
        }
        if reply.code != 354 {
            // Refused before content (Postfix's `smtpd_data_restrictions`, say): the
            // transaction stays open on the backend (RFC 5321 leaves it to the client),
            // and a MAIL on it would get `503 nested MAIL`. Only a reset session goes
            // back to the pool.
            let reset = lease.conn().command(b"RSET\r\n", limits.mail).await;
            if matches!(reset, Ok(reply) if reply.is_positive()) {
                lease.release();
            }
            return Ok(Delivery::Single(reply));
        }
        message.write_stuffed(conn, limits.data_block).await?;
    }
    let delivery = if lmtp {
        let mut replies = Vec::with_capacity(rcpts.len());
        for rcpt in rcpts {
            let reply = conn.read_reply(limits.data_done).await?;
            replies.push((rcpt.clone(), reply));
        }
        Delivery::PerRecipient(replies)
    } else {
        Delivery::Single(conn.read_reply(limits.data_done).await?)
    };
    lease.release();
    Ok(delivery)
}
