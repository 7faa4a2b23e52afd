//! Backend metrics. Labels: the backend as configured (bounded by the config) and a
//! small fixed set of result words.

use super::{Delivery, RelayError};
use crate::metrics::{LATENCY_BUCKETS, counter, counter_vec, gauge, gauge_vec, histogram_vec};
use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use std::sync::LazyLock;
use std::time::Duration;

static DELIVERIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_backend_deliveries_total",
        "Messages handed to a backend, by backend and result (accepted, rejected, tempfailed, recipient_refused, or an error kind).",
        &["backend", "result"],
    )
});

static DELIVERY_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "mxgate_backend_delivery_duration_seconds",
        "Time from sending DATA to the backend until its final reply.",
        &["backend"],
        LATENCY_BUCKETS,
    )
});

static ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_backend_errors_total",
        "Backend connection failures that caused a failover, by backend and kind.",
        &["backend", "kind"],
    )
});

static UP: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge_vec(
        "mxgate_backend_up",
        "1 when the backend answered the last probe (or a delivery since), 0 when it did not.",
        &["backend"],
    )
});

static LAST_SUCCESS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge_vec(
        "mxgate_backend_last_success_timestamp_seconds",
        "When the backend last accepted a probe or a message.",
        &["backend"],
    )
});

static PROBES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_backend_recipient_probes_total",
        "Recipients verified with a backend (MAIL, RCPT, RSET), by backend and result (accepted, rejected, tempfailed, mail_refused, or an error kind).",
        &["backend", "result"],
    )
});

static CACHE_LOOKUPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_backend_recipient_cache_requests_total",
        "Recipient look-ups in relay.recipient_cache, by result (hit, miss).",
        &["result"],
    )
});

pub(super) static CACHE_EVICTIONS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "mxgate_backend_recipient_cache_evictions_total",
        "Recipient answers evicted before they expired because relay.recipient_cache.max_entries was reached.",
    )
});

static CACHE_ENTRIES: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "mxgate_backend_recipient_cache_entries",
        "Recipient answers kept in relay.recipient_cache (approximate).",
    )
});

pub fn init() {
    LazyLock::force(&PROBES);
    LazyLock::force(&CACHE_LOOKUPS);
    LazyLock::force(&CACHE_EVICTIONS);
    LazyLock::force(&CACHE_ENTRIES);
    LazyLock::force(&UP);
    LazyLock::force(&LAST_SUCCESS);
    LazyLock::force(&DELIVERIES);
    LazyLock::force(&DELIVERY_SECONDS);
    LazyLock::force(&ERRORS);
}

pub fn backend_error(backend: &str, kind: &str) {
    ERRORS.with_label_values(&[backend, kind]).inc();
}

pub fn delivery(backend: &str, result: &Result<Delivery, RelayError>, elapsed: Duration) {
    let label = match result {
        Ok(Delivery::Stored(_)) => "accepted",
        Ok(Delivery::Single(reply) | Delivery::MailRefused(reply)) => reply_label(reply.code),
        Ok(Delivery::RcptRefused(_)) => "recipient_refused",
        Ok(Delivery::NoSmtputf8) => "rejected",
        Ok(Delivery::PerRecipient(replies)) => {
            let worst = replies.iter().map(|(_, r)| r.code).max().unwrap_or(250);
            reply_label(worst)
        }
        Err(err) => err.label(),
    };
    DELIVERIES.with_label_values(&[backend, label]).inc();
    DELIVERY_SECONDS
        .with_label_values(&[backend])
        .observe(elapsed.as_secs_f64());
}

pub fn probe(backend: &str, result: &'static str) {
    PROBES.with_label_values(&[backend, result]).inc();
}

pub fn recipient_cache_lookup(hit: bool) {
    // Children made on first use; one look-up per recipient of every message.
    static HIT: LazyLock<IntCounter> = LazyLock::new(|| CACHE_LOOKUPS.with_label_values(&["hit"]));
    static MISS: LazyLock<IntCounter> =
        LazyLock::new(|| CACHE_LOOKUPS.with_label_values(&["miss"]));
    match hit {
        true => HIT.inc(),
        false => MISS.inc(),
    }
}

pub fn recipient_cache_evicted() {
    CACHE_EVICTIONS.inc();
}

pub fn recipient_cache_size(entries: u64) {
    CACHE_ENTRIES.set(i64::try_from(entries).unwrap_or(i64::MAX));
}

pub fn reply_label(code: u16) -> &'static str {
    match code {
        200..=299 => "accepted",
        400..=499 => "tempfailed",
        _ => "rejected",
    }
}

/// The backends the health gauges export: those of the running configuration (`None`
/// before the first configuration runs, as in tests that build a relay on its own).
static CONFIGURED: std::sync::Mutex<Option<Vec<String>>> = std::sync::Mutex::new(None);

/// A configuration runs (at start, after a reload): stop exporting backends that are no
/// longer configured, so an alert
/// cannot fire for a backend that was removed; connections still on the old
/// configuration cannot bring them back (see `health`).
pub fn retain_backends(current: &[String]) {
    let mut configured = CONFIGURED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(previous) = configured.as_ref() {
        for backend in previous.iter().filter(|b| !current.contains(b)) {
            let _ = UP.remove_label_values(&[backend]);
            let _ = LAST_SUCCESS.remove_label_values(&[backend]);
        }
    }
    *configured = Some(current.to_vec());
}

/// Records a probe or delivery outcome for the backend's health gauges.
pub fn health(backend: &str, ok: bool, now: i64) {
    {
        let configured = CONFIGURED.lock().unwrap_or_else(|e| e.into_inner());
        if configured
            .as_ref()
            .is_some_and(|list| !list.iter().any(|b| b == backend))
        {
            return;
        }
    }
    UP.with_label_values(&[backend]).set(i64::from(ok));
    if ok {
        LAST_SUCCESS.with_label_values(&[backend]).set(now);
    }
}
