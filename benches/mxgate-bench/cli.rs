//! The command line: options, the modes a run measures and the gateway configuration
//! of each. Owns nothing at run time; calls nothing.

use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

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
pub struct Args {
    /// Messages per measured run, for each path (gateway and direct).
    #[arg(long, default_value_t = 20_000)]
    pub messages: usize,

    /// Message size in bytes (header and body, CRLF line endings, without the final `.`).
    #[arg(long, default_value_t = 4096)]
    pub size: usize,

    /// Concurrent client sessions (each one SMTP connection, reused for many messages;
    /// with --per-connection, each opens a new connection per message).
    #[arg(long, default_value_t = 50)]
    pub concurrency: usize,

    /// One message per connection, as real MX traffic arrives: for every message the
    /// client connects, reads the greeting, says EHLO (with --tls: STARTTLS, a full TLS
    /// handshake and EHLO again), sends MAIL/RCPT/DATA and QUITs. The connection set-up
    /// that otherwise happens before the clock starts is then inside the measured loop,
    /// so msgs/s and the gateway's CPU per message include the connection's cost
    /// (and iprev and HELO SPF, once per connection, in the checking modes). The direct
    /// and proxy runs do the same, in plaintext (the sink does not speak TLS); the
    /// gateway keeps its own pooled connections to the sink. Latency is from connect to
    /// the reply to the final `.`.
    #[arg(long)]
    pub per_connection: bool,

    /// Connections to open against a fresh gateway (of the first mode) to measure what a
    /// connection costs without mail: --concurrency workers, each opening one connection
    /// after another (greeting, EHLO, with --tls STARTTLS and EHLO, QUIT, close), after a
    /// warm-up of min(--warmup, N) connections. Reports the gateway's CPU per connection
    /// (utime+stime from /proc over the run / N) and connections/s. 0 skips it.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub connection_cost: usize,

    /// Warm-up messages per path before each measured run (not counted).
    #[arg(long, default_value_t = 1000)]
    pub warmup: usize,

    /// Idle connections to open against a fresh gateway (greeting + EHLO, then held) to
    /// measure their memory cost; 0 skips the measurement.
    #[arg(long, default_value_t = 1000)]
    pub idle: usize,

    /// Share of the idle connections that do STARTTLS (and EHLO again) before being held,
    /// 0.0 to 1.0. The plaintext ones are opened first and the gateway's RSS read, then
    /// the TLS ones, so each kind gets its own figure per connection. The idle gateway
    /// gets the same generated development certificate as with --tls, with or without
    /// --tls. Default: 1.0 with --tls (every idle connection does STARTTLS, as before this
    /// option existed), 0.0 without.
    #[arg(long, value_name = "F", value_parser = parse_share)]
    pub idle_tls_share: Option<f64>,

    /// Client sessions to the gateway use STARTTLS (the gateway gets a generated
    /// self-signed development certificate). The direct path stays plaintext: the sink
    /// does not speak TLS. The client never resumes a TLS session: every handshake is a
    /// full one, as on a first contact.
    #[arg(long)]
    pub tls: bool,

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
    pub mode: Mode,

    /// Distinct pre-signed messages to send in turn (checking modes only).
    #[arg(long, default_value_t = 64)]
    pub pool: usize,

    /// RSA-2048 signatures timed with aws-lc-rs (one thread, in this process) to measure the
    /// sealing cost floor; ten times as many verifications are timed. 0 skips it.
    #[arg(long, default_value_t = 2000)]
    pub rsa_iterations: usize,

    /// YAML file merged into the generated gateway config: appended, with keys it repeats
    /// taking precedence (mappings are merged key by key), e.g. `log: {level: warn}` or
    /// `relay: {pool_wait: 5s}`.
    #[arg(long, value_name = "FILE")]
    pub config_extra: Option<PathBuf>,

    /// Keep the temporary directory (gateway config, certificate, gateway log) and print
    /// its path.
    #[arg(long)]
    pub keep_dir: bool,

    /// What receives the mail on both paths: `internal`, the bench's own SMTP sink that
    /// does no work (measures the gateway's own cost), or `postfix`, a private instance
    /// of Debian's Postfix delivering into a Maildir (measures what putting mxgate in
    /// front of a real mailbox server costs; needs root and /usr/sbin/postfix; use fewer
    /// --messages, Postfix writes every one to disk).
    #[arg(long, value_enum, default_value_t = SinkKind::Internal)]
    pub sink: SinkKind,

    /// Skip the relay-ceiling run (a TCP proxy that only copies bytes, in the gateway's
    /// place, between the direct and the gateway runs).
    #[arg(long)]
    pub no_proxy: bool,

    /// Internal: run as the relay-ceiling proxy child, forwarding to this address.
    #[arg(long, hide = true, value_name = "ADDR")]
    pub proxy_to: Option<SocketAddr>,

    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,

    /// Benchmark name filters `cargo bench` may pass through; ignored.
    #[arg(hide = true)]
    filters: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SinkKind {
    Internal,
    Postfix,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
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
    pub fn label(self) -> &'static str {
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
    pub fn setups(self) -> &'static [Setup] {
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
pub enum Setup {
    Nocheck,
    Full,
    Seal,
}

impl Setup {
    pub fn label(self) -> &'static str {
        match self {
            Setup::Nocheck => "nocheck",
            Setup::Full => "full",
            Setup::Seal => "seal",
        }
    }

    pub fn checks(self) -> bool {
        self != Setup::Nocheck
    }

    pub fn describe(self) -> &'static str {
        match self {
            Setup::Nocheck => "trusted_networks [127.0.0.0/8]: relayed without sender checks",
            Setup::Full => {
                "trusted_networks []: iprev, SPF (HELO and MAIL FROM), DKIM, ARC and DMARC on every message"
            }
            Setup::Seal => "as full, plus an ARC seal (RSA-2048) on every message",
        }
    }
}

impl Args {
    /// The share of idle connections that do STARTTLS: as given, else all of them with
    /// --tls and none without.
    pub fn idle_tls_share(&self) -> f64 {
        self.idle_tls_share
            .unwrap_or(if self.tls { 1.0 } else { 0.0 })
    }

    /// How many of the idle connections do STARTTLS.
    pub fn idle_tls_count(&self) -> usize {
        (self.idle as f64 * self.idle_tls_share()).round() as usize
    }
}

/// A share between 0.0 and 1.0 (clap's own range checks are for integers).
fn parse_share(text: &str) -> Result<f64, String> {
    let share: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if (0.0..=1.0).contains(&share) {
        Ok(share)
    } else {
        Err(format!("{share} is not between 0.0 and 1.0"))
    }
}

/// Open files wanted: idle connections, load sessions and both ends of every sink
/// connection, with room to spare.
pub fn wanted_limit(args: &Args) -> u64 {
    (args.idle + 4 * args.concurrency + 256) as u64
}
