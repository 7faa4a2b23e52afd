//! mxgate load benchmark.
//!
//! Pushes the same SMTP load into an in-process SMTP sink: once through the
//! gateway (`mxgate serve` as a child process, relaying in-line to the sink) and once
//! straight into the sink (the "direct path"), then compares them. Between the two it
//! runs the same load through a TCP proxy that only copies bytes (`proxy.rs`):
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
//!
//! Connections: by default each of the `--concurrency` sessions is set up before the
//! clock starts and reused for many messages, so the figures are per transaction.
//! `--per-connection` sends every message over a new connection (connect, greeting,
//! EHLO, with `--tls` STARTTLS and EHLO again, the transaction, QUIT), as MX traffic
//! arrives; the set-up is then inside the measured loop and in the CPU per message.
//! `--connection-cost N` measures a connection alone, without mail: N connections
//! (greeting, EHLO, STARTTLS with `--tls`, QUIT) against a fresh gateway, reported as
//! the gateway's CPU per connection and connections/s.
//! `--idle N` holds N connections open against a fresh gateway and reports the memory
//! they add; `--idle-tls-share F` makes that share of them do STARTTLS, opened after
//! the plaintext ones so that each kind gets its own figure per connection.
//!
//! The modules follow the run: `cli` (options, modes), `bench` (what is set up before
//! any clock starts), `measure` (the runs, in order), `report` and `summary` (costs,
//! goals, the JSON line); the parts they drive: `gateway` (config, child process),
//! `sink`, `load` and `client` (the load generator), `checks` (sender zone, signed
//! messages, check counters), `rsa` (the sealing floor), `ceiling` and `proxy` (the
//! relay ceiling), `connections` (the cost of a connection), `idle` (idle
//! connections), `procfs` (CPU and memory from /proc).

mod bench;
mod ceiling;
mod checks;
mod cli;
mod client;
mod connections;
mod gateway;
mod idle;
mod load;
mod measure;
mod procfs;
mod proxy;
mod report;
mod rsa;
mod sink;
mod summary;

use bench::Bench;
use clap::Parser;
use cli::{Args, wanted_limit};
use procfs::{NofileLimit, raise_nofile_limit};
use std::time::Duration;

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

/// The whole run; the exit status: 2 when it could not be set up (the reason on
/// stderr), else 1 when a message failed or a check result fell short, else 0.
async fn run(args: Args, nofile: NofileLimit) -> i32 {
    let result = async {
        let bench = Bench::prepare(&args).await?;
        bench.print_header(&nofile);
        let measured = bench.measure().await?;
        let code = report::report(&bench, &measured);
        if args.keep_dir {
            let _ = bench.dir.keep();
        }
        Ok::<_, String>(code)
    };
    match result.await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("{err}");
            2
        }
    }
}
