//! Policy metrics: rule hits by rule name (bounded: names come from the admin's files)
//! and mode.

use crate::metrics::counter_vec;
use prometheus::IntCounterVec;
use std::sync::LazyLock;

static HITS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_policy_rule_hits_total",
        "Policy rule matches, by rule name, action and mode (enforce, shadow).",
        &["rule", "action", "mode"],
    )
});

pub fn init() {
    LazyLock::force(&HITS);
}

pub fn hit(rule: &super::Rule) {
    let mode = if rule.shadow { "shadow" } else { "enforce" };
    HITS.with_label_values(&[&rule.name, rule.action.name(), mode])
        .inc();
}
