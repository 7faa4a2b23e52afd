//! The load generator: the messages it sends, and one run of N transactions over C
//! sessions with the CPU of the bench, the process under test and the machine. Calls
//! the client sessions, /proc and the sink's count.

use crate::client::{Client, ClientTls};
use crate::procfs::{CpuTime, machine_cpu, proc_cpu};
use crate::report::loud;
use crate::sink::Sink;
use crate::{MAIL_FROM, RCPT_TO, SETUP_TIMEOUT, TRANSACTION_TIMEOUT};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Barrier;

/// A message of `size` bytes (without the final `.` line, which it ends with); `id` goes
/// into the Message-ID.
pub fn build_message(size: usize, id: &str) -> Vec<u8> {
    let mut message = format!(
        "From: Bench Sender <{MAIL_FROM}>\r\n\
         To: <{RCPT_TO}>\r\n\
         Subject: mxgate benchmark message\r\n\
         Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n\
         Message-ID: <bench.{id}@bench.example.net>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n"
    )
    .into_bytes();
    const TEXT: &[u8] = b"The quick brown fox jumps over the lazy dog 0123456789 ";
    let mut remaining = size.saturating_sub(message.len());
    if remaining == 1 {
        remaining = 2;
    }
    let mut n = 0;
    while remaining > 0 {
        // Lines of 76 characters plus CRLF; never a lone byte left over.
        let mut take = remaining.min(78);
        if remaining - take == 1 {
            take -= 1;
        }
        for _ in 0..take - 2 {
            message.push(TEXT[n % TEXT.len()]);
            n += 1;
        }
        message.extend_from_slice(b"\r\n");
        remaining -= take;
    }
    message.extend_from_slice(b".\r\n");
    message
}

/// One message ready to send: the pipelined MAIL, RCPT and DATA, and the content with
/// the final `.` line.
pub struct Prepared {
    commands: Vec<u8>,
    data: Vec<u8>,
}

impl Prepared {
    pub fn new(data: Vec<u8>) -> Prepared {
        let commands = format!(
            "MAIL FROM:<{MAIL_FROM}> SIZE={}\r\nRCPT TO:<{RCPT_TO}>\r\nDATA\r\n",
            data.len() - 3
        )
        .into_bytes();
        Prepared { commands, data }
    }

    /// Bytes without the final `.` line.
    pub fn size(&self) -> usize {
        self.data.len() - 3
    }
}

pub struct LoadSpec {
    pub target: SocketAddr,
    pub tls: Option<ClientTls>,
    pub messages: usize,
    pub concurrency: usize,
    /// A new connection for every message, its set-up inside the measured loop.
    pub per_connection: bool,
    /// Sent in turn: message n is `pool[n % pool.len()]`.
    pub pool: Arc<[Prepared]>,
}

#[derive(Default)]
struct WorkerResult {
    ok: usize,
    /// Failures by what failed: reply codes (`MAIL 451`, `DATA-END 451`) or I/O errors.
    failures: BTreeMap<String, usize>,
    latencies_us: Vec<u32>,
}

impl WorkerResult {
    fn fail(&mut self, what: String) {
        *self.failures.entry(what).or_default() += 1;
    }
}

pub struct PhaseResult {
    pub ok: usize,
    failures: BTreeMap<String, usize>,
    /// Sorted.
    latencies_us: Vec<u32>,
    elapsed: Duration,
    pub gateway_cpu: Option<CpuTime>,
    bench_cpu: CpuTime,
    pub machine_busy: f64,
    /// Messages the sink took during the run (`None` for Postfix, which counts its own).
    pub sink_messages: Option<u64>,
}

impl PhaseResult {
    pub fn errors(&self) -> usize {
        self.failures.values().sum()
    }

    pub fn msgs_per_s(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Nearest-rank percentile, in milliseconds.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.latencies_us.len() as f64).ceil() as usize;
        let index = rank.clamp(1, self.latencies_us.len()) - 1;
        self.latencies_us[index] as f64 / 1000.0
    }

    pub fn bench_cpu_us_per_msg(&self) -> f64 {
        self.bench_cpu.total() * 1e6 / self.ok.max(1) as f64
    }

    pub fn error_summary(&self) -> String {
        self.failures
            .iter()
            .map(|(what, n)| format!("{n}x {what}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub fn print_phase(name: &str, path: &str, r: &PhaseResult) {
    println!(
        "{name} ({path}): {:.0} msgs/s, latency p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; {} ok, {} errors in {:.2} s",
        r.msgs_per_s(),
        r.percentile_ms(50.0),
        r.percentile_ms(99.0),
        r.percentile_ms(100.0),
        r.ok,
        r.errors(),
        r.elapsed.as_secs_f64(),
    );
    println!(
        "        bench process (load generator + sink) CPU {:.1} us/msg (user {:.1} + system {:.1}), machine CPU busy {:.0}%",
        r.bench_cpu_us_per_msg(),
        r.bench_cpu.user * 1e6 / r.ok.max(1) as f64,
        r.bench_cpu.system * 1e6 / r.ok.max(1) as f64,
        r.machine_busy * 100.0
    );
    if r.errors() > 0 {
        loud(&format!(
            "{} path: {} of {} messages FAILED: {}",
            name.trim(),
            r.errors(),
            r.ok + r.errors(),
            r.error_summary()
        ));
    }
}

/// Runs `spec.messages` transactions over `spec.concurrency` sessions. Reused sessions
/// are set up before the clock starts and closed after it stops; with
/// `spec.per_connection` every message opens and closes its own, inside the clock.
pub async fn run_load(spec: LoadSpec, gateway_pid: Option<i32>, sink: &Sink) -> PhaseResult {
    let spec = Arc::new(spec);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(spec.concurrency + 1));
    let stop = Arc::new(Barrier::new(spec.concurrency + 1));
    let mut workers = Vec::with_capacity(spec.concurrency);
    for _ in 0..spec.concurrency {
        let (spec, next, start, stop) = (spec.clone(), next.clone(), start.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            worker(&spec, &next, &start, &stop).await
        }));
    }
    // Two rounds: every session is set up (first), the counters are read, then the load
    // is let go (second), so that no message slips in before the counters.
    start.wait().await;
    let sink_before = sink.received();
    let gateway_cpu_before = gateway_pid.and_then(|pid| proc_cpu(Some(pid)));
    let bench_cpu_before = proc_cpu(None).unwrap_or_default();
    let machine_before = machine_cpu();
    let started = Instant::now();
    start.wait().await;
    stop.wait().await;
    let elapsed = started.elapsed();
    let gateway_cpu_after = gateway_pid.and_then(|pid| proc_cpu(Some(pid)));
    let bench_cpu_after = proc_cpu(None).unwrap_or_default();
    let machine_after = machine_cpu();
    let sink_messages = sink
        .received()
        .zip(sink_before)
        .map(|(after, before)| after - before);

    let mut ok = 0;
    let mut failures = BTreeMap::new();
    let mut latencies_us = Vec::with_capacity(spec.messages);
    for worker in workers {
        match worker.await {
            Ok(result) => {
                ok += result.ok;
                for (what, n) in result.failures {
                    *failures.entry(what).or_default() += n;
                }
                latencies_us.extend(result.latencies_us);
            }
            Err(err) => *failures.entry(format!("worker: {err}")).or_default() += 1,
        }
    }
    latencies_us.sort_unstable();
    let machine_busy = match (machine_before, machine_after) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => (b1 - b0) as f64 / (t1 - t0) as f64,
        _ => 0.0,
    };
    PhaseResult {
        ok,
        failures,
        latencies_us,
        elapsed,
        gateway_cpu: match (gateway_cpu_before, gateway_cpu_after) {
            (Some(before), Some(after)) => Some(after.since(before)),
            _ => None,
        },
        bench_cpu: bench_cpu_after.since(bench_cpu_before),
        machine_busy,
        sink_messages,
    }
}

async fn worker(
    spec: &LoadSpec,
    next: &AtomicUsize,
    start: &Barrier,
    stop: &Barrier,
) -> WorkerResult {
    let mut result = WorkerResult {
        latencies_us: Vec::with_capacity(spec.messages / spec.concurrency + 16),
        ..Default::default()
    };
    // A reused session is set up before the clock starts; with one connection per
    // message the set-up is part of what is measured.
    let mut client = None;
    if !spec.per_connection {
        match open_session(spec).await {
            Ok(session) => client = Some(session),
            Err(err) => result.fail(err),
        }
    }
    // Sessions ready; then wait for the counters to be read.
    start.wait().await;
    start.wait().await;
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        if n >= spec.messages {
            break;
        }
        let item = &spec.pool[n % spec.pool.len()];
        if spec.per_connection {
            send_on_new_connection(spec, item, &mut result).await;
        } else {
            send_on_reused_session(spec, &mut client, item, &mut result).await;
        }
    }
    stop.wait().await;
    if let Some(client) = client {
        client.quit().await;
    }
    result
}

/// Connect, greeting, EHLO (and STARTTLS, EHLO) within [`SETUP_TIMEOUT`].
async fn open_session(spec: &LoadSpec) -> Result<Client, String> {
    match tokio::time::timeout(SETUP_TIMEOUT, Client::open(spec.target, spec.tls.as_ref())).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(err)) => Err(format!("session setup: {err}")),
        Err(_) => Err("session setup: timeout".to_string()),
    }
}

/// Records a failed set-up, then pauses so as not to spin against a dead server.
async fn setup_failed(result: &mut WorkerResult, err: String) {
    result.fail(err);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// One message over the worker's session, opened again first if a failure closed it.
async fn send_on_reused_session(
    spec: &LoadSpec,
    client: &mut Option<Client>,
    item: &Prepared,
    result: &mut WorkerResult,
) {
    let session = match client {
        Some(session) => session,
        None => match open_session(spec).await {
            Ok(session) => client.insert(session),
            Err(err) => return setup_failed(result, err).await,
        },
    };
    if !send_message(session, item, Instant::now(), result).await {
        *client = None;
    }
}

/// One message over a connection of its own: set-up, the transaction, QUIT, close. The
/// latency counts from the connect.
async fn send_on_new_connection(spec: &LoadSpec, item: &Prepared, result: &mut WorkerResult) {
    let started = Instant::now();
    let mut session = match open_session(spec).await {
        Ok(session) => session,
        Err(err) => return setup_failed(result, err).await,
    };
    if send_message(&mut session, item, started, result).await {
        session.quit().await;
    }
}

/// One transaction within [`TRANSACTION_TIMEOUT`]; records its outcome (and the latency
/// since `started` when it was delivered). Returns whether the session is still usable.
async fn send_message(
    session: &mut Client,
    item: &Prepared,
    started: Instant,
    result: &mut WorkerResult,
) -> bool {
    let outcome = tokio::time::timeout(
        TRANSACTION_TIMEOUT,
        session.transaction(&item.commands, &item.data),
    )
    .await;
    match outcome {
        Ok(Ok(codes)) => {
            let elapsed = started.elapsed();
            if codes == [250, 250, 354, 250] {
                result.ok += 1;
                result
                    .latencies_us
                    .push(elapsed.as_micros().min(u32::MAX as u128) as u32);
            } else {
                let steps = ["MAIL", "RCPT", "DATA", "DATA-END"];
                let wanted = [250, 250, 354, 250];
                let (step, code) = (0..4)
                    .find(|&i| codes[i] != wanted[i])
                    .map(|i| (steps[i], codes[i]))
                    .unwrap_or(("?", 0));
                result.fail(format!("{step} {code}"));
            }
            true
        }
        Ok(Err(err)) => {
            result.fail(format!("I/O: {err}"));
            false
        }
        Err(_) => {
            result.fail("transaction timeout".into());
            false
        }
    }
}
