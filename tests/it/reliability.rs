//! The reliability ledger: N messages with unique ledger ids from concurrent clients
//! through the real `mxgate` binary into a fault-injecting mailbox server, while the
//! gateway is killed with SIGKILL at random moments and restarted.
//!
//! The backend, on a seeded schedule, answers 4xx or drops the connection at RCPT, and
//! at the end of DATA stores and replies, or stores and drops the connection before
//! replying (the duplicate case), or drops without storing, or answers 451, or stalls
//! past the relay timeout and stores afterwards. It accepts both relay shapes: one
//! MAIL/RCPT/DATA, or a recipient probe (MAIL, RCPT, RSET) first.
//!
//! The clients retry on 4xx and on a lost connection, like a real MTA (bounded
//! attempts). The ledger: messages, acknowledged (250 after the data), stored, and
//! acknowledged-but-not-stored, which must be 0 (the gateway's promise: no 250 for a
//! message the backend did not accept). Duplicates are reported with their cause; a
//! copy the backend stored and acknowledged promptly while the client got a 4xx has no
//! cause and fails the test.
//!
//! `MXGATE_RELIABILITY_MESSAGES` (default 3000, under a minute) and `MXGATE_RELIABILITY_SEED` (default:
//! from the clock; printed) set the run. The ledger is printed to stdout past the test
//! harness's capture, so CI output shows it.

use mxgate_test_kit as support;

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::gateway::{GatewayProcess, TestConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const CLIENTS: usize = 12;
const MAX_ATTEMPTS: u32 = 25;
/// The gateway's relay timeout for the final reply to DATA; a stall lasts longer.
const RELAY_DATA_DONE: Duration = Duration::from_secs(2);
const STALL: Duration = Duration::from_millis(2600);
/// A client's wait for any one reply (longer than any stall the backend makes).
const CLIENT_REPLY_WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_under_sigkill_and_backend_faults() {
    support::init_logging();
    let messages: usize = env_number("MXGATE_RELIABILITY_MESSAGES").unwrap_or(3000);
    let seed: u64 = env_number("MXGATE_RELIABILITY_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let started = Instant::now();

    let backend = FaultBackend::start(seed).await;
    let dir = tempfile::tempdir().unwrap();
    let config = TestConfig {
        tls: false,
        backends: vec![format!("smtp://{}", backend.addr)],
        server_extra: "  max_connections_per_ip: 1000\n".into(),
        extra: format!(
            "auth:\n  enabled: false\nrelay:\n  tls: off\n  pool_wait: 5s\n  timeouts:\n    \
             connect: 2s\n    greeting: 2s\n    mail: 2s\n    rcpt: 2s\n    data_init: 2s\n    \
             data_block: 2s\n    data_done: {}s\n",
            RELAY_DATA_DONE.as_secs()
        ),
        ..Default::default()
    };
    let config_path = dir.path().join("mxgate.yaml");
    std::fs::write(&config_path, config.yaml(dir.path())).unwrap();

    let gateway = Arc::new(Mutex::new(GatewayProcess::spawn(&config_path)));
    let address = Arc::new(Mutex::new(gateway.lock().unwrap().smtp));
    let done = Arc::new(AtomicBool::new(false));
    let killer = {
        let (gateway, address, done) = (gateway.clone(), address.clone(), done.clone());
        std::thread::spawn(move || kill_and_restart(&config_path, gateway, address, done, seed))
    };

    let ledger = Arc::new(Mutex::new(ClientLedger::default()));
    let next = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let (address, ledger, next) = (address.clone(), ledger.clone(), next.clone());
        clients.push(tokio::spawn(async move {
            loop {
                let id = next.fetch_add(1, Ordering::Relaxed);
                if id >= messages {
                    return;
                }
                deliver_with_retries(id, client, &address, &ledger).await;
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let kills = killer.join().unwrap();
    // A stalled backend session may still be about to store its copy.
    tokio::time::sleep(STALL + Duration::from_secs(1)).await;
    let gateway_log = gateway.lock().unwrap().log();

    let report = Report::new(
        messages,
        &ledger.lock().unwrap(),
        &backend.stored.lock().unwrap(),
    );
    let faults = backend.faults.lock().unwrap().clone();
    let mut text = String::new();
    report.write(&mut text, seed, kills, &faults, started.elapsed());
    // Past the harness's capture: the figures show in CI output, passed or failed.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());

    assert_eq!(
        report.acknowledged_not_stored, 0,
        "messages acknowledged with 250 that the backend never stored (seed {seed})"
    );
    assert_eq!(
        report.unexplained, 0,
        "copies stored and promptly acknowledged by the backend for which the client got no 250 (seed {seed})"
    );
    assert_eq!(
        report.permanent,
        0,
        "permanent refusals, though the backend never refuses permanently (seed {seed}); gateway log:\n{}",
        tail(&gateway_log)
    );
    assert_eq!(
        report.acknowledged,
        messages,
        "messages never acknowledged within {MAX_ATTEMPTS} attempts (seed {seed}); gateway log:\n{}",
        tail(&gateway_log)
    );
    assert!(kills > 0, "the gateway was never killed");
    assert!(
        faults.values().sum::<usize>() > 0,
        "the backend injected no fault"
    );
}

fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Kills the gateway with SIGKILL at random moments (every 0.3 to 2.5 s) and starts it
/// again at once, until the clients are done. Returns the number of kills.
fn kill_and_restart(
    config: &std::path::Path,
    gateway: Arc<Mutex<GatewayProcess>>,
    address: Arc<Mutex<SocketAddr>>,
    done: Arc<AtomicBool>,
    seed: u64,
) -> usize {
    let mut rng = Rng::new(seed ^ 0x5eed_cafe);
    let mut kills = 0;
    loop {
        let pause = Duration::from_millis(300 + rng.below(2200));
        let until = Instant::now() + pause;
        while Instant::now() < until {
            if done.load(Ordering::Relaxed) {
                return kills;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut current = gateway.lock().unwrap();
        current.signal(libc::SIGKILL);
        current
            .wait(Duration::from_secs(10))
            .expect("SIGKILL ends mxgate");
        kills += 1;
        *current = GatewayProcess::spawn(config);
        *address.lock().unwrap() = current.smtp;
    }
}

/// What the clients saw, per message and attempt.
#[derive(Default)]
struct ClientLedger {
    outcomes: HashMap<(usize, u32), Outcome>,
    acknowledged: HashMap<usize, u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Acknowledged,
    /// A 4xx at some step (connect, MAIL, RCPT, DATA or the end of data).
    Deferred,
    /// The connection could not be made or was lost.
    Lost,
    Permanent,
}

async fn deliver_with_retries(
    id: usize,
    client: usize,
    address: &Mutex<SocketAddr>,
    ledger: &Mutex<ClientLedger>,
) {
    let mut backoff = Duration::from_millis(20);
    for attempt in 1..=MAX_ATTEMPTS {
        let target = *address.lock().unwrap();
        let outcome = match one_attempt(target, id, attempt, client).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Lost,
        };
        {
            let mut ledger = ledger.lock().unwrap();
            ledger.outcomes.insert((id, attempt), outcome);
            if outcome == Outcome::Acknowledged {
                ledger.acknowledged.insert(id, attempt);
            }
        }
        if matches!(outcome, Outcome::Acknowledged | Outcome::Permanent) {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// One SMTP transaction; `Err` is a lost connection or a reply that never came.
async fn one_attempt(
    target: SocketAddr,
    id: usize,
    attempt: u32,
    client: usize,
) -> std::io::Result<Outcome> {
    // Clients come from different loopback addresses, as an MX's senders do.
    let source = Ipv4Addr::new(127, 1, (client / 250) as u8, (client % 250 + 1) as u8);
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let stream = match tokio::time::timeout(Duration::from_secs(5), socket.connect(target)).await {
        Ok(stream) => stream?,
        Err(_) => return Ok(Outcome::Lost),
    };
    let mut smtp = Client::new(stream);
    let steps: [(Option<String>, u16); 5] = [
        (None, 220),
        (Some("EHLO client.test".into()), 250),
        (Some(format!("MAIL FROM:<sender{id}@client.test>")), 250),
        (Some(format!("RCPT TO:<user{}@example.test>", id % 7)), 250),
        (Some("DATA".into()), 354),
    ];
    for (command, expected) in steps {
        if let Some(command) = command {
            smtp.send(format!("{command}\r\n").as_bytes()).await?;
        }
        let code = smtp.reply().await?;
        if code != expected {
            return Ok(classify(code));
        }
    }
    smtp.send(&message(id, attempt)).await?;
    let code = smtp.reply().await?;
    let outcome = if code == 250 {
        Outcome::Acknowledged
    } else {
        classify(code)
    };
    let _ = smtp.send(b"QUIT\r\n").await;
    Ok(outcome)
}

fn classify(code: u16) -> Outcome {
    match code {
        400..=499 => Outcome::Deferred,
        _ => Outcome::Permanent,
    }
}

/// The message of ledger `id`, attempt `attempt`, dot-stuffed and terminated; some are
/// a few hundred KB so that kills land during uploads too.
fn message(id: usize, attempt: u32) -> Vec<u8> {
    let mut text = format!(
        "From: <sender{id}@client.test>\r\nTo: <user{}@example.test>\r\n\
         Subject: ledger {id}\r\nMessage-ID: <ledger-{id}@client.test>\r\n\
         Date: Fri, 04 Dec 2026 12:00:00 +0000\r\nX-Ledger-Id: {id}\r\n\
         X-Ledger-Attempt: {attempt}\r\n\r\n",
        id % 7
    );
    let lines: usize = if id.is_multiple_of(10) { 4000 } else { 20 };
    for n in 0..lines {
        text.push_str(&format!(
            "{}line {n} of message {id}\r\n",
            if n.is_multiple_of(5) { "." } else { "" }
        ));
    }
    let mut wire = Vec::with_capacity(text.len() + 64);
    for line in text.split_inclusive("\r\n") {
        if line.starts_with('.') {
            wire.push(b'.');
        }
        wire.extend_from_slice(line.as_bytes());
    }
    wire.extend_from_slice(b".\r\n");
    wire
}

/// A minimal SMTP client that treats every surprise as a lost connection.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn new(stream: TcpStream) -> Self {
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// The code of the next complete (possibly multi-line) reply.
    async fn reply(&mut self) -> std::io::Result<u16> {
        loop {
            let line = read_line(&mut self.stream, &mut self.buf, CLIENT_REPLY_WAIT).await?;
            let code = line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("bad reply line {line:?}")))?;
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(code);
            }
        }
    }
}

async fn read_line<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    wait: Duration,
) -> std::io::Result<String> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(pos) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..pos]).into_owned();
            buf.drain(..pos + 2);
            return Ok(line);
        }
        let mut chunk = [0u8; 16384];
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// What the backend does at a point of the conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    RcptDeferred,
    RcptDrop,
    /// Stores the message, then closes without replying.
    StoreThenDrop,
    DropBeforeStore,
    DataDeferred,
    /// Waits past the gateway's relay timeout, then stores and replies.
    StallThenStore,
}

impl Fault {
    fn describe(self) -> &'static str {
        match self {
            Fault::RcptDeferred => "450 at RCPT",
            Fault::RcptDrop => "connection dropped at RCPT",
            Fault::StoreThenDrop => "stored, then dropped before replying",
            Fault::DropBeforeStore => "dropped after the data, not stored",
            Fault::DataDeferred => "451 after the data, not stored",
            Fault::StallThenStore => "stalled past the relay timeout, then stored",
        }
    }
}

/// One copy the backend stored.
#[derive(Clone, Debug)]
struct Stored {
    id: usize,
    attempt: u32,
    /// `None`: stored and acknowledged at once.
    fault: Option<Fault>,
}

struct FaultBackend {
    addr: SocketAddr,
    stored: Arc<Mutex<Vec<Stored>>>,
    faults: Arc<Mutex<BTreeMap<Fault, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultBackend {
    async fn start(seed: u64) -> FaultBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stored = Arc::new(Mutex::new(Vec::new()));
        let faults = Arc::new(Mutex::new(BTreeMap::new()));
        let rng = Arc::new(Mutex::new(Rng::new(seed)));
        let (task_stored, task_faults) = (stored.clone(), faults.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let session = BackendSession {
                    stream,
                    buf: Vec::new(),
                    rng: rng.clone(),
                    stored: task_stored.clone(),
                    faults: task_faults.clone(),
                };
                tokio::spawn(session.serve());
            }
        });
        FaultBackend {
            addr,
            stored,
            faults,
            task,
        }
    }
}

struct BackendSession {
    stream: TcpStream,
    buf: Vec<u8>,
    rng: Arc<Mutex<Rng>>,
    stored: Arc<Mutex<Vec<Stored>>>,
    faults: Arc<Mutex<BTreeMap<Fault, usize>>>,
}

impl BackendSession {
    /// Draws a number below 1000 from the shared schedule.
    fn roll(&self) -> u64 {
        self.rng.lock().unwrap().below(1000)
    }

    fn count(&self, fault: Fault) {
        *self.faults.lock().unwrap().entry(fault).or_default() += 1;
    }

    async fn line(&mut self, text: &str) -> std::io::Result<()> {
        self.stream
            .write_all(format!("{text}\r\n").as_bytes())
            .await
    }

    async fn serve(mut self) -> std::io::Result<()> {
        self.line("220 backend.test ESMTP").await?;
        let mut rcpts = 0;
        loop {
            // The gateway may keep a pooled connection idle for long; it is never
            // closed from this side except as a fault.
            let wait = Duration::from_secs(3600);
            let line = read_line(&mut self.stream, &mut self.buf, wait).await?;
            let upper = line.to_ascii_uppercase();
            if upper.starts_with("EHLO") || upper.starts_with("HELO") {
                self.stream
                    .write_all(
                        b"250-backend.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n\
                          250-ENHANCEDSTATUSCODES\r\n250 SIZE 100000000\r\n",
                    )
                    .await?;
            } else if upper.starts_with("MAIL FROM:") {
                rcpts = 0;
                self.line("250 2.1.0 Ok").await?;
            } else if upper.starts_with("RCPT TO:") {
                match self.roll() {
                    0..=29 => {
                        self.count(Fault::RcptDeferred);
                        self.line("450 4.2.1 mailbox busy, try later").await?;
                    }
                    30..=44 => {
                        self.count(Fault::RcptDrop);
                        return Ok(());
                    }
                    _ => {
                        rcpts += 1;
                        self.line("250 2.1.5 Ok").await?;
                    }
                }
            } else if upper == "DATA" {
                if rcpts == 0 {
                    self.line("554 5.5.1 no valid recipients").await?;
                    continue;
                }
                self.line("354 go ahead").await?;
                let content = self.read_data().await?;
                let (id, attempt) = ledger_of(&content)
                    .ok_or_else(|| std::io::Error::other("a message without a ledger id"))?;
                let fault = match self.roll() {
                    0..=39 => Some(Fault::StoreThenDrop),
                    40..=79 => Some(Fault::DropBeforeStore),
                    80..=119 => Some(Fault::DataDeferred),
                    120..=134 => Some(Fault::StallThenStore),
                    _ => None,
                };
                if let Some(fault) = fault {
                    self.count(fault);
                }
                let store = |fault| {
                    self.stored
                        .lock()
                        .unwrap()
                        .push(Stored { id, attempt, fault })
                };
                match fault {
                    None => {
                        store(None);
                        self.line("250 2.0.0 Ok: queued").await?;
                    }
                    Some(Fault::StoreThenDrop) => {
                        store(fault);
                        return Ok(());
                    }
                    Some(Fault::DropBeforeStore) => return Ok(()),
                    Some(Fault::DataDeferred) => {
                        self.line("451 4.3.0 temporary failure, not stored").await?;
                    }
                    Some(Fault::StallThenStore) => {
                        tokio::time::sleep(STALL).await;
                        store(fault);
                        self.line("250 2.0.0 Ok: queued late").await?;
                    }
                    Some(Fault::RcptDeferred | Fault::RcptDrop) => unreachable!(),
                }
                rcpts = 0;
            } else if upper == "RSET" {
                rcpts = 0;
                self.line("250 2.0.0 Ok").await?;
            } else if upper == "NOOP" {
                self.line("250 2.0.0 Ok").await?;
            } else if upper == "QUIT" {
                self.line("221 2.0.0 Bye").await?;
                return Ok(());
            } else {
                self.line("502 5.5.2 command not implemented").await?;
            }
        }
    }

    /// The content up to `CRLF.CRLF`, dot-stuffing removed.
    async fn read_data(&mut self) -> std::io::Result<Vec<u8>> {
        let mut content = Vec::new();
        loop {
            let line = read_raw_line(&mut self.stream, &mut self.buf).await?;
            if line == b".\r\n" {
                return Ok(content);
            }
            content.extend_from_slice(line.strip_prefix(b".").unwrap_or(&line));
        }
    }
}

async fn read_raw_line(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    loop {
        if let Some(pos) = buf.windows(2).position(|w| w == b"\r\n") {
            return Ok(buf.drain(..pos + 2).collect());
        }
        let mut chunk = [0u8; 16384];
        let n = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The ledger id and attempt the client wrote into the header.
fn ledger_of(content: &[u8]) -> Option<(usize, u32)> {
    let text = String::from_utf8_lossy(content);
    let header = text.split("\r\n\r\n").next()?;
    let field = |name: &str| {
        header.lines().find_map(|line| {
            line.strip_prefix(name)
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
    };
    Some((
        field("X-Ledger-Id:")? as usize,
        field("X-Ledger-Attempt:")? as u32,
    ))
}

/// The ledger's figures.
struct Report {
    messages: usize,
    acknowledged: usize,
    stored_unique: usize,
    stored_copies: usize,
    acknowledged_not_stored: usize,
    stored_never_acknowledged: usize,
    permanent: usize,
    attempts: usize,
    deferred: usize,
    lost: usize,
    /// Copies beyond the first of a message, by cause.
    duplicates: BTreeMap<&'static str, usize>,
    /// Copies stored without a fault whose attempt did not end with 250.
    unexplained: usize,
}

impl Report {
    fn new(messages: usize, clients: &ClientLedger, stored: &[Stored]) -> Report {
        let mut copies: HashMap<usize, Vec<&Stored>> = HashMap::new();
        for copy in stored {
            copies.entry(copy.id).or_default().push(copy);
        }
        let acknowledged = clients.acknowledged.len();
        let acknowledged_not_stored = clients
            .acknowledged
            .keys()
            .filter(|id| !copies.contains_key(id))
            .count();
        let stored_never_acknowledged = copies
            .keys()
            .filter(|id| !clients.acknowledged.contains_key(id))
            .count();
        let count = |wanted: Outcome| clients.outcomes.values().filter(|&&o| o == wanted).count();
        let mut duplicates = BTreeMap::new();
        let mut unexplained = 0;
        for list in copies.values() {
            // The copy the client was told about is not a duplicate; without one, the
            // first copy stands for the message.
            let kept = list
                .iter()
                .position(|c| {
                    clients.outcomes.get(&(c.id, c.attempt)) == Some(&Outcome::Acknowledged)
                })
                .unwrap_or(0);
            for (n, copy) in list.iter().enumerate() {
                let outcome = clients.outcomes.get(&(copy.id, copy.attempt));
                let cause = match (copy.fault, outcome) {
                    (_, Some(Outcome::Acknowledged)) => None,
                    (Some(fault), _) => Some(fault.describe()),
                    (None, Some(Outcome::Lost) | None) => Some(
                        "stored and acknowledged by the backend; the client's connection was lost (SIGKILL)",
                    ),
                    (None, Some(_)) => {
                        unexplained += 1;
                        Some(
                            "stored and acknowledged by the backend; the client got a refusal (no cause)",
                        )
                    }
                };
                if n != kept
                    && let Some(cause) = cause
                {
                    *duplicates.entry(cause).or_default() += 1;
                }
            }
        }
        Report {
            messages,
            acknowledged,
            stored_unique: copies.len(),
            stored_copies: stored.len(),
            acknowledged_not_stored,
            stored_never_acknowledged,
            permanent: count(Outcome::Permanent),
            attempts: clients.outcomes.len(),
            deferred: count(Outcome::Deferred),
            lost: count(Outcome::Lost),
            duplicates,
            unexplained,
        }
    }

    fn write(
        &self,
        out: &mut String,
        seed: u64,
        kills: usize,
        faults: &BTreeMap<Fault, usize>,
        took: Duration,
    ) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "reliability ledger (seed {seed}, {took:.1?}, {CLIENTS} clients, {kills} SIGKILLs of the gateway):"
        );
        let _ = writeln!(
            out,
            "  messages {}, acknowledged {}, stored {} ({} copies), acknowledged-but-not-stored {}, \
             stored-but-never-acknowledged {}",
            self.messages,
            self.acknowledged,
            self.stored_unique,
            self.stored_copies,
            self.acknowledged_not_stored,
            self.stored_never_acknowledged
        );
        let _ = writeln!(
            out,
            "  attempts {}: deferred (4xx) {}, connection lost {}, refused permanently {}",
            self.attempts, self.deferred, self.lost, self.permanent
        );
        let injected: usize = faults.values().sum();
        let _ = writeln!(out, "  backend faults injected {injected}:");
        for (fault, n) in faults {
            let _ = writeln!(out, "    {n:5} {}", fault.describe());
        }
        let total: usize = self.duplicates.values().sum();
        let _ = writeln!(out, "  duplicates {total}:");
        for (cause, n) in &self.duplicates {
            let _ = writeln!(out, "    {n:5} {cause}");
        }
    }
}

/// A small deterministic generator (xorshift64*), so a seed reproduces a schedule.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}
