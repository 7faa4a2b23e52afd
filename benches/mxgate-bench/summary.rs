//! The JSON line that ends the output, for tooling: its fields (in this order) and how
//! they are filled from the measurements, the costs and the goals.

use crate::bench::Bench;
use crate::ceiling::Ceiling;
use crate::connections::ConnectionCost;
use crate::measure::{GatewayRun, Measurements};
use crate::report::{Costs, Goals, connection_errors, errors, round};
use serde::Serialize;
use std::collections::BTreeMap;

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

impl RunSummary {
    fn of(run: &GatewayRun) -> RunSummary {
        let per_message = |seconds: f64| round(seconds * 1e6 / run.phase.ok.max(1) as f64, 1);
        RunSummary {
            mode: run.setup.label(),
            msgs_per_s: round(run.phase.msgs_per_s(), 1),
            ratio: round(run.ratio, 4),
            p50_ms: round(run.phase.percentile_ms(50.0), 3),
            p99_ms: round(run.phase.percentile_ms(99.0), 3),
            max_ms: round(run.phase.percentile_ms(100.0), 3),
            cpu_us_per_msg: run.phase.gateway_cpu.map(|c| per_message(c.total())),
            cpu_user_us_per_msg: run.phase.gateway_cpu.map(|c| per_message(c.user)),
            cpu_system_us_per_msg: run.phase.gateway_cpu.map(|c| per_message(c.system)),
            peak_rss_mb: run.peak_rss_mb.map(|v| round(v, 2)),
            ok: run.phase.ok,
            errors: run.phase.errors(),
            bench_cpu_us_per_msg: round(run.phase.bench_cpu_us_per_msg(), 1),
            machine_cpu_busy: round(run.phase.machine_busy, 3),
            dns_queries: run.dns_queries,
            checks: run.outcomes.clone(),
            checks_verified: run.verified,
        }
    }
}

/// The last line of the output, for tooling. Fields keep this order.
#[derive(Serialize)]
pub struct Summary {
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
    pub checks_verified: Option<bool>,
    /// Every measured mode, in order.
    runs: Vec<RunSummary>,
    /// One connection per message (--per-connection): the figures per message include
    /// the connection's set-up and QUIT.
    per_connection: bool,
    /// --connection-cost: connections without mail against a fresh gateway, whether
    /// they did STARTTLS, their rate and the gateway's CPU per connection (µs);
    /// `None` when not measured.
    connection_cost_connections: Option<usize>,
    connection_cost_tls: Option<bool>,
    connection_cost_conns_per_s: Option<f64>,
    connection_cost_cpu_us_per_conn: Option<f64>,
    connection_cost_cpu_user_us_per_conn: Option<f64>,
    connection_cost_cpu_system_us_per_conn: Option<f64>,
    connection_cost_errors: usize,
    /// --idle-tls-share: the share of idle connections that did STARTTLS (as resolved:
    /// 1.0 with --tls when not given), how many of each kind were held, the VmRSS after
    /// the plaintext ones (opened first) and what each kind added per connection (`None`
    /// when none of that kind was held).
    idle_tls_share: Option<f64>,
    idle_plain_connections: Option<usize>,
    idle_tls_connections: Option<usize>,
    idle_rss_after_plain_mb: Option<f64>,
    idle_kb_per_plain_conn: Option<f64>,
    idle_kb_per_tls_conn: Option<f64>,
}

impl Summary {
    pub fn of(bench: &Bench, measured: &Measurements, costs: &Costs, goals: &Goals) -> Summary {
        let args = bench.args;
        let (direct, ceiling, idle) = (&measured.direct, &measured.ceiling, &measured.idle);
        let primary = &measured.runs[0];
        let through = &primary.phase;
        let per_message_us = |seconds: f64| seconds * 1e6 / through.ok.max(1) as f64;
        let connections = measured.connections.as_ref();
        let connection_cpu = connections.and_then(ConnectionCost::cpu_us_per_conn);
        let round_opt = |value: Option<f64>, decimals: i32| value.map(|v| round(v, decimals));
        Summary {
            gateway_msgs_per_s: round(through.msgs_per_s(), 1),
            direct_msgs_per_s: round(direct.msgs_per_s(), 1),
            ratio: round(primary.ratio, 4),
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
            gateway_peak_rss_mb: primary.peak_rss_mb.map(|v| round(v, 2)),
            idle_connections: idle.as_ref().map(|i| i.opened),
            idle_rss_before_mb: idle.as_ref().map(|i| round(i.before_mb, 2)),
            idle_rss_after_mb: idle.as_ref().map(|i| round(i.after_mb, 2)),
            idle_rss_delta_mb: idle.as_ref().map(|i| round(i.delta_mb(), 2)),
            idle_kb_per_conn: idle.as_ref().map(|i| round(i.kb_per_conn(), 2)),
            errors: errors(measured),
            gateway_errors: measured.runs.iter().map(|r| r.phase.errors()).sum(),
            direct_errors: direct.errors(),
            idle_errors: idle.as_ref().map_or(0, |i| i.failed),
            bench_cpu_us_per_msg_direct: round(direct.bench_cpu_us_per_msg(), 1),
            bench_cpu_us_per_msg_gateway: round(through.bench_cpu_us_per_msg(), 1),
            machine_cpu_busy_direct: round(direct.machine_busy, 3),
            machine_cpu_busy_gateway: round(through.machine_busy, 3),
            messages: args.messages,
            size: bench.size(),
            concurrency: args.concurrency,
            warmup: args.warmup,
            tls: args.tls,
            mode: args.mode.label(),
            cpus: bench.cpus,
            goal_ratio_ok: goals.ratio_ok,
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
            goal_peak_rss_ok: goals.peak_rss_ok,
            goal_idle_rss_ok: goals.idle_rss_ok,
            primary_mode: primary.setup.label(),
            dkim_signed: bench.zone.is_some(),
            pool: bench.pool.len(),
            nocheck_cpu_us_per_msg: round_opt(costs.nocheck_cpu, 1),
            full_cpu_us_per_msg: round_opt(costs.full_cpu, 1),
            seal_cpu_us_per_msg: round_opt(costs.seal_cpu, 1),
            checks_cpu_us_per_msg: round_opt(costs.checks_cpu, 1),
            seal_extra_cpu_us_per_msg: round_opt(costs.seal_extra_cpu, 1),
            rsa2048_sign_us: round_opt(costs.sign_us, 1),
            rsa2048_verify_us: round_opt(costs.verify_us, 2),
            rsa2048_sign_us_measured: measured.rsa.iter().map(|r| round(r.sign_us, 1)).collect(),
            checks_beyond_rsa_verify_us_per_msg: round_opt(costs.checks_beyond_rsa, 1),
            seal_floor_us: round_opt(costs.floor_us, 1),
            seal_floor_multiple: round_opt(costs.floor_multiple, 3),
            goal_checks_ok: goals.checks_ok,
            goal_seal_floor_ok: goals.seal_floor_ok,
            goal_seal_total_ok: goals.seal_total_ok,
            checks_verified: measured
                .runs
                .iter()
                .filter_map(|r| r.verified)
                .reduce(|a, b| a && b),
            runs: measured.runs.iter().map(RunSummary::of).collect(),
            per_connection: args.per_connection,
            connection_cost_connections: connections.map(|c| c.ok),
            connection_cost_tls: connections.map(|c| c.tls),
            connection_cost_conns_per_s: connections.map(|c| round(c.per_s(), 1)),
            connection_cost_cpu_us_per_conn: connection_cpu.map(|(_, _, total)| round(total, 1)),
            connection_cost_cpu_user_us_per_conn: connection_cpu.map(|(user, _, _)| round(user, 1)),
            connection_cost_cpu_system_us_per_conn: connection_cpu
                .map(|(_, system, _)| round(system, 1)),
            connection_cost_errors: connection_errors(measured),
            idle_tls_share: idle.as_ref().map(|_| args.idle_tls_share()),
            idle_plain_connections: idle.as_ref().map(|i| i.plain.opened),
            idle_tls_connections: idle.as_ref().map(|i| i.tls.opened),
            idle_rss_after_plain_mb: idle.as_ref().map(|i| round(i.after_plain_mb, 2)),
            idle_kb_per_plain_conn: idle
                .as_ref()
                .and_then(|i| i.plain.kb_per_conn())
                .map(|v| round(v, 2)),
            idle_kb_per_tls_conn: idle
                .as_ref()
                .and_then(|i| i.tls.kb_per_conn())
                .map(|v| round(v, 2)),
        }
    }
}
