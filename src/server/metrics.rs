//! Process-level metrics of serving: configuration reloads, the running generation and
//! the STARTTLS certificate's expiry. (Connections and PROXY headers are counted in
//! `smtp::metrics`, below the session that also counts them.)
//! May call: `crate::metrics`.

use crate::metrics::{counter_vec, gauge, unix_now};
use prometheus::{IntCounterVec, IntGauge};
use std::sync::LazyLock;

static RELOADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_config_reloads_total",
        "Configuration reloads, by result (success, failure).",
        &["result"],
    )
});
static GENERATION: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "mxgate_config_generation",
        "Generation of the running configuration snapshot (1 at start, +1 per successful reload).",
    )
});
static LAST_SUCCESS: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "mxgate_config_last_reload_success_timestamp_seconds",
        "When the running configuration was loaded.",
    )
});
static LAST_OK: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "mxgate_config_last_reload_successful",
        "1 when the latest load of the configuration files succeeded, 0 when it failed (the previous configuration keeps running).",
    )
});
static CERT_EXPIRY: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "mxgate_tls_certificate_expiry_timestamp_seconds",
        "Expiry (not after) of the STARTTLS certificate in use, seconds since the epoch.",
    )
});

pub fn init() {
    LazyLock::force(&RELOADS);
    LazyLock::force(&GENERATION);
    LazyLock::force(&LAST_SUCCESS);
    LazyLock::force(&LAST_OK);
    // The certificate expiry is registered only once a certificate is loaded: a 0 for
    // "no TLS" would look like a certificate expired in 1970.
    for result in ["success", "failure"] {
        RELOADS.with_label_values(&[result]);
    }
}

/// A configuration snapshot is now the running one; `certificate_expiry` is its
/// STARTTLS certificate's not-after, when it has one.
pub fn running(generation: u64, certificate_expiry: Option<i64>) {
    GENERATION.set(generation as i64);
    LAST_SUCCESS.set(unix_now());
    LAST_OK.set(1);
    if let Some(expiry) = certificate_expiry {
        CERT_EXPIRY.set(expiry);
    }
}

/// A reload finished: installed (`ok`), or failed and the running snapshot stays.
pub fn reloaded(ok: bool) {
    let result = if ok { "success" } else { "failure" };
    RELOADS.with_label_values(&[result]).inc();
    if !ok {
        LAST_OK.set(0);
    }
}
