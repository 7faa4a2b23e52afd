//! Authentication metrics: results by check and result word, and check latency.

use crate::findings::AuthResult;
use crate::metrics::{Children, LATENCY_BUCKETS, counter_vec, histogram_vec};
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec};
use std::sync::LazyLock;
use std::time::Duration;

static RESULTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_auth_results_total",
        "Authentication results by check (spf, helo_spf, dkim, dmarc, arc, iprev) and RFC 8601 result.",
        &["check", "result"],
    )
});

static CHECK_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "mxgate_auth_check_duration_seconds",
        "Time an authentication check took, DNS included, by check.",
        &["check"],
        LATENCY_BUCKETS,
    )
});

pub static DMARC_ACTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_dmarc_actions_total",
        "What DMARC evaluation did to messages: reject, quarantine, tempfail, none (policy p=none or enforcement off), override (a trusted ARC sealer or a policy rule overrode a failure).",
        &["action"],
    )
});

static SPF_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_spf_errors_total",
        "SPF permerror and temperror results by check (spf, helo_spf) and reason: multiple_records, syntax, lookup_limit, void_lookup_limit, include_without_record, redirect_without_record, invalid_domain, dns, timeout.",
        &["check", "reason"],
    )
});

static DKIM_IGNORED: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    crate::metrics::counter(
        "mxgate_dkim_signatures_ignored_total",
        "DKIM-Signature fields not verified because the message had more than auth.max_dkim_signatures.",
    )
});

pub fn dkim_signatures_ignored(count: usize) {
    DKIM_IGNORED.inc_by(count as u64);
}

pub fn init() {
    LazyLock::force(&RESULTS);
    LazyLock::force(&DKIM_IGNORED);

    for check in ["spf", "helo_spf"] {
        for kind in super::spf::SpfErrorKind::ALL {
            SPF_ERRORS.with_label_values(&[check, kind.label()]);
        }
    }
    LazyLock::force(&CHECK_SECONDS);
    LazyLock::force(&DMARC_ACTIONS);
    for action in ["reject", "quarantine", "tempfail", "none", "override"] {
        DMARC_ACTIONS.with_label_values(&[action]);
    }
    super::dns::init_metrics();
}

/// The checks `check` is called with, in the order of their children below.
const CHECKS: [&str; 6] = ["iprev", "helo_spf", "spf", "dkim", "arc", "dmarc"];
const RESULT_KINDS: usize = 7;

static RESULT_CHILDREN: Children<IntCounter, { CHECKS.len() * RESULT_KINDS }> = Children::new();
static SECONDS_CHILDREN: Children<Histogram, { CHECKS.len() }> = Children::new();

fn result_index(result: AuthResult) -> usize {
    match result {
        AuthResult::Pass => 0,
        AuthResult::Fail => 1,
        AuthResult::SoftFail => 2,
        AuthResult::Neutral => 3,
        AuthResult::None => 4,
        AuthResult::TempError => 5,
        AuthResult::PermError => 6,
    }
}

pub fn check(name: &str, result: AuthResult, elapsed: Duration) {
    // A name outside CHECKS gets an index past the end: counted all the same.
    let at = CHECKS
        .iter()
        .position(|c| *c == name)
        .unwrap_or(CHECKS.len());
    // A result beyond RESULT_KINDS (a variant added without raising it) must not take
    // the next check's slot: it goes past the end, counted all the same.
    let slot = match result_index(result) {
        r if r < RESULT_KINDS => at * RESULT_KINDS + r,
        _ => usize::MAX,
    };
    RESULT_CHILDREN
        .get(slot, || RESULTS.with_label_values(&[name, result.as_str()]))
        .inc();
    SECONDS_CHILDREN
        .get(at, || CHECK_SECONDS.with_label_values(&[name]))
        .observe(elapsed.as_secs_f64());
}

/// An SPF check's result, and its error reason when it has one (counted and logged,
/// so an admin can tell the sender what to fix).
pub fn spf_check(name: &str, check: &crate::findings::SpfCheck, elapsed: Duration) {
    self::check(name, check.result, elapsed);
    if let Some(kind) = check.reason_kind {
        SPF_ERRORS.with_label_values(&[name, kind]).inc();
        tracing::info!(
            check = name,
            result = check.result.as_str(),
            domain = %check.domain,
            reason = kind,
            detail = check.reason.as_deref().unwrap_or_default(),
            "SPF record of the sender cannot be evaluated"
        );
    }
}
