//! The process side of serving: listeners and connection slots, the PROXY header of a
//! trusted balancer, the reloader that swaps snapshots, and their metrics. (The
//! graceful-shutdown signal lives in `crate::shutdown`, below the session that listens
//! to it.)

pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod reload;
