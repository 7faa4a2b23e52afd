//! SMTP-level metrics: connections, replies and PROXY headers. Labels: listener address
//! (from the config, bounded), reply class, reject reason, PROXY header result, TLS
//! version.

use crate::metrics::{Children, LATENCY_BUCKETS, counter_vec, gauge, histogram};
use crate::smtp::reply::Reply;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};
use std::sync::LazyLock;

static REPLIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_smtp_replies_total",
        "SMTP replies sent to clients, by class (2xx, 3xx, 4xx, 5xx).",
        &["class"],
    )
});

static REJECTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_rejections_total",
        "Replies that refused something (4xx and 5xx), by reason.",
        &["reason"],
    )
});

pub static CONNECTIONS_TOTAL: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_connections_total",
        "Client connections accepted, by listener.",
        &["listener"],
    )
});

pub static CONNECTIONS_CURRENT: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("mxgate_connections_current", "Client connections open now."));

pub static CONNECTIONS_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_connections_refused_total",
        "Connections refused at connect, by reason (global_limit, per_ip_limit, rate_limit, policy, proxy_protocol).",
        &["reason"],
    )
});

static PROXY_HEADERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_proxy_protocol_headers_total",
        "PROXY protocol headers, by result: proxied (a client address), local (a \
         balancer's own connection: PROXY UNKNOWN or v2 LOCAL), missing (a trusted peer \
         sent none in time), invalid, untrusted (a header from outside trusted_networks).",
        &["result"],
    )
});

/// What became of a PROXY protocol header: read by `server::proxy` from a trusted
/// balancer, or refused by the session from anyone else. It is counted here, below
/// both, because both count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyHeader {
    Proxied,
    Local,
    Missing,
    Invalid,
    Untrusted,
}

impl ProxyHeader {
    pub const ALL: [ProxyHeader; 5] = [
        ProxyHeader::Proxied,
        ProxyHeader::Local,
        ProxyHeader::Missing,
        ProxyHeader::Invalid,
        ProxyHeader::Untrusted,
    ];

    pub fn as_label(self) -> &'static str {
        match self {
            ProxyHeader::Proxied => "proxied",
            ProxyHeader::Local => "local",
            ProxyHeader::Missing => "missing",
            ProxyHeader::Invalid => "invalid",
            ProxyHeader::Untrusted => "untrusted",
        }
    }
}

/// Counts one PROXY header; one that was not honoured also counts as a connection
/// refused for `proxy_protocol`.
pub fn proxy_header(result: ProxyHeader) {
    PROXY_HEADERS.with_label_values(&[result.as_label()]).inc();
    if matches!(
        result,
        ProxyHeader::Missing | ProxyHeader::Invalid | ProxyHeader::Untrusted
    ) {
        CONNECTIONS_REFUSED
            .with_label_values(&["proxy_protocol"])
            .inc();
    }
}

pub static TLS_HANDSHAKES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_tls_handshakes_total",
        "STARTTLS handshakes, by TLS version (1.2, 1.3) or `failed`.",
        &["version"],
    )
});

pub static GREETING_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "mxgate_connect_to_greeting_duration_seconds",
        "Time from accepting a connection to sending the first reply (greeting or refusal).",
        LATENCY_BUCKETS,
    )
});

pub static SESSION_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "mxgate_session_duration_seconds",
        "Time from connect to disconnect.",
        LATENCY_BUCKETS,
    )
});

pub fn init() {
    LazyLock::force(&REPLIES);
    LazyLock::force(&CONNECTIONS_TOTAL);
    LazyLock::force(&CONNECTIONS_CURRENT);
    LazyLock::force(&CONNECTIONS_REFUSED);
    LazyLock::force(&TLS_HANDSHAKES);
    LazyLock::force(&SESSION_SECONDS);
    LazyLock::force(&GREETING_SECONDS);
    // Known label values exist from the start at 0, so rate() and increase() see the
    // first event (a series born at 1 has no increase to show).
    for class in REPLY_CLASSES {
        REPLIES.with_label_values(&[class]);
    }
    for reason in crate::smtp::reply::RejectReason::ALL {
        REJECTIONS.with_label_values(&[reason.as_label()]);
    }
    for reason in [
        "global_limit",
        "per_ip_limit",
        "rate_limit",
        "policy",
        "proxy_protocol",
    ] {
        CONNECTIONS_REFUSED.with_label_values(&[reason]);
    }
    for result in ProxyHeader::ALL {
        PROXY_HEADERS.with_label_values(&[result.as_label()]);
    }
    for version in ["1.2", "1.3", "failed"] {
        TLS_HANDSHAKES.with_label_values(&[version]);
    }
}

const REPLY_CLASSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];
static REPLY_CHILDREN: Children<IntCounter, { REPLY_CLASSES.len() }> = Children::new();

pub fn reply(reply: &Reply) {
    let class = reply.class_label();
    let at = REPLY_CLASSES.iter().position(|c| *c == class);
    REPLY_CHILDREN
        .get(at.unwrap_or(REPLY_CLASSES.len()), || {
            REPLIES.with_label_values(&[class])
        })
        .inc();
    if reply.code() >= 400 {
        REJECTIONS
            .with_label_values(&[reply.reason().as_label()])
            .inc();
    }
}
