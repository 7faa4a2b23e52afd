//! One invocation's fixture, set up before any clock starts: the temporary directory,
//! the sender's zone and the messages, the sink, a gateway configuration per mode; and
//! the header lines that describe it. Calls the checks, the load generator's message
//! builder, the sink and the gateway's config writer.

use crate::checks::{SenderZone, signed_pool};
use crate::cli::{Args, SinkKind};
use crate::gateway::write_config;
use crate::load::{Prepared, build_message};
use crate::procfs::NofileLimit;
use crate::sink::Sink;
use crate::{ARC_DOMAIN, ARC_SELECTOR, DKIM_SELECTOR, HELO_NAME, SENDER_DOMAIN};
use crate::{cli::Setup, wanted_limit};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct Bench<'a> {
    pub args: &'a Args,
    pub dir: tempfile::TempDir,
    /// The sender's zone, with any checking mode in the run.
    pub zone: Option<SenderZone>,
    /// The messages sent in turn (one unsigned message without a checking mode).
    pub pool: Arc<[Prepared]>,
    pub sink: Sink,
    /// Each mode measured, in order, with its gateway config file.
    pub configs: Vec<(Setup, PathBuf)>,
    /// The config of the idle connections' gateway.
    pub idle_config: PathBuf,
    pub binary: &'static Path,
    pub cpus: usize,
}

impl<'a> Bench<'a> {
    /// Keys, the sender's zone, the signed messages, the sink and the configs.
    pub async fn prepare(args: &'a Args) -> Result<Bench<'a>, String> {
        let dir = tempfile::Builder::new()
            .prefix("mxgate-bench.")
            .tempdir()
            .expect("temporary directory");
        let setups = args.mode.setups();
        let checks = setups.iter().any(|s| s.checks());
        let seals = setups.contains(&Setup::Seal);
        let zone = if checks {
            Some(SenderZone::start(dir.path(), seals).await?)
        } else {
            None
        };
        let pool: Arc<[Prepared]> = match &zone {
            Some(zone) => signed_pool(args.size, args.pool.max(1), &zone.dkim_pem)?.into(),
            None => vec![Prepared::new(build_message(args.size, "1"))].into(),
        };
        let sink = match args.sink {
            SinkKind::Internal => Sink::start().await,
            SinkKind::Postfix => Sink::postfix()?,
        };
        let configs = setups
            .iter()
            .map(|&setup| {
                write_config(args, dir.path(), sink.addr, setup, zone.as_ref(), args.tls)
                    .map(|path| (setup, path))
            })
            .collect::<Result<Vec<_>, String>>()?;
        // The idle connections' gateway is the first mode's, with STARTTLS when some of
        // them need it even though the load runs in plaintext.
        let idle_config = if args.idle_tls_count() > 0 && !args.tls {
            write_config(args, dir.path(), sink.addr, setups[0], zone.as_ref(), true)?
        } else {
            configs[0].1.clone()
        };
        Ok(Bench {
            args,
            dir,
            zone,
            pool,
            sink,
            configs,
            idle_config,
            binary: Path::new(env!("CARGO_BIN_EXE_mxgate")),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        })
    }

    /// Whether any mode of the run checks senders.
    pub fn checks(&self) -> bool {
        self.zone.is_some()
    }

    /// Bytes per message (without the final `.` line).
    pub fn size(&self) -> usize {
        self.pool[0].size()
    }

    /// The lines before any measurement: the load, the limits, the machine, the zone.
    pub fn print_header(&self, nofile: &NofileLimit) {
        let args = self.args;
        println!(
            "mxgate-bench: {} messages x {} bytes, concurrency {}, warm-up {}, mode {}, client TLS {}",
            args.messages,
            self.size(),
            args.concurrency,
            args.warmup,
            args.mode.label(),
            if args.tls { "STARTTLS" } else { "off" }
        );
        println!("{}", describe_connections(args));
        println!(
            "open files limit: {} (soft {}, hard {}){}; the gateway child inherits it",
            nofile.describe(),
            nofile.soft,
            nofile.hard,
            if nofile.soft < wanted_limit(args) {
                format!(" -- WARNING: below the {} wanted", wanted_limit(args))
            } else {
                String::new()
            }
        );
        println!(
            "machine: {} CPUs; bench runtime: 2 tokio workers (load generator and sink share them)",
            self.cpus
        );
        if let Some(zone) = &self.zone {
            let sizes = self.pool.iter().map(Prepared::size);
            let (min, max) = (sizes.clone().min().unwrap_or(0), sizes.max().unwrap_or(0));
            println!(
                "sender zone: DNS server {} in this process (SPF ip4:127.0.0.0/8 for {SENDER_DOMAIN} and {HELO_NAME}, DMARC p=reject, DKIM key {DKIM_SELECTOR}._domainkey{}); {} messages DKIM-signed (rsa-sha256 2048 bits, relaxed/relaxed, d={SENDER_DOMAIN}), {}{} bytes",
                zone.dns.addr,
                if zone.arc_key.is_some() {
                    format!(", ARC key {ARC_SELECTOR}._domainkey.{ARC_DOMAIN}")
                } else {
                    String::new()
                },
                self.pool.len(),
                if min == max {
                    String::new()
                } else {
                    format!("{min}..")
                },
                max
            );
        }
    }
}

/// What a measured message includes in the way of connection set-up.
fn describe_connections(args: &Args) -> String {
    let setup = if args.tls {
        "connect, greeting, EHLO, STARTTLS (full handshake), EHLO"
    } else {
        "connect, greeting, EHLO"
    };
    if args.per_connection {
        format!(
            "connections: one per message (--per-connection): {setup}, MAIL/RCPT/DATA, QUIT, close, all inside the measured loop; msgs/s and CPU per message include the connection's cost, latency counts from the connect; the direct and proxy paths also connect per message, in plaintext"
        )
    } else {
        format!(
            "connections: {} sessions, each reused for many messages; their set-up ({setup}) is done before the clock starts and is not in the figures",
            args.concurrency
        )
    }
}
