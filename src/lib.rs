//! mxgate: an inbound SMTP gateway that relays in-line to the mailbox server behind it,
//! after judging each message with SPF, DKIM, DMARC, ARC and iprev and a sender policy.
//!
//! Layers (imports point downward):
//! - pure: `smtp::reply`, `smtp::data`, `config`, `rewrite`, `policy`
//! - adapters: `auth`, `relay`, `tls`, `metrics`, `spool`, `limits`, `shutdown`
//! - orchestration: `smtp::session`, `pipeline` (the session sees the pipeline only
//!   through the `smtp::stages::Stages` trait, which `pipeline::Connection` implements)
//! - process: `server`, `snapshot`, `app`, `cli`

pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod dnscheck;
pub mod explain;
pub mod hostcheck;
pub mod keygen;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod profile;
pub mod relay;
pub mod rewrite;
pub mod server;
pub mod shutdown;
pub mod smtp;
pub mod snapshot;
pub mod spool;
pub mod tls;

/// Registers every metric so that `/metrics` lists them from the start, at zero.
pub fn metrics_init() {
    metrics::register_build_info();
    smtp::metrics::init();
    auth::metrics::init();
    rewrite::metrics::init();
    policy::metrics::init();
    pipeline::metrics::init();
    relay::metrics::init();
    server::reload::init();
    limits::metrics::init();
    server::proxy::init();
}
