//! mxgate load benchmark.
//!
//! Pushes the same SMTP load into an in-process SMTP sink: once through the
//! gateway (`mxgate serve` as a child process, relaying in-line to the sink) and once
//! straight into the sink (the "direct path"), then compares them. Between the two it
//! runs the same load through a TCP proxy that only copies bytes (`mxgate-bench/proxy.rs`):
//! the most any in-line relay can reach on the machine, against which the gateway's
//! ratio is to be read. Also measures what idle connections cost the gateway in memory.
//!
//! Run: `cargo bench --bench mxgate-bench -- [options]` (`-- --help` lists them).
//!
//! Everything (load generator, sink, gateway) shares one machine, so the figures are
//! relative: the ratio gateway / direct and the gateway's CPU per message are the
//! numbers to track, not the absolute rate. The output ends with a one-line JSON summary.
//!
//! Sender checks (`--mode full`, `seal`, `both`, `all`): the bench serves the sender's
//! DNS zone itself (the test suite's DNS server, `tests/support/src/dns.rs`) and DKIM-signs
//! every message, so SPF, DKIM and DMARC pass and the gateway delivers. Each mode runs
//! against its own fresh gateway; the cost of the checks is the difference in gateway
//! CPU per message between modes, and the cost of sealing is compared with the floor of
//! two RSA-2048 signatures per message, measured in the same run with aws-lc-rs, the library mail-auth signs with.

use clap::{Parser, ValueEnum};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Barrier;

const HOSTNAME: &str = "mx.example.test";
const MAIL_FROM: &str = "sender@bench.example.net";
const RCPT_TO: &str = "rcpt@example.test";
/// The sender's domain (MAIL FROM, From, DKIM d=), in the bench's DNS zone.
const SENDER_DOMAIN: &str = "bench.example.net";
/// What the load generator says in EHLO (SPF-authorised like the sender domain).
const HELO_NAME: &str = "client.bench.example.net";
const DKIM_SELECTOR: &str = "bench2048";
/// `d=` and selector of the gateway's ARC seals in `seal` mode.
const ARC_DOMAIN: &str = "example.test";
const ARC_SELECTOR: &str = "arcbench";
/// One whole transaction (commands, content, final reply) must finish within this.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);
/// Connect, greeting, EHLO (and STARTTLS) must finish within this.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the gateway gets to print `ready`.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Project goals for this stage.
const GOAL_RATIO: f64 = 0.60;
const GOAL_PEAK_RSS_MB: f64 = 64.0;
const GOAL_IDLE_RSS_MB: f64 = 64.0;
/// Sender checks: CPU per message beyond the one RSA-2048 verification they need.
const GOAL_CHECKS_BEYOND_RSA_US: f64 = 150.0;
/// Sealing: gateway CPU per message in `seal` mode over two RSA-2048 signatures.
const GOAL_SEAL_FLOOR_MULTIPLE: f64 = 1.3;
/// Checks and seal together: gateway CPU per message.
const GOAL_SEAL_TOTAL_US: f64 = 700.0;

/// The test suite's DNS server (UDP and TCP on 127.0.0.1, answering from an in-memory
/// zone), and its private Postfix: from the test kit.
use mxgate_test_kit::{dns, postfix};

/// The relay ceiling: a byte-copying TCP proxy in the gateway's place.
#[path = "mxgate-bench/proxy.rs"]
mod proxy;

#[derive(Parser, Debug)]
#[command(
    name = "mxgate-bench",
    about = "Load benchmark: SMTP through mxgate into an in-process sink, compared with the same load straight into the sink",
    after_help = "Run as `cargo bench --bench mxgate-bench -- [options]`. The gateway is the \
release-built `mxgate` binary, started as `mxgate serve` with a generated config in a \
temporary directory (listen 127.0.0.1:0, backend smtp://127.0.0.1:<sink>, relay.tls off, \
server.max_connections and max_connections_per_ip 5000, the limits.*_per_minute rates off; with a checking mode in the run \
also dns.nameservers [the bench's DNS server] and metrics.listen 127.0.0.1:0, and in `seal` \
mode arc.domain example.test, arc.selector arcbench and a generated RSA-2048 \
arc.private_key). The bench raises its own open-files \
limit (RLIMIT_NOFILE); the gateway child inherits it. Output: human-readable lines, then a \
single-line JSON summary as the last line. The exit status is 1 when any message failed, \
or when in a checking mode not every delivered message passed SPF, DKIM and DMARC (and, \
in `seal` mode, was sealed)."
)]
struct Args {
    /// Messages per measured run, for each path (gateway and direct).
    #[arg(long, default_value_t = 20_000)]
    messages: usize,

    /// Message size in bytes (header and body, CRLF line endings, without the final `.`).
    #[arg(long, default_value_t = 4096)]
    size: usize,

    /// Concurrent client sessions (each one SMTP connection, reused for many messages).
    #[arg(long, default_value_t = 50)]
    concurrency: usize,

    /// Warm-up messages per path before each measured run (not counted).
    #[arg(long, default_value_t = 1000)]
    warmup: usize,

    /// Idle connections to open against a fresh gateway (greeting + EHLO, then held) to
    /// measure their memory cost; 0 skips the measurement.
    #[arg(long, default_value_t = 1000)]
    idle: usize,

    /// Client sessions to the gateway use STARTTLS (the gateway gets a generated
    /// self-signed development certificate). The direct path stays plaintext: the sink
    /// does not speak TLS.
    #[arg(long)]
    tls: bool,

    /// Sender checks. `nocheck` puts 127.0.0.0/8 in trusted_networks (relayed without
    /// SPF/DKIM/DMARC/ARC/iprev, like OpenDMARC's IgnoreHosts); `full` trusts nobody, so
    /// the gateway runs its sender checks on every message; `seal` is `full` plus ARC
    /// sealing with an RSA-2048 key; `both` runs `nocheck` then `full`, and `all` runs
    /// `nocheck`, `full` and `seal`, each against a fresh gateway, in one invocation.
    /// With any checking mode the bench serves DNS itself (dns.nameservers points at it):
    /// SPF `v=spf1 ip4:127.0.0.0/8 -all` for bench.example.net and for the HELO name
    /// client.bench.example.net, `_dmarc` with p=reject, and an RSA-2048 DKIM key; every
    /// message is DKIM-signed (rsa-sha256, relaxed/relaxed, d=bench.example.net, aligned
    /// with From) once, before the clock starts, and sent as they are (a pool of
    /// --pool messages, same size, different Message-ID). SPF, DKIM and DMARC pass (the
    /// gateway's metrics are read to make sure, and a shortfall fails the run); iprev
    /// gets `localhost`, which the resolver answers for 127.0.0.1 itself. iprev and HELO
    /// SPF run once per session, and sessions are set up before the clock starts, so the
    /// figures are per-message costs. Every answer is cached by the gateway after the
    /// warm-up, so this measures the checks' CPU, not DNS latency. In a run with several
    /// modes all of them send the same signed messages; `nocheck` alone sends the
    /// unsigned message of earlier versions.
    #[arg(long, value_enum, default_value_t = Mode::Nocheck)]
    mode: Mode,

    /// Distinct pre-signed messages to send in turn (checking modes only).
    #[arg(long, default_value_t = 64)]
    pool: usize,

    /// RSA-2048 signatures timed with aws-lc-rs (one thread, in this process) to measure the
    /// sealing cost floor; ten times as many verifications are timed. 0 skips it.
    #[arg(long, default_value_t = 2000)]
    rsa_iterations: usize,

    /// YAML file merged into the generated gateway config: appended, with keys it repeats
    /// taking precedence (mappings are merged key by key), e.g. `log: {level: warn}` or
    /// `relay: {pool_wait: 5s}`.
    #[arg(long, value_name = "FILE")]
    config_extra: Option<PathBuf>,

    /// Keep the temporary directory (gateway config, certificate, gateway log) and print
    /// its path.
    #[arg(long)]
    keep_dir: bool,

    /// What receives the mail on both paths: `internal`, the bench's own SMTP sink that
    /// does no work (measures the gateway's own cost), or `postfix`, a private instance
    /// of Debian's Postfix delivering into a Maildir (measures what putting mxgate in
    /// front of a real mailbox server costs; needs root and /usr/sbin/postfix; use fewer
    /// --messages, Postfix writes every one to disk).
    #[arg(long, value_enum, default_value_t = SinkKind::Internal)]
    sink: SinkKind,

    /// Skip the relay-ceiling run (a TCP proxy that only copies bytes, in the gateway's
    /// place, between the direct and the gateway runs).
    #[arg(long)]
    no_proxy: bool,

    /// Internal: run as the relay-ceiling proxy child, forwarding to this address.
    #[arg(long, hide = true, value_name = "ADDR")]
    proxy_to: Option<SocketAddr>,

    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,

    /// Benchmark name filters `cargo bench` may pass through; ignored.
    #[arg(hide = true)]
    filters: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SinkKind {
    Internal,
    Postfix,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// 127.0.0.0/8 is in trusted_networks: relayed without sender checks.
    Nocheck,
    /// trusted_networks is empty: sender checks run on every message.
    Full,
    /// As `full`, plus an ARC seal (RSA-2048) on every message.
    Seal,
    /// `nocheck`, then `full`.
    Both,
    /// `nocheck`, `full`, then `seal`.
    All,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Nocheck => "nocheck",
            Mode::Full => "full",
            Mode::Seal => "seal",
            Mode::Both => "both",
            Mode::All => "all",
        }
    }

    /// The gateway configurations measured, in order; the first one is the primary
    /// (the top-level figures of the JSON summary and the idle-connection gateway).
    fn setups(self) -> &'static [Setup] {
        match self {
            Mode::Nocheck => &[Setup::Nocheck],
            Mode::Full => &[Setup::Full],
            Mode::Seal => &[Setup::Seal],
            Mode::Both => &[Setup::Nocheck, Setup::Full],
            Mode::All => &[Setup::Nocheck, Setup::Full, Setup::Seal],
        }
    }
}

/// One gateway configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    Nocheck,
    Full,
    Seal,
}

impl Setup {
    fn label(self) -> &'static str {
        match self {
            Setup::Nocheck => "nocheck",
            Setup::Full => "full",
            Setup::Seal => "seal",
        }
    }

    fn checks(self) -> bool {
        self != Setup::Nocheck
    }

    fn describe(self) -> &'static str {
        match self {
            Setup::Nocheck => "trusted_networks [127.0.0.0/8]: relayed without sender checks",
            Setup::Full => {
                "trusted_networks []: iprev, SPF (HELO and MAIL FROM), DKIM, ARC and DMARC on every message"
            }
            Setup::Seal => "as full, plus an ARC seal (RSA-2048) on every message",
        }
    }
}

fn main() {
    let args = Args::parse();
    if let Some(target) = args.proxy_to {
        proxy::serve(target);
    }
    if args.messages == 0 || args.concurrency == 0 {
        eprintln!("--messages and --concurrency must be at least 1");
        std::process::exit(2);
    }
    let nofile = raise_nofile_limit(wanted_limit(&args));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(run(args, nofile));
    // Sink connections may still be open; do not wait for them.
    runtime.shutdown_timeout(Duration::from_millis(100));
    std::process::exit(code);
}

async fn run(args: Args, nofile: NofileLimit) -> i32 {
    let dir = tempfile::Builder::new()
        .prefix("mxgate-bench.")
        .tempdir()
        .expect("temporary directory");
    let setups = args.mode.setups();
    let checks = setups.iter().any(|s| s.checks());
    let seals = setups.contains(&Setup::Seal);

    // Keys, the sender's zone and the signed messages: all before any clock starts.
    let zone = if checks {
        match SenderZone::start(dir.path(), seals).await {
            Ok(zone) => Some(zone),
            Err(err) => {
                eprintln!("{err}");
                return 2;
            }
        }
    } else {
        None
    };
    let pool: Arc<[Prepared]> = match &zone {
        Some(zone) => match signed_pool(args.size, args.pool.max(1), &zone.dkim_pem) {
            Ok(pool) => pool.into(),
            Err(err) => {
                eprintln!("{err}");
                return 2;
            }
        },
        None => vec![Prepared::new(build_message(args.size, "1"))].into(),
    };
    let size = pool[0].size();

    let sink = match args.sink {
        SinkKind::Internal => Sink::start().await,
        SinkKind::Postfix => match Sink::postfix() {
            Ok(sink) => sink,
            Err(err) => {
                eprintln!("{err}");
                return 2;
            }
        },
    };
    let mut configs = Vec::with_capacity(setups.len());
    for &setup in setups {
        match write_config(&args, dir.path(), sink.addr, setup, zone.as_ref()) {
            Ok(path) => configs.push((setup, path)),
            Err(err) => {
                eprintln!("{err}");
                return 2;
            }
        }
    }
    let binary = Path::new(env!("CARGO_BIN_EXE_mxgate"));

    println!(
        "mxgate-bench: {} messages x {} bytes, concurrency {}, warm-up {}, mode {}, client TLS {}",
        args.messages,
        size,
        args.concurrency,
        args.warmup,
        args.mode.label(),
        if args.tls { "STARTTLS" } else { "off" }
    );
    println!(
        "open files limit: {} (soft {}, hard {}){}; the gateway child inherits it",
        nofile.describe(),
        nofile.soft,
        nofile.hard,
        if nofile.soft < wanted_limit(&args) {
            format!(" -- WARNING: below the {} wanted", wanted_limit(&args))
        } else {
            String::new()
        }
    );
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "machine: {cpus} CPUs; bench runtime: 2 tokio workers (load generator and sink share them)"
    );
    if let Some(zone) = &zone {
        let sizes = pool.iter().map(Prepared::size);
        let (min, max) = (sizes.clone().min().unwrap_or(0), sizes.max().unwrap_or(0));
        println!(
            "sender zone: DNS server {} in this process (SPF ip4:127.0.0.0/8 for {SENDER_DOMAIN} and {HELO_NAME}, DMARC p=reject, DKIM key {DKIM_SELECTOR}._domainkey{}); {} messages DKIM-signed (rsa-sha256 2048 bits, relaxed/relaxed, d={SENDER_DOMAIN}), {}{} bytes",
            zone.dns.addr,
            if zone.arc_key.is_some() {
                format!(", ARC key {ARC_SELECTOR}._domainkey.{ARC_DOMAIN}")
            } else {
                String::new()
            },
            pool.len(),
            if min == max {
                String::new()
            } else {
                format!("{min}..")
            },
            max
        );
    }

    // The cost floor: RSA-2048 with aws-lc-rs on one thread, while nothing else runs; with
    // `seal`, again right after the seal run (the machine's speed drifts), and the mean
    // of both is the figure.
    let mut rsa_measured: Vec<RsaCost> = Vec::new();
    if let Some(zone) = &zone
        && args.rsa_iterations > 0
    {
        rsa_measured.extend(rsa_floor(zone, args.rsa_iterations, "before the load").await);
    }

    let mut tls: Option<ClientTls> = None;
    let load = |target: SocketAddr, tls: Option<ClientTls>, n: usize| LoadSpec {
        target,
        tls,
        messages: n,
        concurrency: args.concurrency,
        pool: pool.clone(),
    };
    let mut direct: Option<PhaseResult> = None;
    let mut ceiling: Option<Ceiling> = None;
    let mut runs: Vec<GatewayRun> = Vec::with_capacity(configs.len());
    for (index, (setup, config_path)) in configs.iter().enumerate() {
        let mut gateway = match Gateway::spawn(binary, config_path, dir.path()) {
            Ok(gateway) => gateway,
            Err(err) => {
                eprintln!("{err}");
                return 2;
            }
        };
        println!();
        println!("gateway mode {}: {}", setup.label(), setup.describe());
        println!(
            "gateway: {} (pid {}) smtp {}; sink smtp {}",
            binary.display(),
            gateway.pid,
            gateway.smtp,
            sink.addr
        );
        if index == 0 {
            if args.keep_dir {
                println!("temporary directory (kept): {}", dir.path().display());
            }
            // The gateway generated the certificate as it started.
            if args.tls {
                match client_tls(&dir.path().join("cert.pem")) {
                    Ok(client) => tls = Some(client),
                    Err(err) => {
                        eprintln!("{err}");
                        return 2;
                    }
                }
            }
            // Direct path: warm-up, then measured.
            if args.warmup > 0 {
                run_load(load(sink.addr, None, args.warmup), None, &sink).await;
            }
            let measured = run_load(load(sink.addr, None, args.messages), None, &sink).await;
            print_phase("direct ", "client -> sink", &measured);
            if !args.no_proxy {
                match measure_ceiling(&args, &load(sink.addr, None, 0), &sink, &measured).await {
                    Ok(measured) => ceiling = Some(measured),
                    Err(err) => loud(&format!("relay-ceiling run failed: {err}")),
                }
            }
            direct = Some(measured);
        }
        let direct = direct.as_ref().expect("direct path measured first");

        // Gateway path: warm-up (fills the gateway's backend pool and DNS caches), then
        // measured.
        if args.warmup > 0 {
            let warm = run_load(
                load(gateway.smtp, tls.clone(), args.warmup),
                Some(gateway.pid),
                &sink,
            )
            .await;
            if warm.errors() > 0 {
                loud(&format!(
                    "warm-up through the gateway ({}) had {} failed messages ({})",
                    setup.label(),
                    warm.errors(),
                    warm.error_summary()
                ));
            }
        }
        let queries_before = zone.as_ref().map(|z| z.dns.queries());
        let counters_before = match gateway.metrics {
            Some(addr) => outcome_counters(addr).await.ok(),
            None => None,
        };
        let through = run_load(
            load(gateway.smtp, tls.clone(), args.messages),
            Some(gateway.pid),
            &sink,
        )
        .await;
        let dns_queries = zone
            .as_ref()
            .zip(queries_before)
            .map(|(z, before)| z.dns.queries() - before);
        let outcomes = match (gateway.metrics, counters_before) {
            (Some(addr), Some(before)) => outcome_counters(addr).await.ok().map(|after| {
                after
                    .into_iter()
                    .map(|(key, n)| {
                        let n = n.saturating_sub(before.get(&key).copied().unwrap_or(0));
                        (key, n)
                    })
                    .filter(|(_, n)| *n > 0)
                    .collect::<BTreeMap<String, u64>>()
            }),
            _ => None,
        };
        print_phase("gateway", "client -> mxgate -> sink", &through);
        let per_message_us = |seconds: f64| seconds * 1e6 / through.ok.max(1) as f64;
        if let Some(cpu) = through.gateway_cpu {
            println!(
                "gateway CPU: {:.1} us/message (user {:.1} + system {:.1}; utime+stime {:.2} s over {} messages)",
                per_message_us(cpu.total()),
                per_message_us(cpu.user),
                per_message_us(cpu.system),
                cpu.total(),
                through.ok
            );
        }
        let peak_rss_mb = proc_status_kb(gateway.pid, "VmHWM:").map(kb_to_mb);
        if let Some(rss) = peak_rss_mb {
            println!("gateway peak RSS (VmHWM): {rss:.1} MB");
        }
        let ratio = if direct.msgs_per_s() > 0.0 {
            through.msgs_per_s() / direct.msgs_per_s()
        } else {
            0.0
        };
        println!("ratio gateway/direct msgs/s: {ratio:.3}");
        if let Some(ceiling) = &ceiling {
            println!(
                "ratio gateway/proxy msgs/s: {:.3} (of what an in-line relay can reach here)",
                through.msgs_per_s() / ceiling.phase.msgs_per_s().max(f64::MIN_POSITIVE)
            );
        }
        if let Some(queries) = dns_queries {
            println!(
                "DNS queries to the bench's server during the measured run: {queries}{}",
                if queries == 0 {
                    " (every answer came from the gateway's cache)"
                } else {
                    ""
                }
            );
        }
        let mut verified = None;
        if setup.checks() {
            match &outcomes {
                Some(outcomes) => {
                    let (dns_cache, checks): (Vec<_>, Vec<_>) = outcomes
                        .iter()
                        .partition(|(key, _)| key.starts_with("dns_cache_"));
                    println!(
                        "sender checks during the measured run (gateway metrics): {}",
                        checks
                            .iter()
                            .map(|(key, n)| format!("{key} {n}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    println!(
                        "gateway DNS cache look-ups per message: {} (a miss is a negative answer, which the resolver's own cache serves)",
                        dns_cache
                            .iter()
                            .map(|(key, n)| format!(
                                "{} {:.2}",
                                key.trim_start_matches("dns_cache_"),
                                **n as f64 / through.ok.max(1) as f64
                            ))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    let ok = through.ok as u64;
                    let count = |key: &str| outcomes.get(key).copied().unwrap_or(0);
                    let mut wanted = vec!["spf=pass", "dkim=pass", "dmarc=pass"];
                    if *setup == Setup::Seal {
                        wanted.push("arc_seal=sealed");
                    }
                    let short: Vec<String> = wanted
                        .iter()
                        .filter(|key| count(key) < ok)
                        .map(|key| format!("{key} {} of {ok}", count(key)))
                        .collect();
                    verified = Some(short.is_empty());
                    if !short.is_empty() {
                        loud(&format!(
                            "mode {}: not every delivered message passed the checks ({}): the figures do not measure what they claim",
                            setup.label(),
                            short.join(", ")
                        ));
                    }
                }
                None => loud(&format!(
                    "mode {}: cannot read the gateway's metrics: the check results are unverified",
                    setup.label()
                )),
            }
        }
        if let Some(received) = through.sink_messages
            && received < through.ok as u64
        {
            loud(&format!(
                "the sink received {received} messages but the gateway answered 250 to {}",
                through.ok
            ));
        }
        gateway.stop();
        if *setup == Setup::Seal
            && args.rsa_iterations > 0
            && let Some(zone) = &zone
        {
            rsa_measured.extend(rsa_floor(zone, args.rsa_iterations, "after the seal run").await);
        }
        runs.push(GatewayRun {
            setup: *setup,
            phase: through,
            peak_rss_mb,
            ratio,
            dns_queries,
            outcomes,
            verified,
        });
    }
    let direct = direct.expect("direct path measured");

    // Idle connections, against a fresh gateway (of the first mode) so that neither
    // measurement inherits the other's heap.
    let idle = if args.idle > 0 {
        match measure_idle(binary, &configs[0].1, dir.path(), args.idle, tls.clone()).await {
            Ok(idle) => Some(idle),
            Err(err) => {
                loud(&format!("idle-connection measurement failed: {err}"));
                None
            }
        }
    } else {
        None
    };

    // Costs: differences between modes, and the RSA floor.
    let cpu_of = |setup: Setup| {
        runs.iter()
            .find(|r| r.setup == setup)
            .and_then(GatewayRun::cpu_us_per_msg)
    };
    let (nocheck_cpu, full_cpu, seal_cpu) = (
        cpu_of(Setup::Nocheck),
        cpu_of(Setup::Full),
        cpu_of(Setup::Seal),
    );
    let checks_cpu = full_cpu.zip(nocheck_cpu).map(|(f, n)| f - n);
    let seal_extra_cpu = seal_cpu.zip(full_cpu).map(|(s, f)| s - f);
    let mean = |values: Vec<f64>| {
        (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
    };
    let sign_us = mean(rsa_measured.iter().map(|r| r.sign_us).collect());
    let verify_us = mean(rsa_measured.iter().map(|r| r.verify_us).collect());
    let checks_beyond_rsa = checks_cpu.zip(verify_us).map(|(c, v)| c - v);
    let floor_us = sign_us.map(|s| 2.0 * s);
    let floor_multiple = seal_cpu.zip(floor_us).map(|(s, f)| s / f);
    if checks {
        println!();
        println!("gateway CPU per message by mode:");
        for run in &runs {
            let cpu = run.phase.gateway_cpu.unwrap_or_default();
            let ok = run.phase.ok.max(1) as f64;
            println!(
                "  {:<8} {:>7.1} us/msg (user {:.1} + system {:.1}), {:.0} msgs/s",
                run.setup.label(),
                cpu.total() * 1e6 / ok,
                cpu.user * 1e6 / ok,
                cpu.system * 1e6 / ok,
                run.phase.msgs_per_s()
            );
        }
        if let Some(checks_cpu) = checks_cpu {
            println!("  cost of the checks (full - nocheck): {checks_cpu:.1} us/msg");
        }
        if let Some(seal_extra) = seal_extra_cpu {
            println!("  cost of sealing (seal - full): {seal_extra:.1} us/msg");
        }
        if rsa_measured.len() > 1
            && let (Some(sign_us), Some(verify_us)) = (sign_us, verify_us)
        {
            println!(
                "  RSA-2048 figures used: mean of the {} measurements: sign {sign_us:.1} us, verify {verify_us:.1} us",
                rsa_measured.len()
            );
        }
        if let (Some(checks_cpu), Some(verify_us), Some(beyond)) =
            (checks_cpu, verify_us, checks_beyond_rsa)
        {
            println!(
                "  checks beyond RSA verification: (full - nocheck) - 1 RSA-2048 verification = {checks_cpu:.1} - {verify_us:.1} = {beyond:.1} us/msg"
            );
        }
        if let (Some(seal), Some(floor), Some(multiple)) = (seal_cpu, floor_us, floor_multiple) {
            println!(
                "seal CPU/msg = {seal:.1} µs = {multiple:.2} × floor (2 signatures = {floor:.1} µs)"
            );
        }
    }

    let primary = &runs[0];
    let through = &primary.phase;
    let ratio = primary.ratio;
    let peak_rss_mb = primary.peak_rss_mb;
    let per_message_us = |seconds: f64| seconds * 1e6 / through.ok.max(1) as f64;
    let gateway_errors: usize = runs.iter().map(|r| r.phase.errors()).sum();
    let checks_verified = runs.iter().filter_map(|r| r.verified).reduce(|a, b| a && b);
    let errors = direct.errors() + gateway_errors + idle.as_ref().map_or(0, |i| i.failed);
    println!();
    println!("goals:");
    let goal = |ok: bool| if ok { "ok" } else { "MISSED" };
    println!(
        "  gateway msgs/s >= {:.0}% of direct: {:.1}% -- {}",
        GOAL_RATIO * 100.0,
        ratio * 100.0,
        goal(ratio >= GOAL_RATIO)
    );
    if let Some(ceiling) = &ceiling {
        println!(
            "    (the ceiling for any in-line relay on this machine: a TCP proxy that only copies bytes reaches {:.1}% of direct)",
            ceiling.ratio * 100.0
        );
    }
    if let Some(rss) = peak_rss_mb {
        println!(
            "  gateway peak RSS < {GOAL_PEAK_RSS_MB:.0} MB: {rss:.1} MB -- {}",
            goal(rss < GOAL_PEAK_RSS_MB)
        );
    }
    if let Some(idle) = &idle {
        println!(
            "  gateway RSS with {} idle connections < {GOAL_IDLE_RSS_MB:.0} MB: {:.1} MB (+{:.1} MB for the connections) -- {}",
            idle.opened,
            idle.after_mb,
            idle.delta_mb(),
            goal(idle.after_mb < GOAL_IDLE_RSS_MB)
        );
    }
    let goal_checks_ok = checks_beyond_rsa.map(|v| v < GOAL_CHECKS_BEYOND_RSA_US);
    if let Some(beyond) = checks_beyond_rsa {
        println!(
            "  full checks < {GOAL_CHECKS_BEYOND_RSA_US:.0} us CPU/msg beyond the RSA verification: {beyond:.1} us -- {}",
            goal(beyond < GOAL_CHECKS_BEYOND_RSA_US)
        );
    }
    let goal_seal_floor_ok = floor_multiple.map(|m| m < GOAL_SEAL_FLOOR_MULTIPLE);
    if let (Some(multiple), Some(floor)) = (floor_multiple, floor_us) {
        println!(
            "  seal CPU/msg < {GOAL_SEAL_FLOOR_MULTIPLE} x floor (2 RSA-2048 signatures = {floor:.1} us): {multiple:.2} x -- {}",
            goal(multiple < GOAL_SEAL_FLOOR_MULTIPLE)
        );
    }
    let goal_seal_total_ok = seal_cpu.map(|s| s < GOAL_SEAL_TOTAL_US);
    if let Some(seal) = seal_cpu {
        println!(
            "  checks + seal CPU/msg < {GOAL_SEAL_TOTAL_US:.0} us: {seal:.1} us -- {}",
            goal(seal < GOAL_SEAL_TOTAL_US)
        );
    }
    if errors > 0 {
        loud(&format!(
            "THIS RUN HAD {errors} ERRORS (direct {}, gateway {}, idle connections {}): the figures are NOT valid",
            direct.errors(),
            runs.iter()
                .map(|r| format!("{} {}", r.setup.label(), r.phase.errors()))
                .collect::<Vec<_>>()
                .join(", "),
            idle.as_ref().map_or(0, |i| i.failed)
        ));
    }

    let idle_ref = idle.as_ref();
    let round_opt = |value: Option<f64>, decimals: i32| value.map(|v| round(v, decimals));
    let summary = Summary {
        gateway_msgs_per_s: round(through.msgs_per_s(), 1),
        direct_msgs_per_s: round(direct.msgs_per_s(), 1),
        ratio: round(ratio, 4),
        gateway_p50_ms: round(through.percentile_ms(50.0), 3),
        gateway_p99_ms: round(through.percentile_ms(99.0), 3),
        gateway_max_ms: round(through.percentile_ms(100.0), 3),
        direct_p50_ms: round(direct.percentile_ms(50.0), 3),
        direct_p99_ms: round(direct.percentile_ms(99.0), 3),
        direct_max_ms: round(direct.percentile_ms(100.0), 3),
        gateway_cpu_us_per_msg: primary.cpu_us_per_msg().map(|v| round(v, 1)),
        gateway_cpu_user_us_per_msg: through
            .gateway_cpu
            .map(|c| round(per_message_us(c.user), 1)),
        gateway_cpu_system_us_per_msg: through
            .gateway_cpu
            .map(|c| round(per_message_us(c.system), 1)),
        gateway_peak_rss_mb: peak_rss_mb.map(|v| round(v, 2)),
        idle_connections: idle_ref.map(|i| i.opened),
        idle_rss_before_mb: idle_ref.map(|i| round(i.before_mb, 2)),
        idle_rss_after_mb: idle_ref.map(|i| round(i.after_mb, 2)),
        idle_rss_delta_mb: idle_ref.map(|i| round(i.delta_mb(), 2)),
        idle_kb_per_conn: idle_ref.map(|i| round(i.kb_per_conn(), 2)),
        errors,
        gateway_errors,
        direct_errors: direct.errors(),
        idle_errors: idle_ref.map_or(0, |i| i.failed),
        bench_cpu_us_per_msg_direct: round(direct.bench_cpu_us_per_msg(), 1),
        bench_cpu_us_per_msg_gateway: round(through.bench_cpu_us_per_msg(), 1),
        machine_cpu_busy_direct: round(direct.machine_busy, 3),
        machine_cpu_busy_gateway: round(through.machine_busy, 3),
        messages: args.messages,
        size,
        concurrency: args.concurrency,
        warmup: args.warmup,
        tls: args.tls,
        mode: args.mode.label(),
        cpus,
        goal_ratio_ok: ratio >= GOAL_RATIO,
        proxy_msgs_per_s: ceiling.as_ref().map(|c| round(c.phase.msgs_per_s(), 1)),
        proxy_ratio: ceiling.as_ref().map(|c| round(c.ratio, 4)),
        proxy_cpu_us_per_msg: ceiling
            .as_ref()
            .and_then(Ceiling::cpu_us_per_msg)
            .map(|v| round(v, 1)),
        gateway_to_proxy_ratio: ceiling.as_ref().map(|c| {
            round(
                through.msgs_per_s() / c.phase.msgs_per_s().max(f64::MIN_POSITIVE),
                4,
            )
        }),
        goal_peak_rss_ok: peak_rss_mb.map(|v| v < GOAL_PEAK_RSS_MB),
        goal_idle_rss_ok: idle_ref.map(|i| i.after_mb < GOAL_IDLE_RSS_MB),
        primary_mode: primary.setup.label(),
        dkim_signed: zone.is_some(),
        pool: pool.len(),
        nocheck_cpu_us_per_msg: round_opt(nocheck_cpu, 1),
        full_cpu_us_per_msg: round_opt(full_cpu, 1),
        seal_cpu_us_per_msg: round_opt(seal_cpu, 1),
        checks_cpu_us_per_msg: round_opt(checks_cpu, 1),
        seal_extra_cpu_us_per_msg: round_opt(seal_extra_cpu, 1),
        rsa2048_sign_us: round_opt(sign_us, 1),
        rsa2048_verify_us: round_opt(verify_us, 2),
        rsa2048_sign_us_measured: rsa_measured.iter().map(|r| round(r.sign_us, 1)).collect(),
        checks_beyond_rsa_verify_us_per_msg: round_opt(checks_beyond_rsa, 1),
        seal_floor_us: round_opt(floor_us, 1),
        seal_floor_multiple: round_opt(floor_multiple, 3),
        goal_checks_ok,
        goal_seal_floor_ok,
        goal_seal_total_ok,
        checks_verified,
        runs: runs.iter().map(GatewayRun::summary).collect(),
    };
    if args.keep_dir {
        let _ = dir.keep();
    }
    println!(
        "{}",
        serde_json::to_string(&summary).expect("summary serializes")
    );
    if errors > 0 || checks_verified == Some(false) {
        1
    } else {
        0
    }
}

/// The relay-ceiling run: the same load through a byte-copying TCP proxy.
struct Ceiling {
    phase: PhaseResult,
    /// Proxy msgs/s over direct msgs/s.
    ratio: f64,
}

impl Ceiling {
    fn cpu_us_per_msg(&self) -> Option<f64> {
        self.phase
            .gateway_cpu
            .map(|c| c.total() * 1e6 / self.phase.ok.max(1) as f64)
    }
}

/// Warm-up and measured run through [`proxy`], with the proxy process's CPU.
async fn measure_ceiling(
    args: &Args,
    spec: &LoadSpec,
    sink: &Sink,
    direct: &PhaseResult,
) -> Result<Ceiling, String> {
    let proxy = proxy::Proxy::spawn(spec.target)?;
    let spec_for = |messages: usize| LoadSpec {
        target: proxy.addr,
        tls: None,
        messages,
        concurrency: spec.concurrency,
        pool: spec.pool.clone(),
    };
    if args.warmup > 0 {
        run_load(spec_for(args.warmup), Some(proxy.pid), sink).await;
    }
    let phase = run_load(spec_for(args.messages), Some(proxy.pid), sink).await;
    print_phase("proxy  ", "client -> TCP proxy -> sink", &phase);
    let ceiling = Ceiling {
        ratio: phase.msgs_per_s() / direct.msgs_per_s().max(f64::MIN_POSITIVE),
        phase,
    };
    if let Some(cpu) = ceiling.cpu_us_per_msg() {
        println!(
            "proxy CPU: {cpu:.1} us/message (a process that copies bytes both ways and parses nothing)"
        );
    }
    println!(
        "ratio proxy/direct msgs/s: {:.3}: the most an in-line relay reaches on this machine",
        ceiling.ratio
    );
    if ceiling.phase.errors() > 0 {
        return Err(format!(
            "{} failed messages through the proxy ({})",
            ceiling.phase.errors(),
            ceiling.phase.error_summary()
        ));
    }
    Ok(ceiling)
}

/// One measured gateway configuration.
struct GatewayRun {
    setup: Setup,
    phase: PhaseResult,
    peak_rss_mb: Option<f64>,
    ratio: f64,
    /// Queries the bench's DNS server answered during the measured run.
    dns_queries: Option<usize>,
    /// What the checks found during the measured run (`check=result` and
    /// `arc_seal=result` counts, from the gateway's metrics).
    outcomes: Option<BTreeMap<String, u64>>,
    /// Whether every delivered message passed SPF, DKIM and DMARC (and was sealed).
    verified: Option<bool>,
}

impl GatewayRun {
    fn cpu_us_per_msg(&self) -> Option<f64> {
        self.phase
            .gateway_cpu
            .map(|c| c.total() * 1e6 / self.phase.ok.max(1) as f64)
    }

    fn summary(&self) -> RunSummary {
        let per_message = |seconds: f64| round(seconds * 1e6 / self.phase.ok.max(1) as f64, 1);
        RunSummary {
            mode: self.setup.label(),
            msgs_per_s: round(self.phase.msgs_per_s(), 1),
            ratio: round(self.ratio, 4),
            p50_ms: round(self.phase.percentile_ms(50.0), 3),
            p99_ms: round(self.phase.percentile_ms(99.0), 3),
            max_ms: round(self.phase.percentile_ms(100.0), 3),
            cpu_us_per_msg: self.phase.gateway_cpu.map(|c| per_message(c.total())),
            cpu_user_us_per_msg: self.phase.gateway_cpu.map(|c| per_message(c.user)),
            cpu_system_us_per_msg: self.phase.gateway_cpu.map(|c| per_message(c.system)),
            peak_rss_mb: self.peak_rss_mb.map(|v| round(v, 2)),
            ok: self.phase.ok,
            errors: self.phase.errors(),
            bench_cpu_us_per_msg: round(self.phase.bench_cpu_us_per_msg(), 1),
            machine_cpu_busy: round(self.phase.machine_busy, 3),
            dns_queries: self.dns_queries,
            checks: self.outcomes.clone(),
            checks_verified: self.verified,
        }
    }
}

/// Per-mode figures in the JSON summary.
#[derive(Serialize)]
struct RunSummary {
    mode: &'static str,
    msgs_per_s: f64,
    ratio: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    cpu_us_per_msg: Option<f64>,
    cpu_user_us_per_msg: Option<f64>,
    cpu_system_us_per_msg: Option<f64>,
    peak_rss_mb: Option<f64>,
    ok: usize,
    errors: usize,
    bench_cpu_us_per_msg: f64,
    machine_cpu_busy: f64,
    dns_queries: Option<usize>,
    checks: Option<BTreeMap<String, u64>>,
    checks_verified: Option<bool>,
}

/// Open files wanted: idle connections, load sessions and both ends of every sink
/// connection, with room to spare.
fn wanted_limit(args: &Args) -> u64 {
    (args.idle + 4 * args.concurrency + 256) as u64
}

fn round(value: f64, decimals: i32) -> f64 {
    let factor = 10f64.powi(decimals);
    (value * factor).round() / factor
}

fn kb_to_mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// An error that must not be overlooked: banner on stdout and stderr.
fn loud(text: &str) {
    let banner = "!".repeat(78);
    for line in [banner.as_str(), &format!("!!! ERROR: {text}"), &banner] {
        println!("{line}");
        eprintln!("{line}");
    }
}

/// The last line of the output, for tooling. Fields keep this order.
#[derive(Serialize)]
struct Summary {
    gateway_msgs_per_s: f64,
    direct_msgs_per_s: f64,
    /// gateway_msgs_per_s / direct_msgs_per_s.
    ratio: f64,
    gateway_p50_ms: f64,
    gateway_p99_ms: f64,
    gateway_max_ms: f64,
    direct_p50_ms: f64,
    direct_p99_ms: f64,
    direct_max_ms: f64,
    /// Gateway utime+stime over the measured run, per message.
    gateway_cpu_us_per_msg: Option<f64>,
    gateway_cpu_user_us_per_msg: Option<f64>,
    gateway_cpu_system_us_per_msg: Option<f64>,
    /// Gateway VmHWM after the measured run.
    gateway_peak_rss_mb: Option<f64>,
    idle_connections: Option<usize>,
    idle_rss_before_mb: Option<f64>,
    idle_rss_after_mb: Option<f64>,
    idle_rss_delta_mb: Option<f64>,
    idle_kb_per_conn: Option<f64>,
    errors: usize,
    gateway_errors: usize,
    direct_errors: usize,
    idle_errors: usize,
    /// CPU of this process (load generator and sink) per message.
    bench_cpu_us_per_msg_direct: f64,
    bench_cpu_us_per_msg_gateway: f64,
    /// Fraction of the whole machine's CPU time that was busy during the run.
    machine_cpu_busy_direct: f64,
    machine_cpu_busy_gateway: f64,
    messages: usize,
    size: usize,
    concurrency: usize,
    warmup: usize,
    tls: bool,
    mode: &'static str,
    cpus: usize,
    goal_ratio_ok: bool,
    /// The relay ceiling (a byte-copying TCP proxy in the gateway's place); `None` with
    /// --no-proxy.
    proxy_msgs_per_s: Option<f64>,
    proxy_ratio: Option<f64>,
    proxy_cpu_us_per_msg: Option<f64>,
    gateway_to_proxy_ratio: Option<f64>,
    goal_peak_rss_ok: Option<bool>,
    goal_idle_rss_ok: Option<bool>,
    /// The mode the figures above describe: the first of the run's modes.
    primary_mode: &'static str,
    /// Whether the messages were DKIM-signed (any checking mode in the run).
    dkim_signed: bool,
    /// Distinct messages sent in turn.
    pool: usize,
    /// Gateway CPU per message of each mode measured in this run.
    nocheck_cpu_us_per_msg: Option<f64>,
    full_cpu_us_per_msg: Option<f64>,
    seal_cpu_us_per_msg: Option<f64>,
    /// full - nocheck: the cost of the sender checks.
    checks_cpu_us_per_msg: Option<f64>,
    /// seal - full: the cost of sealing.
    seal_extra_cpu_us_per_msg: Option<f64>,
    /// CPU per RSA-2048 PKCS#1 v1.5 SHA-256 operation with aws-lc-rs, on one thread: the mean
    /// of the measurements (before the load, and after the seal run).
    rsa2048_sign_us: Option<f64>,
    rsa2048_verify_us: Option<f64>,
    rsa2048_sign_us_measured: Vec<f64>,
    /// checks_cpu_us_per_msg - rsa2048_verify_us.
    checks_beyond_rsa_verify_us_per_msg: Option<f64>,
    /// Two RSA-2048 signatures: the least sealing can cost.
    seal_floor_us: Option<f64>,
    /// seal_cpu_us_per_msg / seal_floor_us.
    seal_floor_multiple: Option<f64>,
    goal_checks_ok: Option<bool>,
    goal_seal_floor_ok: Option<bool>,
    goal_seal_total_ok: Option<bool>,
    /// Whether every message of every checking mode passed SPF, DKIM and DMARC (and was
    /// sealed in `seal` mode), by the gateway's metrics.
    checks_verified: Option<bool>,
    /// Every measured mode, in order.
    runs: Vec<RunSummary>,
}

// ---------------------------------------------------------------------------------------
// Gateway config and process

fn write_config(
    args: &Args,
    dir: &Path,
    sink: SocketAddr,
    setup: Setup,
    zone: Option<&SenderZone>,
) -> Result<PathBuf, String> {
    let trusted = match setup {
        Setup::Nocheck => "[\"127.0.0.0/8\"]",
        Setup::Full | Setup::Seal => "[]",
    };
    let max_connections = (args.idle + 2 * args.concurrency + 100).max(5000);
    let mut yaml = format!(
        "# Generated by mxgate-bench.\n\
         server:\n  hostname: {HOSTNAME}\n  listen: [\"127.0.0.1:0\"]\n  domains: [\"example.test\"]\n  \
         trusted_networks: {trusted}\n  max_connections: {max_connections}\n  \
         max_connections_per_ip: {max_connections}\n  timeouts:\n    shutdown_grace: 1s\n"
    );
    if args.tls {
        yaml.push_str(
            "tls:\n  certificate: cert.pem\n  private_key: key.pem\n  generate_if_missing: true\n",
        );
    }
    yaml.push_str(&format!(
        "backend: [\"smtp://{sink}\"]\nrelay:\n  tls: \"off\"\n  max_connections: {}\n",
        args.concurrency + 16
    ));
    // One client address sends the whole load: the per-client rates would measure
    // themselves, not the gateway.
    yaml.push_str(
        "limits:\n  connections_per_minute: 0\n  messages_per_minute: 0\n  recipients_per_minute: 0\n",
    );
    if let Some(zone) = zone {
        // The metrics tell whether the checks passed and the seals were made.
        yaml.push_str(&zone.config());
        yaml.push_str("metrics:\n  listen: \"127.0.0.1:0\"\n");
    }
    if setup == Setup::Seal {
        let key = zone
            .and_then(|z| z.arc_key.as_ref())
            .ok_or("seal mode without a sealing key")?;
        yaml.push_str(&format!(
            "arc:\n  domain: {ARC_DOMAIN}\n  selector: {ARC_SELECTOR}\n  private_key: {:?}\n",
            key.display().to_string()
        ));
    }
    if let Some(extra_path) = &args.config_extra {
        let extra_text = std::fs::read_to_string(extra_path)
            .map_err(|e| format!("cannot read {}: {e}", extra_path.display()))?;
        let extra: serde_yaml_ng::Value = serde_yaml_ng::from_str(&extra_text)
            .map_err(|e| format!("{}: {e}", extra_path.display()))?;
        if !extra.is_null() {
            let mut base: serde_yaml_ng::Value =
                serde_yaml_ng::from_str(&yaml).expect("generated config is YAML");
            merge_yaml(&mut base, extra);
            yaml = format!(
                "# Generated by mxgate-bench, merged with {}.\n{}",
                extra_path.display(),
                serde_yaml_ng::to_string(&base).map_err(|e| e.to_string())?
            );
        }
    }
    let path = dir.join(format!("mxgate-{}.yaml", setup.label()));
    std::fs::write(&path, &yaml).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

/// `extra` over `base`: mappings merge key by key, anything else replaces.
fn merge_yaml(base: &mut serde_yaml_ng::Value, extra: serde_yaml_ng::Value) {
    use serde_yaml_ng::Value;
    match (base, extra) {
        (Value::Mapping(base), Value::Mapping(extra)) => {
            for (key, value) in extra {
                match base.get_mut(&key) {
                    Some(existing) => merge_yaml(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, extra) => *base = extra,
    }
}

/// `mxgate serve` as a child process; SIGTERM (then SIGKILL) when dropped.
struct Gateway {
    child: Child,
    pid: i32,
    smtp: SocketAddr,
    /// The metrics listener, when the config has one.
    metrics: Option<SocketAddr>,
}

impl Gateway {
    fn spawn(binary: &Path, config: &Path, dir: &Path) -> Result<Gateway, String> {
        let log_path = dir.join("gateway.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let mut child = Command::new(binary)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut smtp, mut metrics) = (None, None);
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening smtp ") {
                    smtp = smtp.or(addr.trim().parse::<SocketAddr>().ok());
                } else if let Some(addr) = line.strip_prefix("listening metrics ") {
                    metrics = metrics.or(addr.trim().parse::<SocketAddr>().ok());
                } else if line == "ready" {
                    break;
                }
            }
            let _ = tx.send(smtp.map(|smtp| (smtp, metrics)));
            // Keep draining so the gateway never blocks on a full pipe.
            for _ in lines {}
        });
        let pid = child.id() as i32;
        let failed = |mut child: Child, why: &str| {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let config = std::fs::read_to_string(config).unwrap_or_default();
            format!("mxgate did not start ({why}).\nconfig:\n{config}\ngateway log:\n{log}")
        };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(Some((smtp, metrics))) => Ok(Gateway {
                child,
                pid,
                smtp,
                metrics,
            }),
            Ok(None) => Err(failed(
                child,
                "no `listening smtp` line before `ready`/exit",
            )),
            Err(_) => Err(failed(child, "no `ready` in time")),
        }
    }

    fn stop(&mut self) {
        unsafe {
            libc::kill(self.pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

// ---------------------------------------------------------------------------------------
// /proc and limits

struct NofileLimit {
    before: u64,
    soft: u64,
    hard: u64,
}

impl NofileLimit {
    fn describe(&self) -> String {
        if self.soft > self.before {
            format!("raised from {}", self.before)
        } else {
            "unchanged".into()
        }
    }
}

/// Raises RLIMIT_NOFILE of this process (and so of the gateway child, which inherits
/// it) to the hard limit, and the hard limit too when it is below `wanted` and we may.
// `rlim_t` is u64 on 64-bit Linux but not everywhere: the casts are deliberate.
#[allow(clippy::unnecessary_cast)]
fn raise_nofile_limit(wanted: u64) -> NofileLimit {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls with a valid pointer to a local.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    let before = limit.rlim_cur as u64;
    let hard = limit.rlim_max as u64;
    let mut target = libc::rlimit {
        rlim_cur: (hard.min(1 << 20)).max(before) as libc::rlim_t,
        rlim_max: limit.rlim_max,
    };
    if (target.rlim_cur as u64) < wanted {
        // Needs CAP_SYS_RESOURCE; falls back to the hard limit below.
        let raised = libc::rlimit {
            rlim_cur: wanted as libc::rlim_t,
            rlim_max: wanted as libc::rlim_t,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            target = raised;
        }
    }
    unsafe {
        libc::setrlimit(libc::RLIMIT_NOFILE, &target);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    NofileLimit {
        before,
        soft: limit.rlim_cur as u64,
        hard: limit.rlim_max as u64,
    }
}

/// CPU time of a process (all threads), in seconds.
#[derive(Clone, Copy, Debug, Default)]
struct CpuTime {
    user: f64,
    system: f64,
}

impl CpuTime {
    fn total(self) -> f64 {
        self.user + self.system
    }

    fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }
}

/// utime and stime of a process (this one for `None`) from /proc/<pid>/stat.
fn proc_cpu(pid: Option<i32>) -> Option<CpuTime> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".into(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    // The command name may contain spaces: fields are counted after its closing paren.
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Field 14 (utime) and 15 (stime) of proc(5); `after` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(CpuTime {
        user: utime as f64 / ticks,
        system: stime as f64 / ticks,
    })
}

/// A `Vm...:` line of /proc/<pid>/status, in kB.
fn proc_status_kb(pid: i32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// (busy, total) jiffies of the whole machine.
fn machine_cpu() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

// ---------------------------------------------------------------------------------------
// The sink: a minimal, cheap SMTP server

struct Sink {
    addr: SocketAddr,
    /// Messages the internal sink took.
    messages: Option<Arc<AtomicU64>>,
    /// Keeps the Postfix instance running (stopped and removed on drop).
    _postfix: Option<postfix::Postfix>,
}

impl Sink {
    async fn start() -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("sink bind");
        let addr = listener.local_addr().expect("sink address");
        let messages = Arc::new(AtomicU64::new(0));
        let counter = messages.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let counter = counter.clone();
                        tokio::spawn(async move {
                            let _ = sink_session(stream, counter).await;
                        });
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
        Sink {
            addr,
            messages: Some(messages),
            _postfix: None,
        }
    }

    /// A private Postfix that delivers everything for example.test into a Maildir.
    fn postfix() -> Result<Sink, String> {
        use postfix::{Postfix, PostfixOptions};
        let postfix = Postfix::start(PostfixOptions::mailbox(&["example.test"]))
            .map_err(|why| format!("cannot run Postfix as the sink: {why}"))?;
        Ok(Sink {
            addr: postfix.addr,
            messages: None,
            _postfix: Some(postfix),
        })
    }

    fn received(&self) -> Option<u64> {
        self.messages.as_ref().map(|m| m.load(Ordering::Relaxed))
    }
}

/// Finds the end of DATA: the strict `CRLF . CRLF`, where the CRLF that ended the DATA
/// command counts as the first one (so `.` CRLF right away is an empty message).
struct EndOfData {
    /// How many bytes of the marker the input seen so far ends with.
    matched: usize,
}

const END_OF_DATA: &[u8] = b"\r\n.\r\n";

impl EndOfData {
    fn new() -> Self {
        EndOfData { matched: 2 }
    }

    /// Feeds content; returns how many bytes of `input` belong to the message (marker
    /// included) when the marker was found.
    fn feed(&mut self, input: &[u8]) -> Option<usize> {
        // Continue a marker begun in earlier input. A mismatch cannot hide a marker that
        // starts before `input` (no proper suffix of a partial marker that ends before the
        // mismatch is a prefix of it), so the search below only looks inside `input`.
        if self.matched > 0 {
            let need = &END_OF_DATA[self.matched..];
            let n = need.len().min(input.len());
            if input[..n] == need[..n] {
                if n == need.len() {
                    return Some(n);
                }
                self.matched += n;
                return None;
            }
        }
        if let Some(pos) = memchr::memmem::find(input, END_OF_DATA) {
            return Some(pos + END_OF_DATA.len());
        }
        self.matched = (1..END_OF_DATA.len())
            .rev()
            .find(|&k| k <= input.len() && input.ends_with(&END_OF_DATA[..k]))
            .unwrap_or(0);
        None
    }
}

async fn sink_session(mut stream: TcpStream, messages: Arc<AtomicU64>) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.write_all(b"220 sink.bench ESMTP\r\n").await?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut start, mut end) = (0usize, 0usize);
    let mut out: Vec<u8> = Vec::with_capacity(512);
    let mut data: Option<EndOfData> = None;
    loop {
        let mut quit = false;
        while start < end {
            if let Some(eod) = &mut data {
                match eod.feed(&buf[start..end]) {
                    Some(used) => {
                        start += used;
                        data = None;
                        messages.fetch_add(1, Ordering::Relaxed);
                        out.extend_from_slice(b"250 2.0.0 Ok: queued\r\n");
                    }
                    None => start = end,
                }
                continue;
            }
            let Some(nl) = memchr::memchr(b'\n', &buf[start..end]) else {
                break;
            };
            let line = &buf[start..start + nl + 1];
            start += nl + 1;
            let verb = line.get(..4).map(|v| v.to_ascii_uppercase());
            match verb.as_deref() {
                Some(b"EHLO") => out.extend_from_slice(
                    b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 104857600\r\n",
                ),
                Some(b"HELO") => out.extend_from_slice(b"250 sink.bench\r\n"),
                Some(b"MAIL") => out.extend_from_slice(b"250 2.1.0 Ok\r\n"),
                Some(b"RCPT") => out.extend_from_slice(b"250 2.1.5 Ok\r\n"),
                Some(b"DATA") => {
                    out.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                    data = Some(EndOfData::new());
                }
                Some(b"RSET") | Some(b"NOOP") => out.extend_from_slice(b"250 2.0.0 Ok\r\n"),
                Some(b"QUIT") => {
                    out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                    quit = true;
                    break;
                }
                _ => out.extend_from_slice(b"500 5.5.2 Unknown command\r\n"),
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if quit {
            return Ok(());
        }
        if start == end {
            start = 0;
            end = 0;
        } else if end == buf.len() {
            if start == 0 {
                // A command line longer than the buffer: not something we send.
                return Ok(());
            }
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        let n = stream.read(&mut buf[end..]).await?;
        if n == 0 {
            return Ok(());
        }
        end += n;
    }
}

// ---------------------------------------------------------------------------------------
// Sender checks: the sender's zone, signed messages and the RSA cost floor

/// The sender's DNS zone, served by the test suite's DNS server in this process.
struct SenderZone {
    dns: dns::TestDns,
    /// The DKIM signing key (PKCS#8 PEM).
    dkim_pem: String,
    /// The ARC sealing key (PKCS#8 PEM) and the file the gateway reads it from.
    arc_pem: Option<String>,
    arc_key: Option<PathBuf>,
}

impl SenderZone {
    /// Starts the DNS server and publishes SPF for the sender domain and the HELO name,
    /// DMARC p=reject and a new RSA-2048 DKIM key; with `seal`, also a new RSA-2048 ARC
    /// key for the gateway, written to `dir`.
    async fn start(dir: &Path, seal: bool) -> Result<SenderZone, String> {
        use mxgate::keygen::{KeyAlgorithm, generate};
        let dns = dns::TestDns::start().await;
        let spf = "v=spf1 ip4:127.0.0.0/8 -all";
        dns.txt(SENDER_DOMAIN, spf);
        dns.txt(HELO_NAME, spf);
        dns.txt(&format!("_dmarc.{SENDER_DOMAIN}"), "v=DMARC1; p=reject");
        let dkim = generate(KeyAlgorithm::Rsa, 2048)?;
        dns.txt(
            &format!("{DKIM_SELECTOR}._domainkey.{SENDER_DOMAIN}"),
            &dkim.record,
        );
        let (arc_pem, arc_key) = if seal {
            let arc = generate(KeyAlgorithm::Rsa, 2048)?;
            let path = dir.join("arc-key.pem");
            std::fs::write(&path, &arc.private_pem)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            dns.txt(
                &format!("{ARC_SELECTOR}._domainkey.{ARC_DOMAIN}"),
                &arc.record,
            );
            (Some(arc.private_pem), Some(path))
        } else {
            (None, None)
        };
        Ok(SenderZone {
            dns,
            dkim_pem: dkim.private_pem,
            arc_pem,
            arc_key,
        })
    }

    /// The gateway's `dns:` section: this server only.
    fn config(&self) -> String {
        format!(
            "dns:\n  nameservers: [\"{}\"]\n  timeout: 2s\n  attempts: 2\n  cache_entries: 10000\n",
            self.dns.addr
        )
    }

    /// An RSA-2048 key for the floor measurement: the sealing key when there is one.
    fn rsa_pem(&self) -> &str {
        self.arc_pem.as_deref().unwrap_or(&self.dkim_pem)
    }
}

/// One message ready to send: the pipelined MAIL, RCPT and DATA, and the content with
/// the final `.` line.
struct Prepared {
    commands: Vec<u8>,
    data: Vec<u8>,
}

impl Prepared {
    fn new(data: Vec<u8>) -> Prepared {
        let commands = format!(
            "MAIL FROM:<{MAIL_FROM}> SIZE={}\r\nRCPT TO:<{RCPT_TO}>\r\nDATA\r\n",
            data.len() - 3
        )
        .into_bytes();
        Prepared { commands, data }
    }

    /// Bytes without the final `.` line.
    fn size(&self) -> usize {
        self.data.len() - 3
    }
}

/// `count` messages DKIM-signed by the sender domain (rsa-sha256, relaxed/relaxed), each
/// `size` bytes with its DKIM-Signature, each with its own Message-ID.
fn signed_pool(size: usize, count: usize, pkcs8_pem: &str) -> Result<Vec<Prepared>, String> {
    use mail_auth::common::crypto::{RsaKey, Sha256};
    use mail_auth::common::headers::HeaderWriter;
    use mail_auth::dkim::{Canonicalization, DkimSigner};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let der = PrivatePkcs8KeyDer::from_pem_slice(pkcs8_pem.as_bytes())
        .map_err(|e| format!("DKIM key: {e}"))?;
    let key = RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs8(der))
        .map_err(|e| format!("DKIM key: {e}"))?;
    let signer = DkimSigner::from_key(key)
        .domain(SENDER_DOMAIN)
        .selector(DKIM_SELECTOR)
        .headers([
            "From",
            "To",
            "Subject",
            "Date",
            "Message-ID",
            "MIME-Version",
            "Content-Type",
        ])
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed);
    // The DKIM-Signature's length: a first guess, corrected by the first signature.
    let mut overhead = 0;
    let mut pool = Vec::with_capacity(count);
    for n in 0..count {
        let id = format!("{n:06}");
        let mut attempt = 0;
        let signed = loop {
            let unsigned = build_message(size.saturating_sub(overhead), &id);
            let content = &unsigned[..unsigned.len() - 3];
            let header = signer
                .sign(content)
                .map_err(|e| format!("DKIM signing: {e}"))?
                .to_header();
            attempt += 1;
            if header.len() == overhead || attempt == 3 {
                let mut signed = header.into_bytes();
                signed.extend_from_slice(&unsigned);
                break signed;
            }
            overhead = header.len();
        };
        pool.push(Prepared::new(signed));
    }
    Ok(pool)
}

/// Measures the RSA-2048 costs on a thread of their own and prints them.
async fn rsa_floor(zone: &SenderZone, signs: usize, when: &str) -> Option<RsaCost> {
    let pem = zone.rsa_pem().to_string();
    match tokio::task::spawn_blocking(move || measure_rsa(&pem, signs)).await {
        Ok(Ok(rsa)) => {
            println!(
                "RSA-2048 with aws-lc-rs (PKCS#1 v1.5 SHA-256, one thread in this process, {when}), CPU per operation, median of {RSA_BATCHES} batches: sign {}, verify {}",
                rsa.sign.describe(),
                rsa.verify.describe()
            );
            Some(rsa)
        }
        Ok(Err(err)) => {
            loud(&format!("RSA measurement failed: {err}"));
            None
        }
        Err(err) => {
            loud(&format!("RSA measurement failed: {err}"));
            None
        }
    }
}

/// CPU per RSA-2048 operation with aws-lc-rs.
struct RsaCost {
    sign_us: f64,
    verify_us: f64,
    sign: BatchTiming,
    verify: BatchTiming,
}

/// Times `signs` RSA-2048 PKCS#1 v1.5 SHA-256 signatures and ten times as many
/// verifications with aws-lc-rs on the calling thread, by that thread's CPU time; the figures
/// are the median of ten batches.
fn measure_rsa(pkcs8_pem: &str, signs: usize) -> Result<RsaCost, String> {
    use aws_lc_rs::signature::{
        KeyPair, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256, RsaKeyPair, UnparsedPublicKey,
    };
    use rustls_pki_types::PrivatePkcs8KeyDer;
    use rustls_pki_types::pem::PemObject;
    let der = PrivatePkcs8KeyDer::from_pem_slice(pkcs8_pem.as_bytes())
        .map_err(|e| format!("RSA key: {e}"))?;
    let key =
        RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).map_err(|e| format!("RSA key: {e}"))?;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    // About what a seal signs: a few header fields.
    let data: Vec<u8> = (0..512u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut signature = vec![0u8; key.public_modulus_len()];
    // Parsed on every verification, as mail-auth does.
    let public = key.public_key().as_ref().to_vec();
    let sign = |signature: &mut [u8]| {
        key.sign(&RSA_PKCS1_SHA256, &rng, &data, signature)
            .map_err(|e| format!("RSA signing: {e}"))
    };
    let verify = |signature: &[u8]| {
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &public)
            .verify(&data, signature)
            .map_err(|e| format!("RSA verification: {e}"))
    };
    for _ in 0..10 {
        sign(&mut signature)?;
        verify(&signature)?;
    }
    let sign = timed_batches(signs, || sign(&mut signature))?;
    let verify = timed_batches(signs * 10, || verify(&signature))?;
    Ok(RsaCost {
        sign_us: sign.median_us,
        verify_us: verify.median_us,
        sign,
        verify,
    })
}

/// Batches an operation is timed in: the median batch is the figure, so that a moment
/// of interference (other processes, a hypervisor's steal) does not move it.
const RSA_BATCHES: usize = 10;

/// CPU per operation, by the calling thread's CPU time, over batches.
struct BatchTiming {
    median_us: f64,
    min_us: f64,
    max_us: f64,
    ops: usize,
    wall: Duration,
}

impl BatchTiming {
    fn describe(&self) -> String {
        format!(
            "{:.1} us ({} in {:.2} s; batches {:.1}..{:.1} us)",
            self.median_us,
            self.ops,
            self.wall.as_secs_f64(),
            self.min_us,
            self.max_us
        )
    }
}

fn timed_batches(
    total: usize,
    mut op: impl FnMut() -> Result<(), String>,
) -> Result<BatchTiming, String> {
    let batches = RSA_BATCHES.min(total.max(1));
    let per_batch = (total / batches).max(1);
    let mut samples = Vec::with_capacity(batches);
    let wall = Instant::now();
    for _ in 0..batches {
        let cpu = thread_cpu_seconds();
        for _ in 0..per_batch {
            op()?;
        }
        samples.push((thread_cpu_seconds() - cpu) * 1e6 / per_batch as f64);
    }
    let wall = wall.elapsed();
    samples.sort_by(f64::total_cmp);
    let middle = samples.len() / 2;
    let median_us = if samples.len() % 2 == 0 {
        (samples[middle - 1] + samples[middle]) / 2.0
    } else {
        samples[middle]
    };
    Ok(BatchTiming {
        median_us,
        min_us: samples[0],
        max_us: samples[samples.len() - 1],
        ops: per_batch * batches,
        wall,
    })
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a local.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The gateway's counters of what the checks found: `check=result` from
/// `mxgate_auth_results_total`, `arc_seal=result` from `mxgate_arc_seals_total` and
/// `dns_cache_<type>=<hit|miss>` from `mxgate_dns_cache_requests_total`.
async fn outcome_counters(metrics: SocketAddr) -> Result<BTreeMap<String, u64>, String> {
    let fetch = async {
        let mut stream = TcpStream::connect(metrics).await?;
        // HTTP/1.0: the body ends when the connection closes, never chunked.
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut body = Vec::new();
        stream.read_to_end(&mut body).await?;
        Ok::<_, io::Error>(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .map_err(|_| "metrics: timeout".to_string())?
        .map_err(|e| format!("metrics: {e}"))?;
    let text = String::from_utf8_lossy(&body);
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let (kind, rest) = if let Some(rest) = line.strip_prefix("mxgate_auth_results_total{") {
            ("auth", rest)
        } else if let Some(rest) = line.strip_prefix("mxgate_arc_seals_total{") {
            ("seal", rest)
        } else if let Some(rest) = line.strip_prefix("mxgate_dns_cache_requests_total{") {
            ("dns", rest)
        } else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let label = |name: &str| {
            labels.split(',').find_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                (key.trim() == name).then(|| value.trim().trim_matches('"').to_string())
            })
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let key = match kind {
            "auth" => format!(
                "{}={}",
                label("check").unwrap_or_default(),
                label("result").unwrap_or_default()
            ),
            "seal" => format!("arc_seal={}", label("result").unwrap_or_default()),
            _ => format!(
                "dns_cache_{}={}",
                label("type").unwrap_or_default(),
                label("result").unwrap_or_default()
            ),
        };
        *out.entry(key).or_default() += value as u64;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// The load generator

/// A message of `size` bytes (without the final `.` line, which it ends with); `id` goes
/// into the Message-ID.
fn build_message(size: usize, id: &str) -> Vec<u8> {
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

#[derive(Clone)]
struct ClientTls {
    connector: tokio_rustls::TlsConnector,
    name: rustls_pki_types::ServerName<'static>,
}

/// Trusts the gateway's generated development certificate, for `mx.example.test`.
fn client_tls(cert: &Path) -> Result<ClientTls, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read {}: {e}", cert.display()))?
    {
        let cert = cert.map_err(|e| format!("bad certificate: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("bad certificate: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(ClientTls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        name: rustls_pki_types::ServerName::try_from(HOSTNAME.to_string())
            .map_err(|e| e.to_string())?,
    })
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

fn protocol_error(text: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, text)
}

/// One client SMTP session.
struct Client {
    io: Stream,
    buf: Vec<u8>,
    pos: usize,
}

impl Client {
    /// Connects, reads the greeting, says EHLO, and with `tls` does STARTTLS and EHLO
    /// again.
    async fn open(target: SocketAddr, tls: Option<&ClientTls>) -> io::Result<Client> {
        let tcp = TcpStream::connect(target).await?;
        tcp.set_nodelay(true)?;
        let mut client = Client {
            io: Stream::Plain(tcp),
            buf: Vec::with_capacity(4096),
            pos: 0,
        };
        client.expect(220, "greeting").await?;
        let ehlo = format!("EHLO {HELO_NAME}\r\n");
        client.command(ehlo.as_bytes(), 250).await?;
        if let Some(tls) = tls {
            client.command(b"STARTTLS\r\n", 220).await?;
            let Stream::Plain(tcp) = client.io else {
                unreachable!("TLS already active");
            };
            let stream = tls.connector.connect(tls.name.clone(), tcp).await?;
            client = Client {
                io: Stream::Tls(Box::new(stream)),
                buf: Vec::with_capacity(4096),
                pos: 0,
            };
            client.command(ehlo.as_bytes(), 250).await?;
        }
        Ok(client)
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    async fn command(&mut self, line: &[u8], want: u16) -> io::Result<()> {
        self.send(line).await?;
        let what = String::from_utf8_lossy(line).trim().to_string();
        self.expect(want, &what).await
    }

    async fn expect(&mut self, want: u16, what: &str) -> io::Result<()> {
        let code = self.reply().await?;
        if code != want {
            return Err(protocol_error(format!("{what}: got {code}, want {want}")));
        }
        Ok(())
    }

    /// Reads one complete (possibly multi-line) reply; returns its code.
    async fn reply(&mut self) -> io::Result<u16> {
        loop {
            while let Some(nl) = memchr::memchr(b'\n', &self.buf[self.pos..]) {
                let line = &self.buf[self.pos..self.pos + nl + 1];
                self.pos += nl + 1;
                let code = line
                    .get(..3)
                    .and_then(|c| std::str::from_utf8(c).ok())
                    .and_then(|c| c.parse::<u16>().ok())
                    .ok_or_else(|| {
                        protocol_error(format!(
                            "bad reply line {:?}",
                            String::from_utf8_lossy(line)
                        ))
                    })?;
                if line.get(3) != Some(&b'-') {
                    if self.pos == self.buf.len() {
                        self.buf.clear();
                        self.pos = 0;
                    }
                    return Ok(code);
                }
            }
            if self.pos == self.buf.len() {
                self.buf.clear();
                self.pos = 0;
            }
            if self.buf.len() > 64 * 1024 {
                return Err(protocol_error("reply too long".into()));
            }
            self.buf.reserve(4096);
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// One pipelined transaction: MAIL, RCPT and DATA in one write, the three replies,
    /// then the content and the final reply. Returns every reply code.
    async fn transaction(&mut self, commands: &[u8], message: &[u8]) -> io::Result<[u16; 4]> {
        self.send(commands).await?;
        let mail = self.reply().await?;
        let rcpt = self.reply().await?;
        let data = self.reply().await?;
        if data != 354 {
            self.send(b"RSET\r\n").await?;
            self.reply().await?;
            return Ok([mail, rcpt, data, 0]);
        }
        self.send(message).await?;
        let done = self.reply().await?;
        Ok([mail, rcpt, data, done])
    }

    async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            self.send(b"QUIT\r\n").await?;
            self.reply().await?;
            self.io.shutdown().await
        })
        .await;
    }
}

struct LoadSpec {
    target: SocketAddr,
    tls: Option<ClientTls>,
    messages: usize,
    concurrency: usize,
    /// Sent in turn: message n is `pool[n % pool.len()]`.
    pool: Arc<[Prepared]>,
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

struct PhaseResult {
    ok: usize,
    failures: BTreeMap<String, usize>,
    /// Sorted.
    latencies_us: Vec<u32>,
    elapsed: Duration,
    gateway_cpu: Option<CpuTime>,
    bench_cpu: CpuTime,
    machine_busy: f64,
    /// Messages the sink took during the run (`None` for Postfix, which counts its own).
    sink_messages: Option<u64>,
}

impl PhaseResult {
    fn errors(&self) -> usize {
        self.failures.values().sum()
    }

    fn msgs_per_s(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Nearest-rank percentile, in milliseconds.
    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.latencies_us.len() as f64).ceil() as usize;
        let index = rank.clamp(1, self.latencies_us.len()) - 1;
        self.latencies_us[index] as f64 / 1000.0
    }

    fn bench_cpu_us_per_msg(&self) -> f64 {
        self.bench_cpu.total() * 1e6 / self.ok.max(1) as f64
    }

    fn error_summary(&self) -> String {
        self.failures
            .iter()
            .map(|(what, n)| format!("{n}x {what}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn print_phase(name: &str, path: &str, r: &PhaseResult) {
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

/// Runs `spec.messages` transactions over `spec.concurrency` sessions. Sessions are set
/// up before the clock starts and closed after it stops.
async fn run_load(spec: LoadSpec, gateway_pid: Option<i32>, sink: &Sink) -> PhaseResult {
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
    let open = || async {
        match tokio::time::timeout(SETUP_TIMEOUT, Client::open(spec.target, spec.tls.as_ref()))
            .await
        {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(err)) => Err(format!("session setup: {err}")),
            Err(_) => Err("session setup: timeout".to_string()),
        }
    };
    let mut client = match open().await {
        Ok(client) => Some(client),
        Err(err) => {
            result.fail(err);
            None
        }
    };
    // Sessions ready; then wait for the counters to be read.
    start.wait().await;
    start.wait().await;
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        if n >= spec.messages {
            break;
        }
        let item = &spec.pool[n % spec.pool.len()];
        let session = match client.as_mut() {
            Some(session) => session,
            None => match open().await {
                Ok(session) => client.insert(session),
                Err(err) => {
                    result.fail(err);
                    // Do not spin against a dead gateway.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let started = Instant::now();
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
            }
            Ok(Err(err)) => {
                result.fail(format!("I/O: {err}"));
                client = None;
            }
            Err(_) => {
                result.fail("transaction timeout".into());
                client = None;
            }
        }
    }
    stop.wait().await;
    if let Some(client) = client {
        client.quit().await;
    }
    result
}

// ---------------------------------------------------------------------------------------
// Idle connections

struct IdleResult {
    opened: usize,
    failed: usize,
    before_mb: f64,
    after_mb: f64,
}

impl IdleResult {
    fn delta_mb(&self) -> f64 {
        self.after_mb - self.before_mb
    }

    fn kb_per_conn(&self) -> f64 {
        self.delta_mb() * 1024.0 / self.opened.max(1) as f64
    }
}

async fn measure_idle(
    binary: &Path,
    config: &Path,
    dir: &Path,
    count: usize,
    tls: Option<ClientTls>,
) -> Result<IdleResult, String> {
    let mut gateway = Gateway::spawn(binary, config, dir)?;
    // Let start-up (backend probe, first reload poll) settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = proc_status_kb(gateway.pid, "VmRSS:").ok_or("cannot read gateway VmRSS")?;
    let target = gateway.smtp;
    // Open in parallel, but not so many at once that the accept backlog overflows.
    let permits = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let permits = permits.clone();
        let tls = tls.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            tokio::time::timeout(SETUP_TIMEOUT, Client::open(target, tls.as_ref())).await
        }));
    }
    let mut held = Vec::with_capacity(count);
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    for task in tasks {
        match task.await {
            Ok(Ok(Ok(client))) => held.push(client),
            Ok(Ok(Err(err))) => *failures.entry(err.to_string()).or_default() += 1,
            Ok(Err(_)) => *failures.entry("timeout".into()).or_default() += 1,
            Err(err) => *failures.entry(err.to_string()).or_default() += 1,
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = proc_status_kb(gateway.pid, "VmRSS:").ok_or("cannot read gateway VmRSS")?;
    let result = IdleResult {
        opened: held.len(),
        failed: failures.values().sum(),
        before_mb: kb_to_mb(before),
        after_mb: kb_to_mb(after),
    };
    println!(
        "idle connections: {} held ({}), gateway VmRSS {:.1} MB -> {:.1} MB: +{:.1} MB, {:.1} KB per connection{}",
        result.opened,
        if tls.is_some() {
            "greeting, EHLO, STARTTLS, EHLO"
        } else {
            "greeting, EHLO"
        },
        result.before_mb,
        result.after_mb,
        result.delta_mb(),
        result.kb_per_conn(),
        match proc_status_kb(gateway.pid, "VmHWM:") {
            Some(hwm) => format!(" (VmHWM {:.1} MB)", kb_to_mb(hwm)),
            None => String::new(),
        }
    );
    if result.failed > 0 {
        let text = failures
            .iter()
            .map(|(what, n)| format!("{n}x {what}"))
            .collect::<Vec<_>>()
            .join(", ");
        loud(&format!(
            "{} of {count} idle connections could not be set up: {text}",
            result.failed
        ));
    }
    drop(held);
    gateway.stop();
    Ok(result)
}
