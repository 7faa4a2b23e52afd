//! The process side of serving: listeners and connection limits, and the reloader
//! that swaps snapshots. (The graceful-shutdown signal lives in `crate::shutdown`, below
//! the session that listens to it.)

pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod reload;
