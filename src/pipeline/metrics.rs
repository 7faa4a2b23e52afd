//! Transaction metrics: outcomes, sizes and how long the end of data takes.

use super::record::Outcome;
use crate::metrics::{LATENCY_BUCKETS, SIZE_BUCKETS, counter_vec, histogram, histogram_vec};
use crate::smtp::reply::Reply;
use prometheus::{Histogram, HistogramVec, IntCounterVec};
use std::sync::LazyLock;
use std::time::Duration;

static TRANSACTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_transactions_total",
        "Mail transactions by outcome (delivered, quarantined, rejected, tempfailed, aborted) and final reply class.",
        &["outcome", "reply_class"],
    )
});

static MESSAGE_BYTES: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "mxgate_message_size_bytes",
        "Size of received messages.",
        SIZE_BUCKETS,
    )
});

static STAGE_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "mxgate_stage_duration_seconds",
        "Latency of a stage: transaction (MAIL to final reply), end_of_data (end of data to final reply).",
        &["stage"],
        LATENCY_BUCKETS,
    )
});

pub fn init() {
    LazyLock::force(&TRANSACTIONS);
    LazyLock::force(&MESSAGE_BYTES);
    LazyLock::force(&STAGE_SECONDS);
    for (outcome, class) in [
        ("delivered", "2xx"),
        ("quarantined", "2xx"),
        ("rejected", "5xx"),
        ("tempfailed", "4xx"),
        ("aborted", "none"),
    ] {
        TRANSACTIONS.with_label_values(&[outcome, class]);
    }
}

pub fn transaction(outcome: Outcome, reply: Option<&Reply>, elapsed: Duration) {
    let class = reply.map_or("none", Reply::class_label);
    TRANSACTIONS
        .with_label_values(&[outcome.label(), class])
        .inc();
    TRANSACTION_SECONDS.observe(elapsed.as_secs_f64());
}

pub fn message_received(size: usize) {
    MESSAGE_BYTES.observe(size as f64);
}

pub fn end_of_data(elapsed: Duration) {
    END_OF_DATA_SECONDS.observe(elapsed.as_secs_f64());
}

// The two stages' children, made on first use like `with_label_values`, which would
// hash the label and take a lock for every message.
static TRANSACTION_SECONDS: LazyLock<Histogram> =
    LazyLock::new(|| STAGE_SECONDS.with_label_values(&["transaction"]));
static END_OF_DATA_SECONDS: LazyLock<Histogram> =
    LazyLock::new(|| STAGE_SECONDS.with_label_values(&["end_of_data"]));
