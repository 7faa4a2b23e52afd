//! The process side of serving: listeners and connection limits, graceful shutdown,
//! and the reloader that swaps snapshots.

pub mod listener;
pub mod proxy;
pub mod reload;
pub mod shutdown;
