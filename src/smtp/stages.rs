//! The seam between the SMTP session and what decides about the mail: the session
//! knows the protocol and calls a [`Stages`] implementation once per step; the
//! implementation (`pipeline::Connection` in the server, a scripted fake in the session
//! tests) decides and answers with a [`Reply`]. The session never sees a snapshot, a
//! backend or a client budget, only this trait.
//!
//! Every method here is a call the session makes today, no more: a new call is a new
//! decision the session leaves to the pipeline, and belongs here only then.

use super::reply::Reply;
use crate::spool::MessageBytes;
use smtp_proto::{MailFrom, RcptTo};
use std::future::Future;
use tokio::time::Instant;

/// What the session asks of the stages of a connection. `Send` because sessions run in
/// spawned tasks.
pub trait Stages: Send {
    /// One mail transaction, from an accepted MAIL to its end; opaque to the session.
    type Transaction: Send;

    /// Our name, for the greeting, EHLO/HELO and QUIT replies.
    fn hostname(&self) -> &str;

    /// When the connection was accepted (for the time-to-greeting metric).
    fn started(&self) -> Instant;

    /// A client connected. `Err` is the reply that refuses it (the session then closes).
    fn on_connect(&mut self) -> Result<(), Reply>;

    /// EHLO (`esmtp`) or HELO. `Err` is the reply that refuses the name.
    fn on_helo(&mut self, name: &str, esmtp: bool) -> Result<(), Reply>;

    /// MAIL FROM (its domain syntax already checked): a transaction, or the refusal.
    fn on_mail(
        &mut self,
        mail: MailFrom<String>,
    ) -> impl Future<Output = Result<Self::Transaction, Reply>> + Send;

    /// RCPT TO inside a transaction: the reply for this recipient.
    fn on_rcpt(
        &mut self,
        tx: &mut Self::Transaction,
        rcpt: RcptTo<String>,
    ) -> impl Future<Output = Reply> + Send;

    /// DATA or the first BDAT: `Err` refuses to take the content (no recipients).
    fn on_data(&self, tx: &Self::Transaction) -> Result<(), Reply>;

    /// The SIZE the client declared at MAIL, to size the spool.
    fn declared_size(&self, tx: &Self::Transaction) -> Option<u64>;

    /// The whole message arrived and passed the session's checks: the reply to it.
    fn on_message(
        &mut self,
        tx: Self::Transaction,
        message: MessageBytes,
    ) -> impl Future<Output = Reply> + Send;

    /// The message arrived but the session refuses it with `reply` (too big, bare line
    /// endings, a long line, a spool failure): record it, return the reply to send.
    fn refuse_message(
        &mut self,
        tx: Self::Transaction,
        reply: Reply,
    ) -> impl Future<Output = Reply> + Send;

    /// The transaction ended before end of data (RSET, QUIT, EHLO, disconnect).
    fn on_abort(
        &mut self,
        tx: Self::Transaction,
        reason: &'static str,
    ) -> impl Future<Output = ()> + Send;

    /// The client's first bytes were a PROXY header, which is never honoured here: count
    /// and log it (the session refuses and closes).
    fn on_untrusted_proxy_header(&mut self);

    // The client's budget (`limits:`): each `Err` is the reply to send instead.

    /// Before a MAIL command is acted on (the message rate).
    fn allow_message(&mut self) -> impl Future<Output = Result<(), Reply>> + Send;

    /// Before a RCPT command is acted on (the recipient rate).
    fn allow_recipient(&mut self) -> impl Future<Output = Result<(), Reply>> + Send;

    /// A command that did nothing; true when it is past the junk limit (the session
    /// then counts it as an error).
    fn junk_command(&mut self) -> bool;

    /// A message was accepted (the junk count starts over).
    fn message_accepted(&mut self);

    /// Before each read; `receiving`: inside message content. `Ok(Some(t))`: the read
    /// must end by `t` for the data rate to hold; `Err`: the reply that closes.
    fn before_read(&mut self, receiving: bool) -> Result<Option<Instant>, Reply>;

    /// Bytes read.
    fn received(&mut self, bytes: usize);

    /// The deadline from [`Self::before_read`] passed: the reply that closes.
    fn data_too_slow(&mut self) -> Reply;
}
