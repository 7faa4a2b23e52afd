//! The measurements, in the order they run: the RSA floor, then per mode a fresh
//! gateway (the first one also measures the direct path and the relay ceiling), warm-up
//! and measured load, what its checks found; the RSA floor again after `seal`; the cost
//! of a connection; idle connections. Prints each figure as it comes. Calls the gateway,
//! the load generator, the checks' counters, the ceiling, the RSA floor, the
//! connection-cost and the idle measurements.

use crate::bench::Bench;
use crate::ceiling::{Ceiling, measure_ceiling};
use crate::checks::outcome_counters;
use crate::cli::Setup;
use crate::client::{ClientTls, client_tls};
use crate::connections::{ConnectionCost, ConnectionSpec, measure_connection_cost};
use crate::gateway::Gateway;
use crate::idle::{IdleResult, IdleSpec, measure_idle};
use crate::load::{LoadSpec, PhaseResult, print_phase, run_load};
use crate::procfs::proc_status_kb;
use crate::report::{kb_to_mb, loud};
use crate::rsa::{RsaCost, rsa_floor};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Everything one invocation measured.
pub struct Measurements {
    pub direct: PhaseResult,
    pub ceiling: Option<Ceiling>,
    /// One per mode, in order; the first is the primary.
    pub runs: Vec<GatewayRun>,
    pub idle: Option<IdleResult>,
    /// What a connection without mail costs (--connection-cost).
    pub connections: Option<ConnectionCost>,
    /// The RSA floor: before the load, and after the seal run.
    pub rsa: Vec<RsaCost>,
}

/// One measured gateway configuration.
pub struct GatewayRun {
    pub setup: Setup,
    pub phase: PhaseResult,
    pub peak_rss_mb: Option<f64>,
    pub ratio: f64,
    /// Queries the bench's DNS server answered during the measured run.
    pub dns_queries: Option<usize>,
    /// What the checks found during the measured run (`check=result` and
    /// `arc_seal=result` counts, from the gateway's metrics).
    pub outcomes: Option<BTreeMap<String, u64>>,
    /// Whether every delivered message passed SPF, DKIM and DMARC (and was sealed).
    pub verified: Option<bool>,
}

impl GatewayRun {
    pub fn cpu_us_per_msg(&self) -> Option<f64> {
        self.phase
            .gateway_cpu
            .map(|c| c.total() * 1e6 / self.phase.ok.max(1) as f64)
    }
}

/// The direct path and the relay ceiling, measured once, against which each mode is read.
struct Baseline {
    direct: PhaseResult,
    ceiling: Option<Ceiling>,
}

impl Bench<'_> {
    pub async fn measure(&self) -> Result<Measurements, String> {
        let args = self.args;
        // The cost floor: RSA-2048 with aws-lc-rs on one thread, while nothing else runs;
        // with `seal`, again right after the seal run (the machine's speed drifts), and the
        // mean of both is the figure.
        let mut rsa: Vec<RsaCost> = Vec::new();
        if let Some(zone) = &self.zone
            && args.rsa_iterations > 0
        {
            rsa.extend(rsa_floor(zone, args.rsa_iterations, "before the load").await);
        }
        let mut tls: Option<ClientTls> = None;
        let mut baseline: Option<Baseline> = None;
        let mut runs = Vec::with_capacity(self.configs.len());
        for (index, (setup, config_path)) in self.configs.iter().enumerate() {
            let mut gateway = Gateway::spawn(self.binary, config_path, self.dir.path())?;
            self.announce(*setup, &gateway);
            if index == 0 {
                if args.keep_dir {
                    println!("temporary directory (kept): {}", self.dir.path().display());
                }
                // The gateway generated the certificate as it started.
                if args.tls {
                    tls = Some(client_tls(&self.dir.path().join("cert.pem"))?);
                }
                baseline = Some(self.measure_baseline().await);
            }
            let baseline = baseline.as_ref().expect("direct path measured first");
            let run = self
                .measure_gateway(*setup, &gateway, tls.clone(), baseline)
                .await;
            gateway.stop();
            if *setup == Setup::Seal
                && args.rsa_iterations > 0
                && let Some(zone) = &self.zone
            {
                rsa.extend(rsa_floor(zone, args.rsa_iterations, "after the seal run").await);
            }
            runs.push(run);
        }
        let Baseline { direct, ceiling } = baseline.expect("direct path measured");
        let connections = self.measure_connections(tls).await;
        let idle = self.measure_idle().await;
        Ok(Measurements {
            direct,
            ceiling,
            runs,
            idle,
            connections,
            rsa,
        })
    }

    /// `n` messages from the pool, at the run's concurrency, to `target` (one connection
    /// per message with --per-connection, on every path).
    fn load(&self, target: SocketAddr, tls: Option<ClientTls>, n: usize) -> LoadSpec {
        LoadSpec {
            target,
            tls,
            messages: n,
            concurrency: self.args.concurrency,
            per_connection: self.args.per_connection,
            pool: self.pool.clone(),
        }
    }

    fn announce(&self, setup: Setup, gateway: &Gateway) {
        println!();
        println!("gateway mode {}: {}", setup.label(), setup.describe());
        println!(
            "gateway: {} (pid {}) smtp {}; sink smtp {}",
            self.binary.display(),
            gateway.pid,
            gateway.smtp,
            self.sink.addr
        );
    }

    /// Direct path (warm-up, then measured), then the relay ceiling.
    async fn measure_baseline(&self) -> Baseline {
        let (args, sink) = (self.args, &self.sink);
        if args.warmup > 0 {
            run_load(self.load(sink.addr, None, args.warmup), None, sink).await;
        }
        let direct = run_load(self.load(sink.addr, None, args.messages), None, sink).await;
        print_phase("direct ", "client -> sink", &direct);
        let mut ceiling = None;
        if !args.no_proxy {
            match measure_ceiling(args, &self.load(sink.addr, None, 0), sink, &direct).await {
                Ok(measured) => ceiling = Some(measured),
                Err(err) => loud(&format!("relay-ceiling run failed: {err}")),
            }
        }
        Baseline { direct, ceiling }
    }

    /// One mode: warm-up, the measured run, its figures and what its checks found.
    async fn measure_gateway(
        &self,
        setup: Setup,
        gateway: &Gateway,
        tls: Option<ClientTls>,
        baseline: &Baseline,
    ) -> GatewayRun {
        self.warm_up(setup, gateway, tls.clone()).await;
        let queries_before = self.zone.as_ref().map(|z| z.dns.queries());
        let counters_before = match gateway.metrics {
            Some(addr) => outcome_counters(addr).await.ok(),
            None => None,
        };
        let through = run_load(
            self.load(gateway.smtp, tls, self.args.messages),
            Some(gateway.pid),
            &self.sink,
        )
        .await;
        let dns_queries = self
            .zone
            .as_ref()
            .zip(queries_before)
            .map(|(z, before)| z.dns.queries() - before);
        let outcomes = match (gateway.metrics, counters_before) {
            (Some(addr), Some(before)) => outcome_counters(addr)
                .await
                .ok()
                .map(|after| counter_increase(after, &before)),
            _ => None,
        };
        print_phase("gateway", "client -> mxgate -> sink", &through);
        let peak_rss_mb = proc_status_kb(gateway.pid, "VmHWM:").map(kb_to_mb);
        let ratio = print_gateway_figures(&through, peak_rss_mb, baseline, dns_queries);
        let verified = if setup.checks() {
            verify_checks(setup, outcomes.as_ref(), through.ok)
        } else {
            None
        };
        if let Some(received) = through.sink_messages
            && received < through.ok as u64
        {
            loud(&format!(
                "the sink received {received} messages but the gateway answered 250 to {}",
                through.ok
            ));
        }
        GatewayRun {
            setup,
            phase: through,
            peak_rss_mb,
            ratio,
            dns_queries,
            outcomes,
            verified,
        }
    }

    /// Fills the gateway's backend pool and DNS caches; failures are reported, not counted.
    async fn warm_up(&self, setup: Setup, gateway: &Gateway, tls: Option<ClientTls>) {
        if self.args.warmup == 0 {
            return;
        }
        let warm = run_load(
            self.load(gateway.smtp, tls, self.args.warmup),
            Some(gateway.pid),
            &self.sink,
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

    /// Connections without mail, against a fresh gateway of the first mode (so that the
    /// load's heap and pools are not in it).
    async fn measure_connections(&self, tls: Option<ClientTls>) -> Option<ConnectionCost> {
        let args = self.args;
        if args.connection_cost == 0 {
            return None;
        }
        println!();
        let spec = ConnectionSpec {
            count: args.connection_cost,
            concurrency: args.concurrency,
            warmup: args.warmup,
            tls,
        };
        let config = &self.configs[0].1;
        match measure_connection_cost(self.binary, config, self.dir.path(), spec).await {
            Ok(cost) => Some(cost),
            Err(err) => {
                loud(&format!("connection-cost measurement failed: {err}"));
                None
            }
        }
    }

    /// Idle connections, against a fresh gateway (of the first mode) so that neither
    /// measurement inherits the other's heap; the plaintext ones first, then the
    /// --idle-tls-share that does STARTTLS.
    async fn measure_idle(&self) -> Option<IdleResult> {
        let args = self.args;
        if args.idle == 0 {
            return None;
        }
        let tls = args.idle_tls_count();
        let spec = IdleSpec {
            plain: args.idle - tls,
            tls,
        };
        let cert = self.dir.path().join("cert.pem");
        let (binary, dir) = (self.binary, self.dir.path());
        match measure_idle(binary, &self.idle_config, dir, &cert, spec).await {
            Ok(idle) => Some(idle),
            Err(err) => {
                loud(&format!("idle-connection measurement failed: {err}"));
                None
            }
        }
    }
}

/// What rose between two readings of the gateway's counters (those that did not are left
/// out).
fn counter_increase(
    after: BTreeMap<String, u64>,
    before: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .into_iter()
        .map(|(key, n)| {
            let n = n.saturating_sub(before.get(&key).copied().unwrap_or(0));
            (key, n)
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// The gateway's CPU and memory, its ratios to the direct path and the ceiling, and the
/// DNS queries it made; returns the ratio gateway / direct.
fn print_gateway_figures(
    through: &PhaseResult,
    peak_rss_mb: Option<f64>,
    baseline: &Baseline,
    dns_queries: Option<usize>,
) -> f64 {
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
    if let Some(rss) = peak_rss_mb {
        println!("gateway peak RSS (VmHWM): {rss:.1} MB");
    }
    let direct = &baseline.direct;
    let ratio = if direct.msgs_per_s() > 0.0 {
        through.msgs_per_s() / direct.msgs_per_s()
    } else {
        0.0
    };
    println!("ratio gateway/direct msgs/s: {ratio:.3}");
    if let Some(ceiling) = &baseline.ceiling {
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
    ratio
}

/// Prints what the checks found and whether every one of the `ok` delivered messages
/// passed SPF, DKIM and DMARC (and, in `seal` mode, was sealed); `None` when the
/// gateway's metrics could not be read.
fn verify_checks(
    setup: Setup,
    outcomes: Option<&BTreeMap<String, u64>>,
    ok: usize,
) -> Option<bool> {
    let Some(outcomes) = outcomes else {
        loud(&format!(
            "mode {}: cannot read the gateway's metrics: the check results are unverified",
            setup.label()
        ));
        return None;
    };
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
                **n as f64 / ok.max(1) as f64
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let ok = ok as u64;
    let count = |key: &str| outcomes.get(key).copied().unwrap_or(0);
    let mut wanted = vec!["spf=pass", "dkim=pass", "dmarc=pass"];
    if setup == Setup::Seal {
        wanted.push("arc_seal=sealed");
    }
    let short: Vec<String> = wanted
        .iter()
        .filter(|key| count(key) < ok)
        .map(|key| format!("{key} {} of {ok}", count(key)))
        .collect();
    if !short.is_empty() {
        loud(&format!(
            "mode {}: not every delivered message passed the checks ({}): the figures do not measure what they claim",
            setup.label(),
            short.join(", ")
        ));
    }
    Some(short.is_empty())
}
