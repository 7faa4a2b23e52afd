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

    /// Counts a connection of `key` unless it already has `max` open.
    pub async fn acquire_connection(
        &self,
        key: ClientKey,
        max: usize,
    ) -> Result<ConnectionGuard, Exceeded> {
        match self {
            Store::Memory(store) => store
                .acquire_connection(key, max)
                .map(ConnectionGuard::Memory),
            Store::Redis(store, _) => match store.acquire_connection(key, max).await? {
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
