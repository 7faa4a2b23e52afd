//! Header-rewriting metrics: ARC sealing outcomes and ARC overrides. Labels: the closed
//! [`SealOutcome`] set and the trusted sealers as configured (bounded by the config).
//! May call: `crate::metrics` and `rewrite::arc` for its outcome type.

use super::arc::SealOutcome;
use crate::metrics::counter_vec;
use prometheus::IntCounterVec;
use std::sync::LazyLock;

static SEALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_arc_seals_total",
        "ARC sealing of relayed messages, by result (sealed, skipped_chain_failed, skipped_chain_full, error).",
        &["result"],
    )
});

static OVERRIDES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_arc_overrides_total",
        "DMARC failures overridden because a trusted ARC sealer recorded a pass, by sealer (from arc.trusted_sealers).",
        &["sealer"],
    )
});

pub fn init() {
    LazyLock::force(&SEALS);
    LazyLock::force(&OVERRIDES);
    // Every outcome exists from the start at 0, so rate() sees the first event.
    for outcome in SealOutcome::ALL {
        SEALS.with_label_values(&[outcome.as_label()]);
    }
}

pub fn sealed(outcome: SealOutcome) {
    SEALS.with_label_values(&[outcome.as_label()]).inc();
}

pub fn override_applied(sealer: &str) {
    OVERRIDES.with_label_values(&[sealer]).inc();
}
