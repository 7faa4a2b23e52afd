//! The pipeline as the SMTP session sees it: [`Connection`] implements
//! [`smtp::stages::Stages`](crate::smtp::stages::Stages) by handing each call to its
//! stage (`stages`, `deliver`) or to the client's budget, and builds the
//! [`SessionLimits`] a session runs under from the connection's snapshot.

use super::{Connection, Transaction};
use crate::smtp::reply::Reply;
use crate::smtp::session_limits::{SessionLimits, Tls};
use crate::smtp::stages::Stages;
use crate::spool::MessageBytes;
use smtp_proto::{MailFrom, RcptTo};
use tokio::time::Instant;

impl Connection {
    /// The settings of the next session on this connection: built before the session
    /// starts (again after STARTTLS, when TLS has become active), from the snapshot the
    /// connection keeps to its end.
    pub fn session_limits(&self) -> SessionLimits {
        let limits = &self.snapshot.limits;
        let tls = match (&self.tls, &self.snapshot.tls) {
            (Some(_), _) => Tls::Active,
            (None, Some(_)) => Tls::Offered,
            (None, None) => Tls::Unavailable,
        };
        SessionLimits {
            command_timeout: limits.timeouts.command,
            data_block_timeout: limits.timeouts.data_block,
            write_timeout: limits.timeouts.write,
            max_errors: limits.max_errors,
            max_message_size: limits.max_message_size,
            spool_threshold: limits.spool_threshold,
            spool_dir: limits.spool_dir.clone(),
            bare_line_endings: limits.bare_line_endings,
            long_lines: limits.long_lines,
            tls,
        }
    }
}

impl Stages for Connection {
    type Transaction = Transaction;

    fn hostname(&self) -> &str {
        Connection::hostname(self)
    }

    fn started(&self) -> Instant {
        self.started
    }

    fn on_connect(&mut self) -> Result<(), Reply> {
        Connection::on_connect(self)
    }

    fn on_helo(&mut self, name: &str, esmtp: bool) -> Result<(), Reply> {
        Connection::on_helo(self, name, esmtp)
    }

    async fn on_mail(&mut self, mail: MailFrom<String>) -> Result<Transaction, Reply> {
        Connection::on_mail(self, mail).await
    }

    async fn on_rcpt(&mut self, tx: &mut Transaction, rcpt: RcptTo<String>) -> Reply {
        Connection::on_rcpt(self, tx, rcpt).await
    }

    fn on_data(&self, tx: &Transaction) -> Result<(), Reply> {
        Connection::on_data(self, tx)
    }

    fn declared_size(&self, tx: &Transaction) -> Option<u64> {
        tx.params.size
    }

    async fn on_message(&mut self, tx: Transaction, message: MessageBytes) -> Reply {
        Connection::on_message(self, tx, message).await
    }

    async fn refuse_message(&mut self, tx: Transaction, reply: Reply) -> Reply {
        Connection::refuse_message(self, tx, reply).await
    }

    async fn on_abort(&mut self, tx: Transaction, reason: &'static str) {
        Connection::on_abort(self, tx, reason).await
    }

    fn on_untrusted_proxy_header(&mut self) {
        crate::smtp::proxy_header::note_untrusted(self.peer);
    }

    async fn allow_message(&mut self) -> Result<(), Reply> {
        self.budget.message().await
    }

    async fn allow_recipient(&mut self) -> Result<(), Reply> {
        self.budget.recipient().await
    }

    fn junk_command(&mut self) -> bool {
        self.budget.junk_command()
    }

    fn message_accepted(&mut self) {
        self.budget.message_accepted()
    }

    fn before_read(&mut self, receiving: bool) -> Result<Option<Instant>, Reply> {
        self.budget.before_read(receiving)
    }

    fn received(&mut self, bytes: usize) {
        self.budget.received(bytes)
    }

    fn data_too_slow(&mut self) -> Reply {
        self.budget.data_too_slow()
    }
}
