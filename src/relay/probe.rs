//! Recipient verification: MAIL (the real sender, with its SIZE/8BITMIME/SMTPUTF8
//! parameters), RCPT and RSET on a pooled connection, which goes back to the pool right
//! after. With PIPELINING the three go out in one write: one round trip.
//!
//! The probe holds a connection for a round trip, never while a client sends. It knows
//! nothing about the cache or failover (see the module above).

use super::pool::{Lease, Pool};
use super::{Backend, Envelope, RcptAnswer, RelayError, mail_command, metrics, rcpt_command};
use std::sync::Arc;

/// Probes one backend; a pooled connection that turns out stale is replaced once.
pub(super) async fn probe(
    backend: &Backend,
    pool: &Arc<Pool>,
    envelope: &Envelope,
    rcpt: &str,
    needs_smtputf8: bool,
) -> Result<RcptAnswer, RelayError> {
    let result = async {
        let lease = pool.acquire(false).await?;
        let reused = lease.reused;
        match probe_on(lease, envelope, rcpt, needs_smtputf8).await {
            Err(err) if reused && err.stale_connection() => {
                let lease = pool.acquire(true).await?;
                probe_on(lease, envelope, rcpt, needs_smtputf8).await
            }
            other => other,
        }
    }
    .await;
    let label = match &result {
        Ok(RcptAnswer::Rcpt(reply)) => metrics::reply_label(reply.code),
        Ok(RcptAnswer::MailRefused(_)) => "mail_refused",
        Ok(RcptAnswer::NoSmtputf8) => "no_smtputf8",
        Err(err) => err.label(),
    };
    metrics::probe(&backend.label, label);
    tracing::debug!(backend = %backend.label, result = label, "recipient probed");
    result
}

async fn probe_on(
    mut lease: Lease,
    envelope: &Envelope,
    rcpt: &str,
    needs_smtputf8: bool,
) -> Result<RcptAnswer, RelayError> {
    let settings = lease.settings().clone();
    let limits = &settings.timeouts;
    let conn = lease.conn();
    if needs_smtputf8 && !conn.caps.smtputf8 {
        lease.release();
        return Ok(RcptAnswer::NoSmtputf8);
    }
    let mail = mail_command(envelope, &conn.caps);
    let rcpt_line = rcpt_command(rcpt);
    let (answer, reset) = if conn.caps.pipelining {
        let mut batch = mail.into_bytes();
        batch.extend_from_slice(rcpt_line.as_bytes());
        batch.extend_from_slice(b"RSET\r\n");
        conn.write_all(&batch, limits.mail).await?;
        let mail_reply = conn.read_reply(limits.mail).await?;
        let rcpt_reply = conn.read_reply(limits.rcpt).await;
        if !mail_reply.is_positive() {
            // The RCPT was answered too (503, "need MAIL"), or not at all by a backend
            // that gave up on us: either way the refused MAIL is the answer.
            let reset = match rcpt_reply {
                Ok(_) => conn.read_reply(limits.mail).await,
                Err(err) => Err(err),
            };
            (RcptAnswer::MailRefused(mail_reply), reset)
        } else {
            let rcpt_reply = rcpt_reply?;
            let reset = conn.read_reply(limits.mail).await;
            (RcptAnswer::Rcpt(rcpt_reply), reset)
        }
    } else {
        let mail_reply = conn.command(mail.as_bytes(), limits.mail).await?;
        if !mail_reply.is_positive() {
            // The backend's session is back at its initial state: reusable as it is.
            lease.release();
            return Ok(RcptAnswer::MailRefused(mail_reply));
        }
        let rcpt_reply = conn.command(rcpt_line.as_bytes(), limits.rcpt).await?;
        let reset = conn.command(b"RSET\r\n", limits.mail).await;
        (RcptAnswer::Rcpt(rcpt_reply), reset)
    };
    // The answer stands whatever RSET got; only a clean session goes back to the pool.
    if matches!(reset, Ok(reply) if reply.is_positive()) {
        lease.release();
    }
    Ok(answer)
}
