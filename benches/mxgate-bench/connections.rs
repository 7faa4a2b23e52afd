//! What a connection costs the gateway without any mail: a fresh gateway, a warm-up,
//! then N connections opened one after another by `--concurrency` workers (connect,
//! greeting, EHLO, with TLS STARTTLS and EHLO again, QUIT, close), and the gateway's
//! CPU time over them. Calls the gateway, the client sessions and /proc.

use crate::SETUP_TIMEOUT;
use crate::client::{Client, ClientTls};
use crate::gateway::Gateway;
use crate::procfs::{CpuTime, proc_cpu};
use crate::report::loud;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// What to measure: `count` connections over `concurrency` workers, after `warmup`.
pub struct ConnectionSpec {
    pub count: usize,
    pub concurrency: usize,
    pub warmup: usize,
    pub tls: Option<ClientTls>,
}

pub struct ConnectionCost {
    pub tls: bool,
    /// Connections that went through greeting, EHLO (STARTTLS, EHLO) and QUIT.
    pub ok: usize,
    failures: BTreeMap<String, usize>,
    elapsed: Duration,
    /// The gateway's utime and stime over the measured connections.
    pub gateway_cpu: Option<CpuTime>,
}

impl ConnectionCost {
    pub fn errors(&self) -> usize {
        self.failures.values().sum()
    }

    pub fn per_s(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Gateway CPU (user, system, total) per connection, in µs.
    pub fn cpu_us_per_conn(&self) -> Option<(f64, f64, f64)> {
        let per_conn = |seconds: f64| seconds * 1e6 / self.ok.max(1) as f64;
        self.gateway_cpu
            .map(|c| (per_conn(c.user), per_conn(c.system), per_conn(c.total())))
    }

    fn error_summary(&self) -> String {
        self.failures
            .iter()
            .map(|(what, n)| format!("{n}x {what}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Starts a gateway with `config`, warms it up (its DNS caches: iprev and HELO SPF run
/// once per connection in the checking modes), then measures `spec.count` connections.
pub async fn measure_connection_cost(
    binary: &Path,
    config: &Path,
    dir: &Path,
    spec: ConnectionSpec,
) -> Result<ConnectionCost, String> {
    let mut gateway = Gateway::spawn(binary, config, dir)?;
    // Let start-up (backend probe, first reload poll) settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spec = Arc::new(spec);
    let warm = open_and_close(gateway.smtp, &spec, spec.warmup.min(spec.count)).await;
    if !warm.failures.is_empty() {
        loud(&format!(
            "connection-cost warm-up: {} connections failed",
            warm.failures.values().sum::<usize>()
        ));
    }
    let cpu_before = proc_cpu(Some(gateway.pid));
    let started = Instant::now();
    let measured = open_and_close(gateway.smtp, &spec, spec.count).await;
    let elapsed = started.elapsed();
    let cpu_after = proc_cpu(Some(gateway.pid));
    gateway.stop();
    let cost = ConnectionCost {
        tls: spec.tls.is_some(),
        ok: measured.ok,
        failures: measured.failures,
        elapsed,
        gateway_cpu: cpu_before.zip(cpu_after).map(|(b, a)| a.since(b)),
    };
    print_connection_cost(&cost, spec.concurrency);
    Ok(cost)
}

/// What a batch of connections came to.
#[derive(Default)]
struct Opened {
    ok: usize,
    failures: BTreeMap<String, usize>,
}

/// `count` connections to `target`, `spec.concurrency` at a time, each one closed before
/// its worker opens the next.
async fn open_and_close(target: SocketAddr, spec: &Arc<ConnectionSpec>, count: usize) -> Opened {
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..spec.concurrency.min(count))
        .map(|_| {
            let (spec, next) = (spec.clone(), next.clone());
            tokio::spawn(async move {
                let mut opened = Opened::default();
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    match one_connection(target, spec.tls.as_ref()).await {
                        Ok(()) => opened.ok += 1,
                        Err(err) => *opened.failures.entry(err).or_default() += 1,
                    }
                }
                opened
            })
        })
        .collect();
    let mut total = Opened::default();
    for worker in workers {
        match worker.await {
            Ok(opened) => {
                total.ok += opened.ok;
                for (what, n) in opened.failures {
                    *total.failures.entry(what).or_default() += n;
                }
            }
            Err(err) => *total.failures.entry(format!("worker: {err}")).or_default() += 1,
        }
    }
    total
}

/// Connect, greeting, EHLO (STARTTLS, EHLO), QUIT, close.
async fn one_connection(target: SocketAddr, tls: Option<&ClientTls>) -> Result<(), String> {
    match tokio::time::timeout(SETUP_TIMEOUT, Client::open(target, tls)).await {
        Ok(Ok(client)) => {
            client.quit().await;
            Ok(())
        }
        Ok(Err(err)) => Err(format!("session setup: {err}")),
        Err(_) => Err("session setup: timeout".into()),
    }
}

fn print_connection_cost(cost: &ConnectionCost, concurrency: usize) {
    let steps = if cost.tls {
        "greeting, EHLO, STARTTLS (full handshake), EHLO, QUIT"
    } else {
        "greeting, EHLO, QUIT"
    };
    println!(
        "connection cost: {} connections ({steps}; no mail), {concurrency} at a time: {:.0} connections/s in {:.2} s",
        cost.ok,
        cost.per_s(),
        cost.elapsed.as_secs_f64()
    );
    if let (Some((user, system, total)), Some(cpu)) = (cost.cpu_us_per_conn(), cost.gateway_cpu) {
        // The kernel counts CPU time in clock ticks (10 ms): the seconds say how coarse.
        println!(
            "gateway CPU per connection: {total:.1} us (user {user:.1} + system {system:.1}; utime+stime {:.2} s over {} connections)",
            cpu.total(),
            cost.ok
        );
    }
    if cost.errors() > 0 {
        loud(&format!(
            "{} of {} connections FAILED: {}",
            cost.errors(),
            cost.ok + cost.errors(),
            cost.error_summary()
        ));
    }
}
