//! mxgate: an inbound SMTP gateway that relays in-line to the mailbox server behind it,
//! after judging each message with SPF, DKIM, DMARC, ARC and iprev and a sender policy.
//!
//! Layers (imports point downward):
//! - pure: `smtp::reply`, `smtp::data`, `config`, `rewrite`, `policy`
//! - adapters: `auth`, `relay`, `tls`, `metrics`, `spool`, `limits`, `shutdown`
//! - orchestration: `smtp::session`, `pipeline` (the session sees the pipeline only
//!   through the `smtp::stages::Stages` trait, which `pipeline::Connection` implements)
//! - process: `server`, `snapshot`, `app`, `cli`

pub mod auth;
pub mod cmd;
pub mod config;
pub mod findings;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod relay;
pub mod rewrite;
pub mod server;
pub mod shutdown;
pub mod smtp;
pub mod snapshot;
pub mod spool;
pub mod tls;

// The paths the integration tests and the bench name, from before the commands moved
// under `cmd`.
pub use cmd::keygen;
pub use cmd::serve as app;

/// Registers every metric so that `/metrics` lists them from the start, at zero.
pub fn metrics_init() {
    metrics::register_build_info();
    smtp::metrics::init();
    auth::metrics::init();
    rewrite::metrics::init();
    policy::metrics::init();
    pipeline::metrics::init();
    relay::metrics::init();
    server::metrics::init();
    limits::metrics::init();
}
