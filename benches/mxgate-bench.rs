//! mxgate load benchmark.
//!
//! Pushes the same SMTP load twice into an in-process SMTP sink: once through the
//! gateway (`mxgate serve` as a child process, relaying in-line to the sink) and once
//! straight into the sink (the "direct path"), then compares them. Also measures what
//! idle connections cost the gateway in memory.
//!
//! Run: `cargo bench --bench mxgate-bench -- [options]` (`-- --help` lists them).
//!
//! Everything (load generator, sink, gateway) shares one machine, so the figures are
//! relative: the ratio gateway / direct and the gateway's CPU per message are the
//! numbers to track, not the absolute rate. The output ends with a one-line JSON summary.

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

#[derive(Parser, Debug)]
#[command(
    name = "mxgate-bench",
    about = "Load benchmark: SMTP through mxgate into an in-process sink, compared with the same load straight into the sink",
    after_help = "Run as `cargo bench --bench mxgate-bench -- [options]`. The gateway is the \
release-built `mxgate` binary, started as `mxgate serve` with a generated config in a \
temporary directory (listen 127.0.0.1:0, backend smtp://127.0.0.1:<sink>, relay.tls off, \
server.max_connections and max_connections_per_ip 5000). The bench raises its own open-files \
limit (RLIMIT_NOFILE); the gateway child inherits it. Output: human-readable lines, then a \
single-line JSON summary as the last line. The exit status is 1 when any message failed."
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

    /// Sender checks: `nocheck` puts 127.0.0.0/8 in trusted_networks (relayed without
    /// SPF/DKIM/DMARC/ARC/iprev, like OpenDMARC's IgnoreHosts); `full` trusts nobody, so
    /// the gateway runs its sender checks on every message (on gateways that predate the
    /// checks, `full` behaves like `nocheck`). The checks query DNS through the gateway's
    /// resolver (sender domain bench.example.net, client 127.0.0.1, HELO
    /// client.bench.example.net); results are cached, so after the warm-up this measures
    /// the checks' CPU rather than DNS latency. For controlled figures point
    /// `dns.nameservers` at a local resolver with --config-extra.
    #[arg(long, value_enum, default_value_t = Mode::Nocheck)]
    mode: Mode,

    /// YAML file merged into the generated gateway config: appended, with keys it repeats
    /// taking precedence (mappings are merged key by key), e.g. `log: {level: warn}` or
    /// `relay: {pool_wait: 5s}`.
    #[arg(long, value_name = "FILE")]
    config_extra: Option<PathBuf>,

    /// Keep the temporary directory (gateway config, certificate, gateway log) and print
    /// its path.
    #[arg(long)]
    keep_dir: bool,

    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,

    /// Benchmark name filters `cargo bench` may pass through; ignored.
    #[arg(hide = true)]
    filters: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// 127.0.0.0/8 is in trusted_networks: relayed without sender checks.
    Nocheck,
    /// trusted_networks is empty: sender checks run on every message.
    Full,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Nocheck => "nocheck",
            Mode::Full => "full",
        }
    }
}

fn main() {
    let args = Args::parse();
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
    let message = Arc::new(build_message(args.size));
    let commands: Arc<[u8]> = format!(
        "MAIL FROM:<{MAIL_FROM}> SIZE={}\r\nRCPT TO:<{RCPT_TO}>\r\nDATA\r\n",
        message.len() - 3
    )
    .into_bytes()
    .into();

    let sink = Sink::start().await;
    let config_path = match write_config(&args, dir.path(), sink.addr) {
        Ok(path) => path,
        Err(err) => {
            eprintln!("{err}");
            return 2;
        }
    };
    let binary = Path::new(env!("CARGO_BIN_EXE_mxgate"));

    println!(
        "mxgate-bench: {} messages x {} bytes, concurrency {}, warm-up {}, mode {}, client TLS {}",
        args.messages,
        message.len() - 3,
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

    let mut gateway = match Gateway::spawn(binary, &config_path, dir.path()) {
        Ok(gateway) => gateway,
        Err(err) => {
            eprintln!("{err}");
            return 2;
        }
    };
    println!(
        "gateway: {} (pid {}) smtp {}; sink smtp {}",
        binary.display(),
        gateway.pid,
        gateway.smtp,
        sink.addr
    );
    if args.keep_dir {
        println!("temporary directory (kept): {}", dir.path().display());
    }

    let tls = if args.tls {
        match client_tls(&dir.path().join("cert.pem")) {
            Ok(tls) => Some(tls),
            Err(err) => {
                eprintln!("{err}");
                return 2;
            }
        }
    } else {
        None
    };
    let load = |target: SocketAddr, tls: Option<ClientTls>, n: usize| LoadSpec {
        target,
        tls,
        messages: n,
        concurrency: args.concurrency,
        commands: commands.clone(),
        message: message.clone(),
    };

    // Direct path: warm-up, then measured.
    if args.warmup > 0 {
        run_load(load(sink.addr, None, args.warmup), None, &sink).await;
    }
    let direct = run_load(load(sink.addr, None, args.messages), None, &sink).await;
    print_phase("direct ", "client -> sink", &direct);

    // Gateway path: warm-up (fills the gateway's backend pool), then measured.
    if args.warmup > 0 {
        let warm = run_load(
            load(gateway.smtp, tls.clone(), args.warmup),
            Some(gateway.pid),
            &sink,
        )
        .await;
        if warm.errors() > 0 {
            loud(&format!(
                "warm-up through the gateway had {} failed messages ({})",
                warm.errors(),
                warm.error_summary()
            ));
        }
    }
    let through = run_load(
        load(gateway.smtp, tls.clone(), args.messages),
        Some(gateway.pid),
        &sink,
    )
    .await;
    print_phase("gateway", "client -> mxgate -> sink", &through);
    let per_message_us = |seconds: f64| seconds * 1e6 / through.ok.max(1) as f64;
    let gateway_cpu_us = through.gateway_cpu.map(|c| per_message_us(c.total()));
    let peak_rss_mb = proc_status_kb(gateway.pid, "VmHWM:").map(kb_to_mb);
    let ratio = if direct.msgs_per_s() > 0.0 {
        through.msgs_per_s() / direct.msgs_per_s()
    } else {
        0.0
    };
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
    if let Some(rss) = peak_rss_mb {
        println!("gateway peak RSS (VmHWM): {rss:.1} MB");
    }
    println!("ratio gateway/direct msgs/s: {ratio:.3}");
    let relayed_ok = through.sink_messages >= through.ok as u64;
    if !relayed_ok {
        loud(&format!(
            "the sink received {} messages but the gateway answered 250 to {}",
            through.sink_messages, through.ok
        ));
    }
    gateway.stop();

    // Idle connections, against a fresh gateway so that neither measurement inherits the
    // other's heap.
    let idle = if args.idle > 0 {
        match measure_idle(binary, &config_path, dir.path(), args.idle, tls.clone()).await {
            Ok(idle) => Some(idle),
            Err(err) => {
                loud(&format!("idle-connection measurement failed: {err}"));
                None
            }
        }
    } else {
        None
    };

    let errors = direct.errors() + through.errors() + idle.as_ref().map_or(0, |i| i.failed);
    println!();
    println!("goals:");
    let goal = |ok: bool| if ok { "ok" } else { "MISSED" };
    println!(
        "  gateway msgs/s >= {:.0}% of direct: {:.1}% -- {}",
        GOAL_RATIO * 100.0,
        ratio * 100.0,
        goal(ratio >= GOAL_RATIO)
    );
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
    if errors > 0 {
        loud(&format!(
            "THIS RUN HAD {errors} ERRORS (direct {}, gateway {}, idle connections {}): the figures are NOT valid",
            direct.errors(),
            through.errors(),
            idle.as_ref().map_or(0, |i| i.failed)
        ));
    }

    let idle_ref = idle.as_ref();
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
        gateway_cpu_us_per_msg: gateway_cpu_us.map(|v| round(v, 1)),
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
        gateway_errors: through.errors(),
        direct_errors: direct.errors(),
        idle_errors: idle_ref.map_or(0, |i| i.failed),
        bench_cpu_us_per_msg_direct: round(direct.bench_cpu_us_per_msg(), 1),
        bench_cpu_us_per_msg_gateway: round(through.bench_cpu_us_per_msg(), 1),
        machine_cpu_busy_direct: round(direct.machine_busy, 3),
        machine_cpu_busy_gateway: round(through.machine_busy, 3),
        messages: args.messages,
        size: message.len() - 3,
        concurrency: args.concurrency,
        warmup: args.warmup,
        tls: args.tls,
        mode: args.mode.label(),
        cpus,
        goal_ratio_ok: ratio >= GOAL_RATIO,
        goal_peak_rss_ok: peak_rss_mb.map(|v| v < GOAL_PEAK_RSS_MB),
        goal_idle_rss_ok: idle_ref.map(|i| i.after_mb < GOAL_IDLE_RSS_MB),
    };
    if args.keep_dir {
        let _ = dir.keep();
    }
    println!(
        "{}",
        serde_json::to_string(&summary).expect("summary serializes")
    );
    if errors > 0 { 1 } else { 0 }
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
    goal_peak_rss_ok: Option<bool>,
    goal_idle_rss_ok: Option<bool>,
}

// ---------------------------------------------------------------------------------------
// Gateway config and process

fn write_config(args: &Args, dir: &Path, sink: SocketAddr) -> Result<PathBuf, String> {
    let trusted = match args.mode {
        Mode::Nocheck => "[\"127.0.0.0/8\"]",
        Mode::Full => "[]",
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
    let path = dir.join("mxgate.yaml");
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
            let mut smtp = None;
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening smtp ") {
                    smtp = smtp.or(addr.trim().parse::<SocketAddr>().ok());
                } else if line == "ready" {
                    break;
                }
            }
            let _ = tx.send(smtp);
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
            Ok(Some(smtp)) => Ok(Gateway { child, pid, smtp }),
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
    messages: Arc<AtomicU64>,
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
        Sink { addr, messages }
    }

    fn received(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
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
// The load generator

fn build_message(size: usize) -> Vec<u8> {
    let mut message = format!(
        "From: Bench Sender <{MAIL_FROM}>\r\n\
         To: <{RCPT_TO}>\r\n\
         Subject: mxgate benchmark message\r\n\
         Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n\
         Message-ID: <bench.1@bench.example.net>\r\n\
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
        client
            .command(b"EHLO client.bench.example.net\r\n", 250)
            .await?;
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
            client
                .command(b"EHLO client.bench.example.net\r\n", 250)
                .await?;
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
    commands: Arc<[u8]>,
    message: Arc<Vec<u8>>,
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
    sink_messages: u64,
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
    start.wait().await;
    let sink_before = sink.received();
    let gateway_cpu_before = gateway_pid.and_then(|pid| proc_cpu(Some(pid)));
    let bench_cpu_before = proc_cpu(None).unwrap_or_default();
    let machine_before = machine_cpu();
    let started = Instant::now();
    stop.wait().await;
    let elapsed = started.elapsed();
    let gateway_cpu_after = gateway_pid.and_then(|pid| proc_cpu(Some(pid)));
    let bench_cpu_after = proc_cpu(None).unwrap_or_default();
    let machine_after = machine_cpu();
    let sink_messages = sink.received() - sink_before;

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
    start.wait().await;
    while next.fetch_add(1, Ordering::Relaxed) < spec.messages {
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
            session.transaction(&spec.commands, &spec.message),
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
