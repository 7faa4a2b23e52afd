//! The session alone: real protocol bytes over `tokio::io::duplex`, a scripted fake
//! behind the [`Stages`] seam (it records every call and answers what the test says),
//! and a paused clock, so every deadline is tested exactly and instantly. The socket
//! tests in `tests/` stay the black-box layer over the real pipeline.
//!
//! Every test runs with `start_paused`: nothing here does real I/O, so the clock only
//! moves when the session and the client both wait, which is exactly when a deadline
//! is what happens next.

use super::*;
use crate::shutdown::Shutdown;
use crate::smtp::reply::Status;
use smtp_proto::{MailFrom, RcptTo};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{DuplexStream, ReadBuf};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What the fake stages answer.
#[derive(Clone, Default)]
struct Script {
    refuse_connect: Option<Reply>,
    /// RCPT replies by address; others get `250 2.1.5`.
    rcpt: HashMap<&'static str, Reply>,
    /// The reply to a complete message; `250 2.0.0 OK: queued as FAKE` when unset.
    message: Option<Reply>,
    /// The budget: junk commands allowed before each one counts as an error.
    junk_allowed: Option<u32>,
    /// The budget: message content must be complete this long after it started.
    data_window: Option<Duration>,
    /// The budget: MAIL refused for the message rate.
    message_rate_exceeded: bool,
}

/// What the fake was asked, in order, and the messages it took.
#[derive(Default)]
struct Log {
    calls: Vec<String>,
    messages: Vec<Vec<u8>>,
}

struct Fake {
    script: Script,
    log: Arc<Mutex<Log>>,
    junk: u32,
    receiving_since: Option<Instant>,
    started: Instant,
}

struct FakeTx {
    rcpts: Vec<String>,
    size: Option<u64>,
}

impl Fake {
    fn note(&self, call: impl Into<String>) {
        self.log.lock().unwrap().calls.push(call.into());
    }
}

impl Stages for Fake {
    type Transaction = FakeTx;

    fn hostname(&self) -> &str {
        "mx.test"
    }

    fn started(&self) -> Instant {
        self.started
    }

    fn on_connect(&mut self) -> Result<(), Reply> {
        self.note("connect");
        match self.script.refuse_connect.clone() {
            Some(reply) => Err(reply),
            None => Ok(()),
        }
    }

    fn on_helo(&mut self, name: &str, esmtp: bool) -> Result<(), Reply> {
        self.note(format!("{} {name}", if esmtp { "ehlo" } else { "helo" }));
        Ok(())
    }

    async fn on_mail(&mut self, mail: MailFrom<String>) -> Result<FakeTx, Reply> {
        self.note(format!("mail {}", mail.address));
        Ok(FakeTx {
            rcpts: Vec::new(),
            size: (mail.size > 0).then_some(mail.size as u64),
        })
    }

    async fn on_rcpt(&mut self, tx: &mut FakeTx, rcpt: RcptTo<String>) -> Reply {
        self.note(format!("rcpt {}", rcpt.address));
        let reply = self
            .script
            .rcpt
            .get(rcpt.address.as_str())
            .cloned()
            .unwrap_or_else(Reply::rcpt_ok);
        if reply.is_positive() {
            tx.rcpts.push(rcpt.address);
        }
        reply
    }

    fn on_data(&self, tx: &FakeTx) -> Result<(), Reply> {
        self.note("data");
        if tx.rcpts.is_empty() {
            return Err(Reply::no_valid_recipients());
        }
        Ok(())
    }

    fn declared_size(&self, tx: &FakeTx) -> Option<u64> {
        tx.size
    }

    async fn on_message(&mut self, _tx: FakeTx, message: MessageBytes) -> Reply {
        self.note(format!("message {}", message.len()));
        self.log.lock().unwrap().messages.push(message.to_vec());
        self.script
            .message
            .clone()
            .unwrap_or_else(|| Reply::delivered("FAKE"))
    }

    async fn refuse_message(&mut self, _tx: FakeTx, reply: Reply) -> Reply {
        self.note(format!("refused {}", reply.code()));
        reply
    }

    async fn on_abort(&mut self, _tx: FakeTx, reason: &'static str) {
        self.note(format!("abort {reason}"));
    }

    fn on_untrusted_proxy_header(&mut self) {
        self.note("proxy header");
    }

    async fn allow_message(&mut self) -> Result<(), Reply> {
        if self.script.message_rate_exceeded {
            return Err(Reply::message_rate_exceeded());
        }
        Ok(())
    }

    async fn allow_recipient(&mut self) -> Result<(), Reply> {
        Ok(())
    }

    fn junk_command(&mut self) -> bool {
        self.junk += 1;
        self.script.junk_allowed.is_some_and(|max| self.junk > max)
    }

    fn message_accepted(&mut self) {
        self.note("accepted");
        self.junk = 0;
    }

    fn before_read(&mut self, receiving: bool) -> Result<Option<Instant>, Reply> {
        if !receiving {
            self.receiving_since = None;
            return Ok(None);
        }
        let now = Instant::now();
        let since = *self.receiving_since.get_or_insert(now);
        match self.script.data_window.map(|window| since + window) {
            Some(deadline) if now >= deadline => Err(self.data_too_slow()),
            other => Ok(other),
        }
    }

    fn received(&mut self, _bytes: usize) {}

    fn data_too_slow(&mut self) -> Reply {
        self.note("data too slow");
        Reply::data_rate_too_low()
    }
}

/// The session's end of the duplex, counting flushes (one per batch of replies).
struct Io {
    inner: DuplexStream,
    flushes: Arc<AtomicUsize>,
}

impl AsyncRead for Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn limits() -> SessionLimits {
    SessionLimits {
        command_timeout: Duration::from_secs(300),
        data_block_timeout: Duration::from_secs(180),
        write_timeout: Duration::from_secs(120),
        max_errors: 10,
        max_message_size: 10_000,
        spool_threshold: 1 << 20,
        spool_dir: None,
        bare_line_endings: BareLineEndings::Normalize,
        long_lines: LongLines::Pass,
        tls: Tls::Offered,
    }
}

/// No test waits this long for a reply: past it (instantly, the clock being paused)
/// the session is stuck and the test fails instead of hanging.
const STUCK: Duration = Duration::from_secs(24 * 3600);

/// The client side of one session, transcript style.
struct Transcript {
    client: DuplexStream,
    /// Reply bytes read but not yet taken.
    pending: Vec<u8>,
    log: Arc<Mutex<Log>>,
    flushes: Arc<AtomicUsize>,
    shutdown: Shutdown,
    session: JoinHandle<Ending<Io, Fake>>,
}

impl Transcript {
    /// Starts a session (greeting first) and reads its first reply.
    async fn start(limits: SessionLimits, script: Script) -> Self {
        let mut t = Self::spawn(limits, script, 64 * 1024, true, 0);
        t.expect("220").await;
        t
    }

    fn spawn(
        limits: SessionLimits,
        script: Script,
        buffer: usize,
        greet: bool,
        errors: u32,
    ) -> Self {
        let (client, server) = tokio::io::duplex(buffer);
        let log = Arc::new(Mutex::new(Log::default()));
        let flushes = Arc::new(AtomicUsize::new(0));
        let fake = Fake {
            script,
            log: log.clone(),
            junk: 0,
            receiving_since: None,
            started: Instant::now(),
        };
        let io = Io {
            inner: server,
            flushes: flushes.clone(),
        };
        let shutdown = Shutdown::new();
        let session = Session::new(io, fake, limits, shutdown.listener()).with_errors(errors);
        Transcript {
            client,
            pending: Vec::new(),
            log,
            flushes,
            shutdown,
            session: tokio::spawn(session.run(greet)),
        }
    }

    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.client.write_all(bytes.as_ref()).await.unwrap();
    }

    /// Sends one command line and checks the reply to it.
    async fn cmd(&mut self, line: &str, expect: &str) -> String {
        self.send(format!("{line}\r\n")).await;
        self.expect(expect).await
    }

    /// Reads the next reply and checks that it starts with `expect` (a code, or a code
    /// and an enhanced status code: `"503 5.5.1"`). Returns its text.
    async fn expect(&mut self, expect: &str) -> String {
        let reply = self.reply().await;
        let last = reply.lines().last().unwrap_or_default();
        assert!(
            last.starts_with(expect) && reply.lines().all(|line| line.starts_with(&expect[..3])),
            "expected {expect}, got:\n{reply}\ncalls: {:?}",
            self.calls()
        );
        reply
    }

    /// The next complete reply (all its lines, LF-joined).
    async fn reply(&mut self) -> String {
        loop {
            if let Some(end) = complete_reply(&self.pending) {
                let reply: Vec<u8> = self.pending.drain(..end).collect();
                let text = String::from_utf8(reply).unwrap();
                return text.trim_end().replace("\r\n", "\n");
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(STUCK, self.client.read(&mut buf))
                .await
                .expect("the session is stuck")
                .unwrap();
            assert!(
                n > 0,
                "the session closed; unfinished reply: {:?}; calls: {:?}",
                String::from_utf8_lossy(&self.pending),
                self.calls()
            );
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    /// The session closed its side, with no reply left unread.
    async fn closed(&mut self) {
        let mut rest = Vec::new();
        tokio::time::timeout(STUCK, self.client.read_to_end(&mut rest))
            .await
            .expect("the session did not close")
            .unwrap();
        self.pending.extend_from_slice(&rest);
        assert!(
            self.pending.is_empty(),
            "unread replies at close: {:?}",
            String::from_utf8_lossy(&self.pending)
        );
    }

    async fn ending(self) -> Ending<Io, Fake> {
        tokio::time::timeout(STUCK, self.session)
            .await
            .expect("the session did not end")
            .unwrap()
    }

    fn calls(&self) -> Vec<String> {
        self.log.lock().unwrap().calls.clone()
    }

    fn messages(&self) -> Vec<Vec<u8>> {
        self.log.lock().unwrap().messages.clone()
    }

    fn flushes(&self) -> usize {
        self.flushes.load(Ordering::SeqCst)
    }

    /// EHLO, MAIL and one accepted RCPT.
    async fn envelope(&mut self) {
        self.cmd("EHLO client.test", "250").await;
        self.cmd("MAIL FROM:<a@sender.test>", "250 2.1.0").await;
        self.cmd("RCPT TO:<b@mx.test>", "250 2.1.5").await;
    }
}

/// Where the first complete reply in `bytes` ends, if it is all there.
fn complete_reply(bytes: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(pos) = memchr::memchr(b'\n', &bytes[start..]) {
        let line = &bytes[start..start + pos + 1];
        start += pos + 1;
        if line.get(3) != Some(&b'-') {
            return Some(start);
        }
    }
    None
}

fn ehlo_has(reply: &str, keyword: &str) -> bool {
    reply.lines().any(|line| &line[4..] == keyword)
}

// Greeting and EHLO.

#[tokio::test(start_paused = true)]
async fn greets_with_the_hostname_after_on_connect() {
    let mut t = Transcript::spawn(limits(), Script::default(), 4096, true, 0);
    assert_eq!(t.expect("220").await, "220 mx.test ESMTP mxgate");
    assert_eq!(t.calls(), ["connect"]);
}

#[tokio::test(start_paused = true)]
async fn a_refused_connection_gets_the_refusal_and_is_closed() {
    let script = Script {
        refuse_connect: Some(Reply::policy(554, Some(Status(5, 7, 1)), "go away")),
        ..Script::default()
    };
    let mut t = Transcript::spawn(limits(), script, 4096, true, 0);
    assert_eq!(t.expect("554 5.7.1").await, "554 5.7.1 go away");
    t.closed().await;
    assert!(matches!(t.ending().await, Ending::Closed));
}

#[tokio::test(start_paused = true)]
async fn ehlo_lists_size_and_offers_starttls_only_when_offered() {
    let mut t = Transcript::start(limits(), Script::default()).await;
    let reply = t.cmd("EHLO client.test", "250").await;
    assert!(
        reply.starts_with("250-mx.test greets client.test"),
        "{reply}"
    );
    for keyword in ["PIPELINING", "SIZE 10000", "CHUNKING", "STARTTLS"] {
        assert!(ehlo_has(&reply, keyword), "{keyword} missing:\n{reply}");
    }
    assert_eq!(t.calls(), ["connect", "ehlo client.test"]);

    for tls in [Tls::Unavailable, Tls::Active] {
        let mut t = Transcript::start(SessionLimits { tls, ..limits() }, Script::default()).await;
        let reply = t.cmd("EHLO client.test", "250").await;
        assert!(!ehlo_has(&reply, "STARTTLS"), "{tls:?}:\n{reply}");
        assert!(ehlo_has(&reply, "SIZE 10000"), "{tls:?}:\n{reply}");
    }
}

#[tokio::test(start_paused = true)]
async fn helo_gets_one_line_without_keywords() {
    let mut t = Transcript::start(limits(), Script::default()).await;
    assert_eq!(t.cmd("HELO client.test", "250").await, "250 mx.test");
    assert_eq!(t.calls(), ["connect", "helo client.test"]);
}

// Command order and errors.

#[tokio::test(start_paused = true)]
async fn commands_out_of_order_get_503_5_5_1() {
    let mut t = Transcript::start(limits(), Script::default()).await;
    t.cmd("MAIL FROM:<a@sender.test>", "503 5.5.1").await;
    t.cmd("EHLO client.test", "250").await;
    t.cmd("RCPT TO:<b@mx.test>", "503 5.5.1").await;
    t.cmd("DATA", "503 5.5.1").await;
    t.cmd("MAIL FROM:<a@sender.test>", "250 2.1.0").await;
    t.cmd("MAIL FROM:<a@sender.test>", "503 5.5.1").await;
    // DATA with no accepted recipient is refused by the stages.
    t.cmd("DATA", "554 5.5.1").await;
    assert_eq!(
        t.calls(),
        ["connect", "ehlo client.test", "mail a@sender.test", "data"]
    );
}

#[tokio::test(start_paused = true)]
async fn max_errors_ends_the_session_with_421() {
    let limits = SessionLimits {
        max_errors: 3,
        ..limits()
    };
    let mut t = Transcript::start(limits, Script::default()).await;
    t.cmd("BOGUS", "500 5.5.2").await;
    t.cmd("RCPT TO:<b@mx.test>", "503 5.5.1").await;
    t.send("BOGUS\r\n").await;
    t.expect("500 5.5.2").await;
    t.expect("421 4.7.0").await;
    t.closed().await;
    assert!(matches!(t.ending().await, Ending::Closed));
}

#[tokio::test(start_paused = true)]
async fn junk_past_the_budget_counts_as_errors() {
    let limits = SessionLimits {
        max_errors: 2,
        ..limits()
    };
    let script = Script {
        junk_allowed: Some(3),
        ..Script::default()
    };
    let mut t = Transcript::start(limits, script).await;
    for _ in 0..4 {
        t.cmd("NOOP", "250 2.0.0").await;
    }
    t.send("NOOP\r\n").await;
    t.expect("250 2.0.0").await;
    t.expect("421 4.7.0").await;
    t.closed().await;
}

#[tokio::test(start_paused = true)]
async fn a_proxy_header_from_the_client_is_refused_and_reported() {
    let mut t = Transcript::spawn(limits(), Script::default(), 4096, true, 0);
    t.expect("220").await;
    // Split across writes: the session must wait for enough bytes to tell.
    t.send("PRO").await;
    tokio::task::yield_now().await;
    t.send("XY TCP4 192.0.2.1 192.0.2.2 1 25\r\nEHLO x.test\r\n")
        .await;
    t.expect("554 5.7.1").await;
    t.closed().await;
    assert_eq!(t.calls(), ["connect", "proxy header"]);
}

// Pipelining.

#[tokio::test(start_paused = true)]
async fn pipelined_commands_get_their_replies_in_one_flush() {
    let mut t = Transcript::start(limits(), Script::default()).await;
    t.cmd("EHLO client.test", "250").await;
    let before = t.flushes();
    t.send("MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@mx.test>\r\nRCPT TO:<c@mx.test>\r\nDATA\r\n")
        .await;
    t.expect("250 2.1.0").await;
    t.expect("250 2.1.5").await;
    t.expect("250 2.1.5").await;
    t.expect("354").await;
    assert_eq!(t.flushes() - before, 1, "one flush for the batch");
}

#[tokio::test(start_paused = true)]
async fn a_malformed_pipelined_command_gets_one_reply_and_the_next_its_own() {
    // Found by the command_reader fuzz target: smtp-proto read `RCPT TO` on past its
    // line into the next command and answered both with one reply.
    let mut t = Transcript::start(limits(), Script::default()).await;
    t.cmd("EHLO client.test", "250").await;
    t.send("MAIL FROM:<a@sender.test>\r\nRCPT TO\r\nRCPT TO:<b@mx.test>\r\nRSET\r\n")
        .await;
    t.expect("250 2.1.0").await;
    t.expect("501 5.5.4").await;
    t.expect("250 2.1.5").await;
    t.expect("250 2.0.0").await;
}

// DATA.

#[tokio::test(start_paused = true)]
async fn only_crlf_dot_crlf_ends_data() {
    let mut t = Transcript::start(limits(), Script::default()).await;
    t.envelope().await;
    t.cmd("DATA", "354").await;
    t.send("Subject: s\r\n\r\na\n.\nb\r\n.\nc\n.\r\nd\r.\re\r\n")
        .await;
    t.send(".\r\n").await;
    t.expect("250 2.0.0").await;
    // Each lone dot that touches a bare line ending is a content line (the reader's
    // output is content, not dot-stuffed), and every line ending is CRLF.
    let expected = b"Subject: s\r\n\r\na\r\n.\r\nb\r\n.\r\nc\r\n.\r\nd\r\n.\r\ne\r\n";
    assert_eq!(t.messages(), [expected.to_vec()]);
    t.cmd("NOOP", "250").await;
    let message = format!("message {}", expected.len());
    assert_eq!(t.calls()[4..], ["data", message.as_str(), "accepted"]);
}

#[tokio::test(start_paused = true)]
async fn commands_pipelined_after_the_end_of_data_are_read_as_commands() {
    let mut t = Transcript::start(limits(), Script::default()).await;
    t.envelope().await;
    t.cmd("DATA", "354").await;
    t.send("Subject: s\r\n\r\nbody\r\n.\r\nRSET\r\nQUIT\r\n")
        .await;
    t.expect("250 2.0.0").await;
    t.expect("250 2.0.0").await;
    t.expect("221 2.0.0").await;
    t.closed().await;
    assert_eq!(t.messages(), [b"Subject: s\r\n\r\nbody\r\n".to_vec()]);
}

#[tokio::test(start_paused = true)]
async fn bare_line_endings_are_normalized_or_refused_per_setting() {
    let message = "Subject: s\r\n\r\none\ntwo\r\n.\r\n";
    let mut t = Transcript::start(limits(), Script::default()).await;
    t.envelope().await;
    t.cmd("DATA", "354").await;
    t.send(message).await;
    t.expect("250 2.0.0").await;
    assert_eq!(t.messages(), [b"Subject: s\r\n\r\none\r\ntwo\r\n".to_vec()]);

    let reject = SessionLimits {
        bare_line_endings: BareLineEndings::Reject,
        ..limits()
    };
    let mut t = Transcript::start(reject, Script::default()).await;
    t.envelope().await;
    t.cmd("DATA", "354").await;
    t.send(message).await;
    t.expect("550 5.5.2").await;
    assert!(t.messages().is_empty());
    assert_eq!(t.calls().last().unwrap(), "refused 550");
    // The transaction is over; the session goes on.
    t.cmd("RCPT TO:<b@mx.test>", "503 5.5.1").await;
}

#[tokio::test(start_paused = true)]
async fn long_lines_pass_or_are_refused_per_setting() {
    let message = format!("Subject: s\r\n\r\n{}\r\n.\r\n", "x".repeat(999));
    let mut t = Transcript::start(limits(), Script::default()).await;
    t.envelope().await;
    t.cmd("DATA", "354").await;
    t.send(&message).await;
    t.expect("250 2.0.0").await;
    assert_eq!(t.messages().len(), 1);

    let reject = SessionLimits {
        long_lines: LongLines::Reject,
        ..limits()
    };
    let mut t = Transcript::start(reject, Script::default()).await;
    t.envelope().await;
    t.cmd("DATA", "354").await;
    // 998 octets are allowed (RFC 5321 4.5.3.1.6).
    t.send(format!("Subject: s\r\n\r\n{}\r\n.\r\n", "x".repeat(998)))
        .await;
    t.expect("250 2.0.0").await;
    t.envelope().await;
    t.cmd("DATA", "354").await;
    t.send(&message).await;
    t.expect("550 5.6.0").await;
    assert_eq!(t.messages().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_message_over_the_size_limit_gets_552() {
    let small = SessionLimits {
        max_message_size: 100,
        ..limits()
    };
    let mut t = Transcript::start(small.clone(), Script::default()).await;
    t.envelope().await;
    t.cmd("DATA", "354").await;
    t.send(format!("Subject: s\r\n\r\n{}\r\n.\r\n", "x".repeat(200)))
        .await;
    t.expect("552 5.3.4").await;
    assert!(t.messages().is_empty());
    assert_eq!(t.calls().last().unwrap(), "refused 552");

    // In BDAT the chunk that goes over is answered, and the message is over.
    let mut t = Transcript::start(small, Script::default()).await;
    t.envelope().await;
    t.send(format!("BDAT 150\r\n{}", "x".repeat(150))).await;
    t.expect("552 5.3.4").await;
    t.cmd("BDAT 0 LAST", "503 5.5.1").await;
    assert!(t.messages().is_empty());
}

// BDAT.

#[tokio::test(start_paused = true)]
async fn bdat_chunks_make_one_message() {
    let mut t = Transcript::start(limits(), Script::default()).await;
    t.envelope().await;
    t.send("BDAT 12\r\nSubject: s\r\n").await;
    assert_eq!(t.expect("250 2.0.0").await, "250 2.0.0 12 octets received");
    // Octets are octets: a dot line and a command inside a chunk are content.
    t.send("BDAT 17\r\n\r\n.\r\nQUIT\r\nbody\r\n").await;
    t.expect("250 2.0.0 29 octets").await;
    t.cmd("BDAT 0 LAST", "250 2.0.0 OK: queued as FAKE").await;
    assert_eq!(
        t.messages(),
        [b"Subject: s\r\n\r\n.\r\nQUIT\r\nbody\r\n".to_vec()]
    );
    t.cmd("RCPT TO:<b@mx.test>", "503 5.5.1").await;
}

#[tokio::test(start_paused = true)]
async fn bdat_outside_a_transaction_is_refused_and_its_octets_dropped() {
    let mut t = Transcript::start(limits(), Script::default()).await;
    t.send("BDAT 6\r\nQUIT\r\n").await;
    t.expect("503 5.5.1").await;
    t.cmd("EHLO client.test", "250").await;
    t.send("BDAT 6 LAST\r\nQUIT\r\n").await;
    t.expect("503 5.5.1").await;
    // The QUIT inside the chunks was never a command.
    t.cmd("NOOP", "250 2.0.0").await;
    assert_eq!(t.calls(), ["connect", "ehlo client.test"]);
}

// RSET, QUIT, STARTTLS.

#[tokio::test(start_paused = true)]
async fn rset_ends_the_transaction() {
    let mut t = Transcript::start(limits(), Script::default()).await;
    t.envelope().await;
    t.cmd("RSET", "250 2.0.0").await;
    assert_eq!(t.calls().last().unwrap(), "abort rset");
    t.cmd("RCPT TO:<b@mx.test>", "503 5.5.1").await;
    t.cmd("MAIL FROM:<a@sender.test>", "250 2.1.0").await;
}

#[tokio::test(start_paused = true)]
async fn quit_says_goodbye_closes_and_aborts_an_open_transaction() {
    let mut t = Transcript::start(limits(), Script::default()).await;
    t.envelope().await;
    t.send("QUIT\r\nNOOP\r\n").await;
    assert_eq!(
        t.expect("221 2.0.0").await,
        "221 2.0.0 mx.test closing connection"
    );
    t.closed().await;
    assert_eq!(t.calls().last().unwrap(), "abort quit");
    assert!(matches!(t.ending().await, Ending::Closed));
}

#[tokio::test(start_paused = true)]
async fn starttls_hands_the_stream_back_and_drops_pipelined_plaintext() {
    let mut t = Transcript::start(limits(), Script::default()).await;
    t.cmd("EHLO client.test", "250").await;
    t.cmd("BOGUS", "500").await;
    t.send("STARTTLS\r\nMAIL FROM:<a@sender.test>\r\n").await;
    t.expect("220 2.0.0").await;
    let calls = t.calls();
    match t.ending().await {
        Ending::StartTls(_, _, errors) => {
            assert_eq!(errors, 1, "the error count goes on after STARTTLS");
        }
        Ending::Closed => panic!("STARTTLS did not hand the stream back"),
    }
    assert_eq!(calls, ["connect", "ehlo client.test"], "MAIL was executed");
}

#[tokio::test(start_paused = true)]
async fn starttls_is_refused_when_unavailable_active_or_out_of_place() {
    let mut t = Transcript::start(limits(), Script::default()).await;
    t.cmd("STARTTLS", "503 5.5.1").await;
    t.envelope().await;
    t.cmd("STARTTLS", "503 5.5.1").await;
    t.cmd("RSET", "250").await;
    t.cmd("STARTTLS now", "501 5.5.4").await;

    let unavailable = SessionLimits {
        tls: Tls::Unavailable,
        ..limits()
    };
    let mut t = Transcript::start(unavailable, Script::default()).await;
    t.cmd("EHLO client.test", "250").await;
    t.cmd("STARTTLS", "454 4.7.0").await;

    // After the handshake: a fresh session, no greeting, errors carried over.
    let active = SessionLimits {
        tls: Tls::Active,
        max_errors: 3,
        ..limits()
    };
    let mut t = Transcript::spawn(active, Script::default(), 4096, false, 2);
    t.cmd("EHLO client.test", "250").await;
    t.send("STARTTLS\r\n").await;
    t.expect("503 5.5.1").await;
    t.expect("421 4.7.0").await;
    t.closed().await;
}

// Refusals from the stages.

#[tokio::test(start_paused = true)]
async fn refusals_of_the_stages_reach_the_client() {
    let script = Script {
        rcpt: HashMap::from([(
            "nobody@mx.test",
            Reply::from_backend(550, Some(Status(5, 1, 1)), &["no such user"]),
        )]),
        message: Some(Reply::backend_unavailable()),
        ..Script::default()
    };
    let mut t = Transcript::start(limits(), script).await;
    t.envelope().await;
    t.cmd("RCPT TO:<nobody@mx.test>", "550 5.1.1").await;
    t.cmd("DATA", "354").await;
    t.send("Subject: s\r\n\r\nbody\r\n.\r\n").await;
    t.expect("451").await;
    assert!(
        !t.calls().iter().any(|c| c == "accepted"),
        "a refused message counted as accepted: {:?}",
        t.calls()
    );
}

#[tokio::test(start_paused = true)]
async fn the_message_rate_refuses_mail() {
    let script = Script {
        message_rate_exceeded: true,
        ..Script::default()
    };
    let mut t = Transcript::start(limits(), script).await;
    t.cmd("EHLO client.test", "250").await;
    t.cmd("MAIL FROM:<a@sender.test>", "450 4.7.1").await;
    assert_eq!(t.calls(), ["connect", "ehlo client.test"]);
}

// Deadlines (the clock is paused: each wait ends exactly at its deadline).

#[tokio::test(start_paused = true)]
async fn an_idle_client_gets_421_at_the_command_timeout() {
    let mut t = Transcript::start(limits(), Script::default()).await;
    t.cmd("EHLO client.test", "250").await;
    let start = Instant::now();
    t.expect("421 4.4.2").await;
    assert_eq!(start.elapsed(), Duration::from_secs(300));
    t.closed().await;

    // Inside a transaction, before DATA, the command timeout applies too.
    let mut t = Transcript::start(limits(), Script::default()).await;
    t.envelope().await;
    let start = Instant::now();
    t.expect("421 4.4.2").await;
    assert_eq!(start.elapsed(), Duration::from_secs(300));
    assert_eq!(t.calls().last().unwrap(), "abort disconnect");
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_in_data_gets_421_at_the_data_timeout() {
    let mut t = Transcript::start(limits(), Script::default()).await;
    t.envelope().await;
    t.cmd("DATA", "354").await;
    t.send("Subject: s\r\n").await;
    let start = Instant::now();
    t.expect("421 4.4.2").await;
    assert_eq!(start.elapsed(), Duration::from_secs(180));
    t.closed().await;
    assert!(t.messages().is_empty());
    assert_eq!(t.calls().last().unwrap(), "abort disconnect");

    // Between BDAT chunks too.
    let mut t = Transcript::start(limits(), Script::default()).await;
    t.envelope().await;
    t.send("BDAT 4\r\nab").await;
    let start = Instant::now();
    t.expect("421 4.4.2").await;
    assert_eq!(start.elapsed(), Duration::from_secs(180));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_does_not_read_is_dropped_at_the_write_timeout() {
    // A small pipe the client never drains: the replies to many pipelined commands
    // cannot all be written.
    let mut t = Transcript::spawn(limits(), Script::default(), 256, true, 0);
    let start = Instant::now();
    // 252 octets: they fit in the pipe, the replies to them do not.
    let ehlos = "EHLO client.test\r\n".repeat(14);
    t.send(&ehlos).await;
    let ending = t.session;
    let ending = tokio::time::timeout(STUCK, ending).await.unwrap().unwrap();
    assert!(matches!(ending, Ending::Closed));
    assert_eq!(start.elapsed(), Duration::from_secs(120));
}

#[tokio::test(start_paused = true)]
async fn data_below_the_minimum_rate_is_cut_by_the_budget_deadline() {
    let script = Script {
        data_window: Some(Duration::from_secs(30)),
        ..Script::default()
    };
    let mut t = Transcript::start(limits(), script).await;
    t.envelope().await;
    t.cmd("DATA", "354").await;
    let start = Instant::now();
    t.send("Subject: s\r\n").await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    t.send("more\r\n").await;
    // The deadline holds across reads: 30 s after content started, not after the
    // last read, and before the 180 s data timeout.
    t.expect("421 4.4.2 Data rate too low").await;
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    t.closed().await;
    assert!(t.calls().contains(&"data too slow".to_string()));
}

#[tokio::test(start_paused = true)]
async fn shutdown_closes_idle_sessions_at_once_and_busy_ones_when_forced() {
    let mut t = Transcript::start(limits(), Script::default()).await;
    t.cmd("EHLO client.test", "250").await;
    let start = Instant::now();
    t.shutdown.set(Phase::Draining);
    t.expect("421 4.3.2").await;
    assert_eq!(start.elapsed(), Duration::ZERO);
    t.closed().await;

    // A transaction in flight may finish during the drain...
    let mut t = Transcript::start(limits(), Script::default()).await;
    t.envelope().await;
    t.shutdown.set(Phase::Draining);
    tokio::time::sleep(Duration::from_secs(10)).await;
    t.cmd("DATA", "354").await;
    t.send("Subject: s\r\n").await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    // ...until the grace period is over.
    t.shutdown.set(Phase::Forced);
    t.expect("421 4.3.2").await;
    t.closed().await;
    assert!(t.messages().is_empty());
    assert_eq!(t.calls().last().unwrap(), "abort disconnect");

    // A transaction that completes during the drain is answered, then the session,
    // idle again, closes.
    let mut t = Transcript::start(limits(), Script::default()).await;
    t.envelope().await;
    t.cmd("DATA", "354").await;
    t.shutdown.set(Phase::Draining);
    t.send("Subject: s\r\n\r\nbody\r\n.\r\n").await;
    t.expect("250 2.0.0").await;
    t.expect("421 4.3.2").await;
    t.closed().await;
}
