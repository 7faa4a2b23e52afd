//! Limit metrics. The `limit` label is the config key of the limit (a fixed set), never
//! the client.

use crate::metrics::{counter_vec, gauge};
use prometheus::{IntCounterVec, IntGauge};
use std::sync::LazyLock;

/// Every value of the `limit` label.
pub const LIMITS: &[&str] = &[
    "max_connections_per_ip",
    "connections_per_minute",
    "messages_per_minute",
    "recipients_per_minute",
    "max_junk_commands",
    "min_data_rate",
    "max_tracked_clients",
];

static EXCEEDED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_limit_exceeded_total",
        "Times a client went over a per-client limit, by limit (the limits: config key; max_tracked_clients: a client not rate-limited for lack of room).",
        &["limit"],
    )
});

pub static TRACKED_CLIENTS: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "mxgate_limits_tracked_clients",
        "Clients (IPv4 addresses, IPv6 prefixes) whose connections and rates are counted now.",
    )
});

pub static STORE_UP: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "mxgate_limits_store_up",
        "1 while the limits store answers (always with limits.store: memory); 0 while this instance counts in its own memory instead of the shared store.",
    )
});

pub fn exceeded(limit: &'static str) {
    debug_assert!(LIMITS.contains(&limit), "{limit}");
    EXCEEDED.with_label_values(&[limit]).inc();
}

pub fn init() {
    LazyLock::force(&TRACKED_CLIENTS);
    LazyLock::force(&STORE_UP);
    for limit in LIMITS {
        EXCEEDED.with_label_values(&[limit]);
    }
}
