//! The Prometheus registry and the HTTP endpoint that serves it.
//!
//! Metrics themselves are defined beside the code that moves them (`smtp::metrics`,
//! `relay::metrics`, ...); this module provides the constructors they use, which
//! register into one registry, and `/metrics`, `/healthz`, `/readyz` over hyper.
//! Labels are low-cardinality by construction: never addresses, domains or IPs.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, TextEncoder,
};
use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use tokio::net::TcpListener;

/// Seconds, for latencies from sub-millisecond (cached checks) to minutes (slow peers).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// Bytes, for message sizes.
pub const SIZE_BUCKETS: &[f64] = &[
    1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0,
];

fn register<C: prometheus::core::Collector + Clone + 'static>(collector: C) -> C {
    // Registration only fails for a duplicate name, which a LazyLock static rules out.
    let _ = prometheus::default_registry().register(Box::new(collector.clone()));
    collector
}

pub fn counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::new(name, help).expect("valid metric name"))
}

pub fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric name"))
}

pub fn gauge(name: &str, help: &str) -> IntGauge {
    register(IntGauge::new(name, help).expect("valid metric name"))
}

pub fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric name"))
}

pub fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    register(
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
            .expect("valid metric name"),
    )
}

pub fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    register(
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )
        .expect("valid metric name"),
    )
}

/// Children of a labelled metric whose label values are known in advance, kept by
/// index once made. `with_label_values` hashes the values and takes a lock on every
/// call, and the message path counts some twenty times per message; each child here is
/// made (and so appears on `/metrics`) on its first use, as with `with_label_values`.
pub struct Children<M, const N: usize>([OnceLock<M>; N]);

impl<M, const N: usize> Children<M, N> {
    pub const fn new() -> Self {
        Children([const { OnceLock::new() }; N])
    }

    /// Child `index`, made by `make` the first time. An index past the end (a caller's
    /// table out of step with its labels) gets a fresh child each time: slower, never
    /// wrong, never a panic.
    pub fn get(&self, index: usize, make: impl FnOnce() -> M) -> std::borrow::Cow<'_, M>
    where
        M: Clone,
    {
        match self.0.get(index) {
            Some(cell) => std::borrow::Cow::Borrowed(cell.get_or_init(make)),
            None => std::borrow::Cow::Owned(make()),
        }
    }
}

impl<M, const N: usize> Default for Children<M, N> {
    fn default() -> Self {
        Self::new()
    }
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `mxgate_build_info{version} 1`, so dashboards can show what runs.
pub fn register_build_info() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let info = gauge_vec(
            "mxgate_build_info",
            "Always 1; the labels say which mxgate build is running.",
            &["version"],
        );
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    });
}

/// The text exposition of every registered metric.
pub fn render() -> String {
    let mut out = Vec::with_capacity(16 * 1024);
    let families = prometheus::default_registry().gather();
    let _ = TextEncoder::new().encode(&families, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Answers `/readyz`: `Ok` when ready, else the reason.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let readiness = readiness.clone();
                async move { Ok::<_, Infallible>(respond(req, &readiness)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(io, service);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await;
        });
    }
}

fn respond(req: Request<hyper::body::Incoming>, readiness: &Readiness) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => match readiness() {
            Ok(()) => (StatusCode::OK, "text/plain", "ready\n".to_string()),
            Err(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {reason}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_count_into_their_vector_in_and_out_of_range() {
        let vec = IntCounterVec::new(Opts::new("t_children", "test"), &["class"]).unwrap();
        static CHILDREN: Children<IntCounter, 2> = Children::new();
        let label = ["a", "b", "c"];
        for (at, times) in [(0, 3), (1, 1), (2, 2)] {
            for _ in 0..times {
                CHILDREN
                    .get(at, || vec.with_label_values(&[label[at]]))
                    .inc();
            }
        }
        // Index 2 is past the table's end: still counted, under its own label.
        for (label, expected) in [("a", 3), ("b", 1), ("c", 2)] {
            assert_eq!(vec.with_label_values(&[label]).get(), expected, "{label}");
        }
        // A kept child is made once: a second maker is not called.
        CHILDREN.get(0, || panic!("made twice")).inc();
        assert_eq!(vec.with_label_values(&["a"]).get(), 4);
    }
}
