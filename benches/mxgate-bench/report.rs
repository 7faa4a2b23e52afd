//! After the measurements: the costs (differences between modes, the RSA floor), the
//! goals, the error banner and the JSON line; the exit status. Also the small output
//! helpers every module uses (`loud`, `round`, `kb_to_mb`).

use crate::bench::Bench;
use crate::cli::Setup;
use crate::connections::ConnectionCost;
use crate::measure::{GatewayRun, Measurements};
use crate::summary::Summary;

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

/// Gateway CPU per message (µs) of each mode and what the differences say.
pub struct Costs {
    pub nocheck_cpu: Option<f64>,
    pub full_cpu: Option<f64>,
    pub seal_cpu: Option<f64>,
    /// full - nocheck.
    pub checks_cpu: Option<f64>,
    /// seal - full.
    pub seal_extra_cpu: Option<f64>,
    /// RSA-2048 sign and verify: the mean of the measurements.
    pub sign_us: Option<f64>,
    pub verify_us: Option<f64>,
    /// checks_cpu - verify_us.
    pub checks_beyond_rsa: Option<f64>,
    /// Two signatures: the least a seal can cost.
    pub floor_us: Option<f64>,
    /// seal_cpu / floor_us.
    pub floor_multiple: Option<f64>,
}

impl Costs {
    fn of(measured: &Measurements) -> Costs {
        let cpu_of = |setup: Setup| {
            measured
                .runs
                .iter()
                .find(|r| r.setup == setup)
                .and_then(GatewayRun::cpu_us_per_msg)
        };
        let (nocheck_cpu, full_cpu, seal_cpu) = (
            cpu_of(Setup::Nocheck),
            cpu_of(Setup::Full),
            cpu_of(Setup::Seal),
        );
        let checks_cpu = full_cpu.zip(nocheck_cpu).map(|(f, n)| f - n);
        let mean = |values: Vec<f64>| {
            (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
        };
        let sign_us = mean(measured.rsa.iter().map(|r| r.sign_us).collect());
        let verify_us = mean(measured.rsa.iter().map(|r| r.verify_us).collect());
        let floor_us = sign_us.map(|s| 2.0 * s);
        Costs {
            nocheck_cpu,
            full_cpu,
            seal_cpu,
            checks_cpu,
            seal_extra_cpu: seal_cpu.zip(full_cpu).map(|(s, f)| s - f),
            sign_us,
            verify_us,
            checks_beyond_rsa: checks_cpu.zip(verify_us).map(|(c, v)| c - v),
            floor_us,
            floor_multiple: seal_cpu.zip(floor_us).map(|(s, f)| s / f),
        }
    }

    /// Each mode's CPU per message, then the costs derived from them.
    fn print(&self, measured: &Measurements) {
        println!();
        println!("gateway CPU per message by mode:");
        for run in &measured.runs {
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
        if let Some(checks_cpu) = self.checks_cpu {
            println!("  cost of the checks (full - nocheck): {checks_cpu:.1} us/msg");
        }
        if let Some(seal_extra) = self.seal_extra_cpu {
            println!("  cost of sealing (seal - full): {seal_extra:.1} us/msg");
        }
        if measured.rsa.len() > 1
            && let (Some(sign_us), Some(verify_us)) = (self.sign_us, self.verify_us)
        {
            println!(
                "  RSA-2048 figures used: mean of the {} measurements: sign {sign_us:.1} us, verify {verify_us:.1} us",
                measured.rsa.len()
            );
        }
        if let (Some(checks_cpu), Some(verify_us), Some(beyond)) =
            (self.checks_cpu, self.verify_us, self.checks_beyond_rsa)
        {
            println!(
                "  checks beyond RSA verification: (full - nocheck) - 1 RSA-2048 verification = {checks_cpu:.1} - {verify_us:.1} = {beyond:.1} us/msg"
            );
        }
        if let (Some(seal), Some(floor), Some(multiple)) =
            (self.seal_cpu, self.floor_us, self.floor_multiple)
        {
            println!(
                "seal CPU/msg = {seal:.1} µs = {multiple:.2} × floor (2 signatures = {floor:.1} µs)"
            );
        }
    }
}

/// Which goals the run met (`None`: not measured in this run).
pub struct Goals {
    pub ratio_ok: bool,
    pub peak_rss_ok: Option<bool>,
    pub idle_rss_ok: Option<bool>,
    pub checks_ok: Option<bool>,
    pub seal_floor_ok: Option<bool>,
    pub seal_total_ok: Option<bool>,
}

impl Goals {
    fn of(measured: &Measurements, costs: &Costs) -> Goals {
        let primary = &measured.runs[0];
        Goals {
            ratio_ok: primary.ratio >= GOAL_RATIO,
            peak_rss_ok: primary.peak_rss_mb.map(|v| v < GOAL_PEAK_RSS_MB),
            idle_rss_ok: measured
                .idle
                .as_ref()
                .map(|i| i.after_mb < GOAL_IDLE_RSS_MB),
            checks_ok: costs
                .checks_beyond_rsa
                .map(|v| v < GOAL_CHECKS_BEYOND_RSA_US),
            seal_floor_ok: costs.floor_multiple.map(|m| m < GOAL_SEAL_FLOOR_MULTIPLE),
            seal_total_ok: costs.seal_cpu.map(|s| s < GOAL_SEAL_TOTAL_US),
        }
    }

    /// One line per goal measured in this run (the primary mode's for throughput and memory).
    fn print(&self, measured: &Measurements, costs: &Costs) {
        let primary = &measured.runs[0];
        println!();
        println!("goals:");
        let goal = |ok: bool| if ok { "ok" } else { "MISSED" };
        println!(
            "  gateway msgs/s >= {:.0}% of direct: {:.1}% -- {}",
            GOAL_RATIO * 100.0,
            primary.ratio * 100.0,
            goal(self.ratio_ok)
        );
        if let Some(ceiling) = &measured.ceiling {
            println!(
                "    (the ceiling for any in-line relay on this machine: a TCP proxy that only copies bytes reaches {:.1}% of direct)",
                ceiling.ratio * 100.0
            );
        }
        if let (Some(rss), Some(ok)) = (primary.peak_rss_mb, self.peak_rss_ok) {
            println!(
                "  gateway peak RSS < {GOAL_PEAK_RSS_MB:.0} MB: {rss:.1} MB -- {}",
                goal(ok)
            );
        }
        if let (Some(idle), Some(ok)) = (&measured.idle, self.idle_rss_ok) {
            println!(
                "  gateway RSS with {} idle connections < {GOAL_IDLE_RSS_MB:.0} MB: {:.1} MB (+{:.1} MB for the connections) -- {}",
                idle.opened,
                idle.after_mb,
                idle.delta_mb(),
                goal(ok)
            );
        }
        if let (Some(beyond), Some(ok)) = (costs.checks_beyond_rsa, self.checks_ok) {
            println!(
                "  full checks < {GOAL_CHECKS_BEYOND_RSA_US:.0} us CPU/msg beyond the RSA verification: {beyond:.1} us -- {}",
                goal(ok)
            );
        }
        if let (Some(multiple), Some(floor), Some(ok)) =
            (costs.floor_multiple, costs.floor_us, self.seal_floor_ok)
        {
            println!(
                "  seal CPU/msg < {GOAL_SEAL_FLOOR_MULTIPLE} x floor (2 RSA-2048 signatures = {floor:.1} us): {multiple:.2} x -- {}",
                goal(ok)
            );
        }
        if let (Some(seal), Some(ok)) = (costs.seal_cpu, self.seal_total_ok) {
            println!(
                "  checks + seal CPU/msg < {GOAL_SEAL_TOTAL_US:.0} us: {seal:.1} us -- {}",
                goal(ok)
            );
        }
    }
}

/// Failed messages, and connections (idle or connection-cost) that could not be set up,
/// over the whole run.
pub fn errors(measured: &Measurements) -> usize {
    let gateway_errors: usize = measured.runs.iter().map(|r| r.phase.errors()).sum();
    measured.direct.errors()
        + gateway_errors
        + measured.idle.as_ref().map_or(0, |i| i.failed)
        + connection_errors(measured)
}

/// Connections of the connection-cost measurement that failed.
pub fn connection_errors(measured: &Measurements) -> usize {
    measured
        .connections
        .as_ref()
        .map_or(0, ConnectionCost::errors)
}

/// Costs, goals, errors and the JSON line; returns the exit status.
pub fn report(bench: &Bench, measured: &Measurements) -> i32 {
    let costs = Costs::of(measured);
    if bench.checks() {
        costs.print(measured);
    }
    let goals = Goals::of(measured, &costs);
    goals.print(measured, &costs);
    let errors = errors(measured);
    if errors > 0 {
        loud(&format!(
            "THIS RUN HAD {errors} ERRORS (direct {}, gateway {}, idle connections {}, connection cost {}): the figures are NOT valid",
            measured.direct.errors(),
            measured
                .runs
                .iter()
                .map(|r| format!("{} {}", r.setup.label(), r.phase.errors()))
                .collect::<Vec<_>>()
                .join(", "),
            measured.idle.as_ref().map_or(0, |i| i.failed),
            connection_errors(measured)
        ));
    }
    let summary = Summary::of(bench, measured, &costs, &goals);
    println!(
        "{}",
        serde_json::to_string(&summary).expect("summary serializes")
    );
    if errors > 0 || summary.checks_verified == Some(false) {
        1
    } else {
        0
    }
}

pub fn round(value: f64, decimals: i32) -> f64 {
    let factor = 10f64.powi(decimals);
    (value * factor).round() / factor
}

pub fn kb_to_mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// An error that must not be overlooked: banner on stdout and stderr.
pub fn loud(text: &str) {
    let banner = "!".repeat(78);
    for line in [banner.as_str(), &format!("!!! ERROR: {text}"), &banner] {
        println!("{line}");
        eprintln!("{line}");
    }
}
