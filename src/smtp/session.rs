//! One SMTP session as an explicit state machine over a byte stream.
//!
//! Commands are parsed by smtp-proto; replies are queued and flushed when the input
//! runs out (RFC 2920 pipelining). Message content goes through the smuggling-safe
//! readers in `data`. Every wait on the client has a deadline. On STARTTLS the rest of
//! the read buffer is dropped (CVE-2011-0411) and the caller starts a fresh session on
//! the TLS stream (RFC 3207 section 4.2), which never offers STARTTLS again.
//!
//! What a command *means* for the mail is decided behind the [`Stages`] trait (the
//! pipeline); this module only knows the protocol, and reads its settings from the
//! [`SessionLimits`] it was started with.

use super::address;
use super::command::{Command, CommandReader};
use super::data::{Anomalies, BdatReader, DataReader, Progress};
use super::extensions::ehlo_keywords;
use super::metrics;
use super::proxy_header;
use super::reply::{RejectReason, Reply};
use super::session_limits::{SessionLimits, Tls};
use super::stages::Stages;
use crate::config::{BareLineEndings, LongLines};
use crate::shutdown::{Phase, ShutdownListener};
use crate::spool::{MessageBytes, Spool, SpoolError};
use smtp_proto::Request;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// RFC 5321 section 4.5.3.1.6: a text line is at most 998 octets plus CRLF.
const MAX_TEXT_LINE: usize = 998;

/// Where the session is in the protocol.
enum State<T> {
    /// Connected (or just after STARTTLS): EHLO/HELO expected.
    Fresh,
    /// Greeted, no transaction.
    Ready,
    /// MAIL accepted; RCPT, DATA or BDAT expected.
    Envelope(Box<T>),
    /// Receiving DATA content.
    Data(Box<T>, DataReader, Spool),
    /// Reading the octets of a BDAT chunk.
    Chunk {
        message: Box<Chunked<T>>,
        remaining: usize,
        last: bool,
    },
    /// Between BDAT chunks: the next BDAT (or RSET) is expected.
    BetweenChunks(Box<Chunked<T>>),
    /// Reading and dropping a BDAT chunk sent outside a transaction; afterwards the
    /// session is back in `Fresh` or `Ready` and answers `reply`.
    Discard {
        remaining: usize,
        greeted: bool,
        reply: Reply,
    },
    /// Transitional value while a state is being taken apart.
    Busy,
}

/// A message being received in BDAT chunks.
struct Chunked<T> {
    tx: T,
    reader: BdatReader,
    spool: Spool,
    /// Set when the message can no longer be accepted; reported when the chunk ends.
    failure: Option<Reply>,
}

/// How a session ended.
pub enum Ending<S, H> {
    Closed,
    /// The client asked for TLS: the caller handshakes on this stream and starts a new
    /// session with the same stages (connection) and the errors counted so far (the
    /// limit is per connection, or a client could double it with STARTTLS).
    StartTls(S, Box<H>, u32),
}

enum Flow {
    Continue,
    Close,
    StartTls,
}

pub struct Session<S, H: Stages> {
    io: S,
    stages: H,
    limits: SessionLimits,
    state: State<H::Transaction>,
    rbuf: Vec<u8>,
    rpos: usize,
    wbuf: Vec<u8>,
    commands: CommandReader,
    errors: u32,
    shutdown: ShutdownListener,
    /// Whether the first input was looked at for a PROXY header (see `process_command`).
    first_input_seen: bool,
}

const READ_CHUNK: usize = 16 * 1024;
const COMMAND_CHUNK: usize = 1024;

impl<S: AsyncRead + AsyncWrite + Unpin, H: Stages> Session<S, H> {
    pub fn new(io: S, stages: H, limits: SessionLimits, shutdown: ShutdownListener) -> Self {
        Session {
            io,
            stages,
            limits,
            state: State::Fresh,
            rbuf: Vec::new(),
            rpos: 0,
            wbuf: Vec::with_capacity(256),
            commands: CommandReader::default(),
            errors: 0,
            shutdown,
            first_input_seen: false,
        }
    }

    /// A session that goes on after STARTTLS with the errors counted before it.
    pub fn with_errors(mut self, errors: u32) -> Self {
        self.errors = errors;
        self
    }

    /// Runs the session from the 220 greeting (or, after STARTTLS, from the handshake).
    ///
    /// Not an `async fn` taking `self`: its state would hold the session twice (the
    /// argument, and the binding the body moves it into), and an idle session must
    /// stay small. The block below keeps the one it captured, in place.
    pub fn run(self, greet: bool) -> impl Future<Output = Ending<S, H>> {
        let mut session = self;
        async move {
            if greet && !session.greet().await {
                return Ending::Closed;
            }
            let flow = session.serve().await;
            // A transaction still open here was not completed: release its backend.
            session.abort_transaction("disconnect").await;
            match flow {
                Flow::StartTls => {
                    Ending::StartTls(session.io, Box::new(session.stages), session.errors)
                }
                Flow::Close | Flow::Continue => {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), session.io.shutdown()).await;
                    Ending::Closed
                }
            }
        }
    }

    /// The 220 greeting, or the refusal decided at connect (then `false`: close).
    async fn greet(&mut self) -> bool {
        let outcome = self.stages.on_connect();
        metrics::GREETING_SECONDS.observe(self.stages.started().elapsed().as_secs_f64());
        match outcome {
            Ok(()) => {
                let greeting = Reply::greeting(self.stages.hostname());
                self.reply(greeting);
                true
            }
            Err(reply) => {
                metrics::CONNECTIONS_REFUSED
                    .with_label_values(&["policy"])
                    .inc();
                self.reply(reply);
                let _ = self.flush().await;
                false
            }
        }
    }

    async fn serve(&mut self) -> Flow {
        loop {
            // Boxed: processing a command or a message needs far more state than
            // waiting for input does, and an idle session must stay small.
            match Box::pin(self.process_input()).await {
                Flow::Continue => {}
                Flow::StartTls => {
                    if self.flush().await.is_err() {
                        return Flow::Close;
                    }
                    return Flow::StartTls;
                }
                Flow::Close => {
                    let _ = self.flush().await;
                    return Flow::Close;
                }
            }
            if self.flush().await.is_err() {
                return Flow::Close;
            }
            if self.is_idle() && self.shutdown.phase() >= Phase::Draining {
                self.reply(Reply::shutting_down());
                let _ = self.flush().await;
                return Flow::Close;
            }
            match self.read_more().await {
                Ok(true) => {}
                Ok(false) => return Flow::Close,
                Err(reply) => {
                    self.reply(reply);
                    let _ = self.flush().await;
                    return Flow::Close;
                }
            }
        }
    }

    fn is_idle(&self) -> bool {
        matches!(self.state, State::Fresh | State::Ready)
    }

    /// Inside message content, where `limits.min_data_rate` applies (between BDAT
    /// chunks too: a message sent as many tiny chunks is still one message).
    fn is_receiving(&self) -> bool {
        matches!(
            self.state,
            State::Data(..) | State::Chunk { .. } | State::BetweenChunks(_) | State::Discard { .. }
        )
    }

    /// Reads more input. `Ok(false)`: the client closed. `Err`: the reply to send
    /// before closing (timeout, shutdown).
    async fn read_more(&mut self) -> Result<bool, Reply> {
        if self.rpos == self.rbuf.len() {
            self.rbuf.clear();
            self.rpos = 0;
            if self.is_idle() && self.rbuf.capacity() > 64 * 1024 {
                self.rbuf = Vec::new();
            }
        }
        // Commands are short: an idle session holds a small buffer (a thousand idle
        // connections must stay cheap); message content gets bigger reads.
        let want = if matches!(
            self.state,
            State::Data(..) | State::Chunk { .. } | State::Discard { .. }
        ) {
            READ_CHUNK
        } else {
            COMMAND_CHUNK
        };
        if self.rbuf.capacity() - self.rbuf.len() < want / 2 {
            self.rbuf.reserve(want);
        }
        let limit = if self.is_idle() || matches!(self.state, State::Envelope(_)) {
            self.limits.command_timeout
        } else {
            self.limits.data_block_timeout
        };
        // Inside message content the read also ends when the data rate would fall
        // below `limits.min_data_rate`, so a silent client is caught as well.
        let rate_deadline = self.stages.before_read(self.is_receiving())?;
        let now = tokio::time::Instant::now();
        let (limit, too_slow_at_end) = match rate_deadline {
            Some(deadline) if deadline - now < limit => (deadline - now, true),
            _ => (limit, false),
        };
        // Idle sessions stop at the start of a drain; sessions inside a transaction get
        // until the grace period is over.
        let stop_at = if self.is_idle() {
            Phase::Draining
        } else {
            Phase::Forced
        };
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            read = tokio::time::timeout(limit, self.io.read_buf(&mut self.rbuf)) => match read {
                Err(_) if too_slow_at_end => Err(self.stages.data_too_slow()),
                Err(_) => Err(Reply::timeout()),
                Ok(Ok(0)) | Ok(Err(_)) => Ok(false),
                Ok(Ok(n)) => {
                    self.stages.received(n);
                    Ok(true)
                }
            },
            _ = shutdown.reached(stop_at) => Err(Reply::shutting_down()),
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let limit = self.limits.write_timeout;
        let result = tokio::time::timeout(limit, async {
            self.io.write_all(&self.wbuf).await?;
            self.io.flush().await
        })
        .await;
        self.wbuf.clear();
        match result {
            Ok(result) => result,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    /// Queues a reply; counts errors and reports whether the session must end.
    fn reply(&mut self, reply: Reply) -> bool {
        metrics::reply(&reply);
        reply.write_to(&mut self.wbuf);
        if reply.closes_session() {
            return true;
        }
        reply.counts_as_client_error() && self.count_error()
    }

    /// Counts one error; at `max_errors` queues the closing reply and returns true.
    fn count_error(&mut self) -> bool {
        self.errors += 1;
        if self.errors >= self.limits.max_errors {
            let limit = Reply::too_many_errors();
            metrics::reply(&limit);
            limit.write_to(&mut self.wbuf);
            return true;
        }
        false
    }

    /// Answers RCPT. A recipient refused for a limit (`452 4.5.3` past
    /// `server.max_recipients`, `450 4.7.1` past `limits.recipients_per_minute`) is not
    /// an error: a client with a long list is told to send the rest later. But that RCPT
    /// did nothing, so it counts as junk, or a client could go on sending them at wire
    /// speed, each one a rate-store call, without ever reaching `max_errors`.
    fn recipient_reply(&mut self, reply: Reply) -> Flow {
        if reply.reason() == RejectReason::RecipientLimit {
            self.junk_reply(reply)
        } else {
            self.reply_flow(reply)
        }
    }

    /// Answers a command that did nothing (`limits.max_junk_commands`): past the limit
    /// each one counts as an error, so an endless stream of them ends the session.
    fn junk_reply(&mut self, reply: Reply) -> Flow {
        if self.reply(reply) || (self.stages.junk_command() && self.count_error()) {
            Flow::Close
        } else {
            Flow::Continue
        }
    }

    fn reply_flow(&mut self, reply: Reply) -> Flow {
        if self.reply(reply) {
            Flow::Close
        } else {
            Flow::Continue
        }
    }

    /// Consumes buffered input until it runs out or the session must stop.
    async fn process_input(&mut self) -> Flow {
        while self.rpos < self.rbuf.len() && !self.first_input_undecided() {
            let flow = match &self.state {
                State::Data(..) => self.process_data().await,
                State::Chunk { .. } => self.process_chunk().await,
                State::Discard { .. } => self.process_discard(),
                _ => self.process_command().await,
            };
            match flow {
                Flow::Continue => {}
                other => return other,
            }
        }
        Flow::Continue
    }

    /// The first input is too short to tell whether it is a PROXY header: wait for more
    /// (a header split across reads must be refused as one, never read as SMTP).
    fn first_input_undecided(&self) -> bool {
        !self.first_input_seen && proxy_header::may_become_header(&self.rbuf[self.rpos..])
    }

    async fn process_command(&mut self) -> Flow {
        let input = &self.rbuf[self.rpos..];
        // A PROXY header here did not come from a trusted balancer (theirs is read
        // before the session starts). It is never honoured; when it comes with the
        // first bytes, as headers do, it is refused rather than read as SMTP (v2's
        // binary header contains `QUIT\n`).
        if !self.first_input_seen {
            self.first_input_seen = true;
            if proxy_header::looks_like_header(input) {
                self.stages.on_untrusted_proxy_header();
                self.reply(Reply::proxy_header_refused());
                return Flow::Close;
            }
        }
        let (used, command) = self.commands.read(input);
        self.rpos += used;
        match command {
            None => Flow::Continue,
            Some(Command::Request(request)) => self.handle(request).await,
            Some(Command::NullRecipient(_)) if matches!(self.state, State::Envelope(_)) => {
                self.reply_flow(Reply::bad_recipient_syntax())
            }
            // Out of sequence anyway: the state machine gives the reply it gives any RCPT.
            Some(Command::NullRecipient(request)) => self.handle(request).await,
            Some(Command::Refused(reply)) => self.reply_flow(reply),
        }
    }

    async fn handle(&mut self, request: Request<String>) -> Flow {
        match request {
            Request::Ehlo { host } => self.hello(&host, true).await,
            Request::Helo { host } => self.hello(&host, false).await,
            Request::Mail { from } => {
                let state = std::mem::replace(&mut self.state, State::Busy);
                match state {
                    State::Ready if !address::has_valid_domain(&from.address) => {
                        self.state = State::Ready;
                        self.reply_flow(Reply::bad_sender_syntax())
                    }
                    State::Ready
                        if let Err(reply) = Box::pin(self.stages.allow_message()).await =>
                    {
                        self.state = State::Ready;
                        self.reply_flow(reply)
                    }
                    State::Ready => match Box::pin(self.stages.on_mail(from)).await {
                        Ok(tx) => {
                            self.state = State::Envelope(Box::new(tx));
                            self.reply_flow(Reply::mail_ok())
                        }
                        Err(reply) => {
                            self.state = State::Ready;
                            self.reply_flow(reply)
                        }
                    },
                    State::Fresh => {
                        self.state = State::Fresh;
                        self.reply_flow(Reply::bad_sequence("send HELO/EHLO first"))
                    }
                    other => {
                        self.state = other;
                        self.reply_flow(Reply::bad_sequence("nested MAIL command"))
                    }
                }
            }
            Request::Rcpt { to } => {
                if let State::Envelope(tx) = &mut self.state {
                    if !address::has_valid_domain(&to.address) {
                        return self.reply_flow(Reply::bad_recipient_syntax());
                    }
                    if let Err(reply) = Box::pin(self.stages.allow_recipient()).await {
                        return self.recipient_reply(reply);
                    }
                    let reply = Box::pin(self.stages.on_rcpt(tx, to)).await;
                    self.recipient_reply(reply)
                } else {
                    self.reply_flow(Reply::bad_sequence("need MAIL before RCPT"))
                }
            }
            Request::Data => self.start_data(),
            Request::Bdat {
                chunk_size,
                is_last,
            } => {
                self.start_bdat(chunk_size, is_last);
                // An empty chunk (`BDAT 0 LAST`) is complete at once.
                match &self.state {
                    State::Chunk { remaining: 0, .. } => self.end_of_chunk().await,
                    State::Discard { remaining: 0, .. } => self.process_discard(),
                    _ => Flow::Continue,
                }
            }
            Request::Rset => {
                // An RSET that ends a transaction did something; one that does not is
                // junk.
                let did_nothing = self.is_idle();
                self.abort_transaction("rset").await;
                if !matches!(self.state, State::Fresh) {
                    self.state = State::Ready;
                }
                if did_nothing {
                    self.junk_reply(Reply::ok())
                } else {
                    self.reply_flow(Reply::ok())
                }
            }
            Request::Noop { .. } => self.junk_reply(Reply::ok()),
            Request::Quit => {
                self.abort_transaction("quit").await;
                let reply = Reply::quit(self.stages.hostname());
                self.reply(reply);
                Flow::Close
            }
            Request::Vrfy { .. } => self.junk_reply(Reply::vrfy()),
            Request::Help { .. } => self.junk_reply(Reply::help()),
            Request::StartTls => self.start_tls(),
            Request::Expn { .. } => self.reply_flow(Reply::not_implemented("EXPN")),
            Request::Etrn { .. } => self.reply_flow(Reply::not_implemented("ETRN")),
            Request::Atrn { .. } => self.reply_flow(Reply::not_implemented("ATRN")),
            Request::Burl { .. } => self.reply_flow(Reply::not_implemented("BURL")),
            Request::Auth { .. } => {
                self.reply_flow(Reply::bad_sequence("authentication is not offered"))
            }
            Request::Lhlo { .. } => self.reply_flow(Reply::unknown_command()),
        }
    }

    async fn hello(&mut self, host: &str, esmtp: bool) -> Flow {
        // Another EHLO/HELO with no transaction open did nothing for mail but costs a
        // HELO SPF check (DNS) per new name: junk (`limits.max_junk_commands`).
        let repeated = matches!(self.state, State::Ready);
        // A new EHLO/HELO resets any transaction (RFC 5321 section 4.1.4).
        self.abort_transaction("helo").await;
        match self.stages.on_helo(host, esmtp) {
            Err(reply) => self.reply_flow(reply),
            Ok(()) => {
                self.state = State::Ready;
                let hostname = self.stages.hostname().to_string();
                let reply = if esmtp {
                    let starttls = self.limits.tls == Tls::Offered;
                    let keywords = ehlo_keywords(self.limits.max_message_size, starttls);
                    Reply::ehlo(&hostname, host, keywords)
                } else {
                    Reply::helo(&hostname)
                };
                if repeated {
                    self.junk_reply(reply)
                } else {
                    self.reply_flow(reply)
                }
            }
        }
    }

    fn start_tls(&mut self) -> Flow {
        match self.limits.tls {
            Tls::Active => return self.reply_flow(Reply::tls_already_active()),
            Tls::Unavailable => return self.reply_flow(Reply::tls_not_available()),
            Tls::Offered => {}
        }
        match self.state {
            State::Fresh => self.reply_flow(Reply::bad_sequence("send EHLO first")),
            State::Ready => {
                self.reply(Reply::ready_to_start_tls());
                // Whatever the client pipelined after STARTTLS arrived in plaintext and
                // must not be executed inside the TLS session (CVE-2011-0411).
                self.rbuf.clear();
                self.rpos = 0;
                self.commands.reset();
                Flow::StartTls
            }
            _ => self.reply_flow(Reply::bad_sequence("mail transaction in progress")),
        }
    }

    fn new_spool(&self, hint: usize) -> Spool {
        let limits = &self.limits;
        Spool::new(
            limits.max_message_size,
            limits.spool_threshold,
            limits.spool_dir.clone(),
            hint,
        )
    }

    fn start_data(&mut self) -> Flow {
        let state = std::mem::replace(&mut self.state, State::Busy);
        match state {
            State::Envelope(tx) => match self.stages.on_data(&tx) {
                Ok(()) => {
                    let hint = self.stages.declared_size(&tx).unwrap_or(0) as usize;
                    self.state = State::Data(tx, DataReader::new(), self.new_spool(hint));
                    self.reply_flow(Reply::start_data())
                }
                Err(reply) => {
                    self.state = State::Envelope(tx);
                    self.reply_flow(reply)
                }
            },
            State::Fresh => {
                self.state = State::Fresh;
                self.reply_flow(Reply::bad_sequence("send HELO/EHLO first"))
            }
            other => {
                self.state = other;
                self.reply_flow(Reply::bad_sequence("need MAIL and RCPT before DATA"))
            }
        }
    }

    fn start_bdat(&mut self, chunk_size: usize, last: bool) {
        let state = std::mem::replace(&mut self.state, State::Busy);
        self.state = match state {
            State::Envelope(tx) => {
                let failure = self.stages.on_data(&tx).err();
                let hint = self.stages.declared_size(&tx).unwrap_or(0) as usize;
                let spool = self.new_spool(hint.max(chunk_size));
                State::Chunk {
                    message: Box::new(Chunked {
                        tx: *tx,
                        reader: BdatReader::new(),
                        spool,
                        failure,
                    }),
                    remaining: chunk_size,
                    last,
                }
            }
            State::BetweenChunks(message) => State::Chunk {
                message,
                remaining: chunk_size,
                last,
            },
            State::Fresh => State::Discard {
                remaining: chunk_size,
                greeted: false,
                reply: Reply::bad_sequence("send HELO/EHLO first"),
            },
            other => {
                let greeted = !matches!(other, State::Fresh);
                State::Discard {
                    remaining: chunk_size,
                    greeted,
                    reply: Reply::bad_sequence("need MAIL and RCPT before BDAT"),
                }
            }
        };
    }

    async fn process_data(&mut self) -> Flow {
        let State::Data(_, reader, spool) = &mut self.state else {
            return Flow::Continue;
        };
        let input = &self.rbuf[self.rpos..];
        match reader.feed(input, spool) {
            Progress::NeedMore => {
                self.rpos = self.rbuf.len();
                Flow::Continue
            }
            Progress::End { consumed } => {
                self.rpos += consumed;
                let State::Data(tx, reader, spool) =
                    std::mem::replace(&mut self.state, State::Ready)
                else {
                    return Flow::Continue;
                };
                let reply = self.finish_message(*tx, spool, reader.anomalies()).await;
                self.reply_flow(reply)
            }
        }
    }

    /// Reads BDAT chunk octets; at the end of the chunk answers it.
    async fn process_chunk(&mut self) -> Flow {
        let State::Chunk {
            message, remaining, ..
        } = &mut self.state
        else {
            return Flow::Continue;
        };
        let available = self.rbuf.len() - self.rpos;
        let take = available.min(*remaining);
        let chunk = &self.rbuf[self.rpos..self.rpos + take];
        let Chunked { reader, spool, .. } = message.as_mut();
        reader.feed(chunk, spool);
        self.rpos += take;
        *remaining -= take;
        if *remaining > 0 {
            return Flow::Continue;
        }
        self.end_of_chunk().await
    }

    /// A zero-length chunk ends immediately; otherwise called when the octets are in.
    async fn end_of_chunk(&mut self) -> Flow {
        let State::Chunk { message, last, .. } = std::mem::replace(&mut self.state, State::Ready)
        else {
            return Flow::Continue;
        };
        let mut message = *message;
        let failure = message
            .failure
            .take()
            .or_else(|| message.spool.overflowed().then(Reply::message_too_big));
        if let Some(reply) = failure {
            let reply = Box::pin(self.stages.refuse_message(message.tx, reply)).await;
            return self.reply_flow(reply);
        }
        if !last {
            let size = message.spool.len() as usize;
            self.state = State::BetweenChunks(Box::new(message));
            return self.reply_flow(Reply::bdat_chunk_ok(size));
        }
        let Chunked {
            tx,
            mut reader,
            mut spool,
            ..
        } = message;
        reader.finish(&mut spool);
        let reply = self.finish_message(tx, spool, reader.anomalies()).await;
        self.reply_flow(reply)
    }

    fn process_discard(&mut self) -> Flow {
        let State::Discard { remaining, .. } = &mut self.state else {
            return Flow::Continue;
        };
        let take = (self.rbuf.len() - self.rpos).min(*remaining);
        self.rpos += take;
        *remaining -= take;
        if *remaining > 0 {
            return Flow::Continue;
        }
        let State::Discard { greeted, reply, .. } = std::mem::replace(&mut self.state, State::Busy)
        else {
            return Flow::Continue;
        };
        self.state = if greeted { State::Ready } else { State::Fresh };
        self.reply_flow(reply)
    }

    /// The reply to a message that arrived in full. The stages' futures are boxed here
    /// and at MAIL and RCPT: they are the large ones (checks, relay), and unboxed they
    /// would make `process_input`'s future, built anew for every read, that large too.
    async fn finish_message(
        &mut self,
        tx: H::Transaction,
        spool: Spool,
        anomalies: Anomalies,
    ) -> Reply {
        let reply = match self.message_bytes(spool, &anomalies) {
            Ok(bytes) => Box::pin(self.stages.on_message(tx, bytes)).await,
            Err(refusal) => return Box::pin(self.stages.refuse_message(tx, refusal)).await,
        };
        if reply.is_positive() {
            self.stages.message_accepted();
        }
        reply
    }

    /// The message's bytes, or the reply that refuses it before any check.
    fn message_bytes(&self, spool: Spool, anomalies: &Anomalies) -> Result<MessageBytes, Reply> {
        if anomalies.any() && self.limits.bare_line_endings == BareLineEndings::Reject {
            return Err(Reply::bare_line_ending());
        }
        if self.limits.long_lines == LongLines::Reject && anomalies.longest_line > MAX_TEXT_LINE {
            tracing::info!(
                longest_line = anomalies.longest_line,
                "message refused: a text line is longer than RFC 5321 allows (server.long_lines: reject)"
            );
            return Err(Reply::line_too_long_in_message(anomalies.longest_line));
        }
        spool.finish().map_err(|err| match err {
            SpoolError::TooBig => Reply::message_too_big(),
            SpoolError::Io(err) => {
                tracing::error!(error = %err, "cannot spool message");
                Reply::spool_error()
            }
        })
    }

    /// Ends a transaction that did not reach the end of data.
    async fn abort_transaction(&mut self, reason: &'static str) {
        let state = std::mem::replace(&mut self.state, State::Busy);
        let (tx, next) = match state {
            State::Envelope(tx) | State::Data(tx, ..) => (Some(*tx), State::Ready),
            State::Chunk { message, .. } | State::BetweenChunks(message) => {
                (Some(message.tx), State::Ready)
            }
            other => (None, other),
        };
        self.state = next;
        if let Some(tx) = tx {
            // Boxed for the same reason as `process_input`: rare, and large.
            Box::pin(self.stages.on_abort(tx, reason)).await;
        }
    }
}

#[cfg(test)]
mod tests;
