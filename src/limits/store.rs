//! Where the per-client counters live, behind one small interface: this process's
//! memory, or a store shared by several instances (Redis/Valkey, so that they enforce one
//! limit; it falls back to memory by itself). The methods are `async` for the shared
//! store; memory never waits.

use super::key::ClientKey;
use super::memory::{MemoryGuard, MemoryStore};
use super::redis::{Acquired, RedisGuard, RedisStore};
use std::sync::Arc;
use std::time::Duration;

/// The rates counted per client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    Connections = 0,
    Messages = 1,
    Recipients = 2,
}

impl Rate {
    pub const ALL: [Rate; 3] = [Rate::Connections, Rate::Messages, Rate::Recipients];
}

/// Why a new connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `max_connections_per_ip` are open.
    Connections(Exceeded),
    /// `connections_per_minute`.
    Rate(Exceeded),
}

/// A limit was reached. `first`: the first refusal of this client in a while (the
/// current window, or a minute), so that one line is logged rather than one per attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exceeded {
    pub first: bool,
}

pub enum Store {
    Memory(Arc<MemoryStore>),
    /// The shared store and its memory fallback.
    Redis(Arc<RedisStore>, Arc<MemoryStore>),
}

/// An open connection counted for its client until dropped.
pub enum ConnectionGuard {
    Memory(#[allow(dead_code)] MemoryGuard),
    Redis(#[allow(dead_code)] RedisGuard),
}

impl Store {
    pub fn memory(capacity: usize) -> Store {
        Store::Memory(Arc::new(MemoryStore::new(capacity)))
    }

    /// A new connection of `key`: counted unless it already has `max` open or (when
    /// `rate_limit` is not 0) `rate_limit` connections in the last `window`. A refused
    /// connection holds no slot. The shared store does both in one round trip.
    pub async fn admit(
        &self,
        key: ClientKey,
        max: usize,
        rate_limit: u32,
        window: Duration,
    ) -> Result<ConnectionGuard, Refused> {
        match self {
            Store::Memory(store) => {
                let guard = store
                    .acquire_connection(key, max)
                    .map_err(Refused::Connections)?;
                if rate_limit > 0 {
                    store
                        .hit_rate(Rate::Connections, key, rate_limit, window)
                        .map_err(Refused::Rate)?;
                }
                Ok(ConnectionGuard::Memory(guard))
            }
            Store::Redis(store, _) => match store.admit(key, max, rate_limit, window).await? {
                Acquired::Shared(guard) => Ok(ConnectionGuard::Redis(guard)),
                Acquired::Local(guard) => Ok(ConnectionGuard::Memory(guard)),
            },
        }
    }

    /// Counts one event unless `limit` events happened in the last `window`.
    pub async fn hit_rate(
        &self,
        rate: Rate,
        key: ClientKey,
        limit: u32,
        window: Duration,
    ) -> Result<(), Exceeded> {
        match self {
            Store::Memory(store) => store.hit_rate(rate, key, limit, window),
            Store::Redis(store, _) => store.hit_rate(rate, key, limit, window).await,
        }
    }

    /// Store-specific settings that a reload may change.
    pub fn configure(&self, max_tracked_clients: usize) {
        match self {
            Store::Memory(store) | Store::Redis(_, store) => {
                store.set_capacity(max_tracked_clients)
            }
        }
    }
}
