//! Counters in this process's memory: the default store, and the fallback of a shared
//! one. One mutex over one table; every operation is O(1) except a sweep of expired
//! entries, which runs at most once a minute (once a second while the table is full).
//!
//! Rates use a sliding window counter: the count of the current window plus the previous
//! window's count weighted by how much of it still overlaps the last `window`. It needs
//! two numbers per client and rate, and a burst at a window boundary cannot double the
//! limit as it can with fixed windows.

use super::key::ClientKey;
use super::metrics;
use super::store::{Exceeded, Rate};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// How often expired entries are dropped in any case.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// How often a full table is swept for room, at most.
const SWEEP_WHEN_FULL_EVERY: Duration = Duration::from_secs(1);
/// A refused connection is logged once per client per this period.
const LOG_EVERY: Duration = Duration::from_secs(60);

pub struct MemoryStore {
    table: Mutex<Table>,
    /// Clients tracked at most (`limits.max_tracked_clients`; a reload may change it).
    capacity: AtomicUsize,
}

struct Table {
    clients: HashMap<ClientKey, Client>,
    last_sweep: Instant,
    /// When a client could not be tracked for lack of room, last logged.
    full_logged: Option<Instant>,
}

struct Client {
    connections: usize,
    rates: [Window; Rate::ALL.len()],
    /// After this the entry holds nothing worth keeping (no connection, windows over).
    expires: Instant,
    connection_refusal_logged: Option<Instant>,
}

#[derive(Default)]
struct Window {
    start: Option<Instant>,
    current: u32,
    previous: u32,
    refusal_logged: bool,
}

/// One open connection counted for its client; dropping it gives the slot back.
pub struct MemoryGuard {
    store: Arc<MemoryStore>,
    key: ClientKey,
}

impl MemoryStore {
    pub fn new(capacity: usize) -> Self {
        MemoryStore {
            table: Mutex::new(Table {
                clients: HashMap::new(),
                last_sweep: Instant::now(),
                full_logged: None,
            }),
            capacity: AtomicUsize::new(capacity.max(1)),
        }
    }

    pub fn set_capacity(&self, capacity: usize) {
        self.capacity.store(capacity.max(1), Ordering::Relaxed);
    }

    pub fn tracked(&self) -> usize {
        self.lock().clients.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a connection slot for `key` unless it already has `max` open. Checked and
    /// taken under one lock, so two connections cannot both squeeze under the limit.
    /// Always tracked, full table or not: open connections are bounded by
    /// `server.max_connections`, and a slot must be given back to the entry it came from.
    pub fn acquire_connection(
        self: &Arc<Self>,
        key: ClientKey,
        max: usize,
    ) -> Result<MemoryGuard, Exceeded> {
        let now = Instant::now();
        let mut table = self.lock();
        table.sweep_if_due(now, self.capacity());
        let client = table.clients.entry(key).or_insert_with(|| Client::new(now));
        if client.connections >= max {
            let first = client
                .connection_refusal_logged
                .is_none_or(|at| now.duration_since(at) >= LOG_EVERY);
            if first {
                client.connection_refusal_logged = Some(now);
            }
            return Err(Exceeded { first });
        }
        client.connections += 1;
        metrics::TRACKED_CLIENTS.set(table.clients.len() as i64);
        Ok(MemoryGuard {
            store: self.clone(),
            key,
        })
    }

    /// Counts one event of `rate` for `key` unless that would pass `limit` in the last
    /// `window`. A refused event is not counted.
    pub fn hit_rate(
        &self,
        rate: Rate,
        key: ClientKey,
        limit: u32,
        window: Duration,
    ) -> Result<(), Exceeded> {
        self.hit_rate_at(Instant::now(), rate, key, limit, window)
    }

    fn hit_rate_at(
        &self,
        now: Instant,
        rate: Rate,
        key: ClientKey,
        limit: u32,
        window: Duration,
    ) -> Result<(), Exceeded> {
        let capacity = self.capacity();
        let mut table = self.lock();
        table.sweep_if_due(now, capacity);
        if !table.clients.contains_key(&key) && table.clients.len() >= capacity {
            // No room: this client goes unlimited rather than evicting one whose count
            // matters. Reaching this takes `capacity` distinct clients within minutes.
            metrics::exceeded("max_tracked_clients");
            if table
                .full_logged
                .is_none_or(|at| now.duration_since(at) >= LOG_EVERY)
            {
                table.full_logged = Some(now);
                tracing::warn!(
                    client = %key,
                    limit = "max_tracked_clients",
                    max = capacity,
                    "limits: too many clients to track; new clients are not rate-limited until entries expire"
                );
            }
            return Ok(());
        }
        let client = table.clients.entry(key).or_insert_with(|| Client::new(now));
        client.expires = client.expires.max(now + window * 2);
        let decision = client.rates[rate as usize].hit(now, limit, window);
        let tracked = table.clients.len();
        metrics::TRACKED_CLIENTS.set(tracked as i64);
        decision
    }

    fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    fn release(&self, key: &ClientKey) {
        let now = Instant::now();
        let mut table = self.lock();
        if let Some(client) = table.clients.get_mut(key) {
            client.connections = client.connections.saturating_sub(1);
            if client.connections == 0 && client.expires <= now {
                table.clients.remove(key);
            }
        }
        metrics::TRACKED_CLIENTS.set(table.clients.len() as i64);
    }
}

impl Drop for MemoryGuard {
    fn drop(&mut self) {
        self.store.release(&self.key);
    }
}

impl Table {
    fn sweep_if_due(&mut self, now: Instant, capacity: usize) {
        let since = now.duration_since(self.last_sweep);
        let full = self.clients.len() >= capacity;
        if since < SWEEP_EVERY && !(full && since >= SWEEP_WHEN_FULL_EVERY) {
            return;
        }
        self.last_sweep = now;
        self.clients
            .retain(|_, client| client.connections > 0 || client.expires > now);
        metrics::TRACKED_CLIENTS.set(self.clients.len() as i64);
    }
}

impl Client {
    fn new(now: Instant) -> Self {
        Client {
            connections: 0,
            rates: Default::default(),
            expires: now,
            connection_refusal_logged: None,
        }
    }
}

impl Window {
    fn hit(&mut self, now: Instant, limit: u32, window: Duration) -> Result<(), Exceeded> {
        let start = *self.start.get_or_insert(now);
        let elapsed = now.duration_since(start);
        if elapsed >= window {
            let windows = (elapsed.as_nanos() / window.as_nanos().max(1)) as u32;
            self.previous = if windows == 1 { self.current } else { 0 };
            self.current = 0;
            self.start = Some(start + window * windows);
            self.refusal_logged = false;
        }
        let into = now.duration_since(self.start.unwrap_or(now)).as_secs_f64()
            / window.as_secs_f64().max(f64::MIN_POSITIVE);
        let estimate = f64::from(self.previous) * (1.0 - into).max(0.0) + f64::from(self.current);
        if estimate + 1.0 > f64::from(limit) {
            let first = !self.refusal_logged;
            self.refusal_logged = true;
            return Err(Exceeded { first });
        }
        self.current += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn key(ip: &str) -> ClientKey {
        ClientKey::of(ip.parse().unwrap(), 64)
    }

    #[test]
    fn rate_allows_the_limit_then_refuses() {
        let store = MemoryStore::new(10);
        let t0 = Instant::now();
        let a = key("192.0.2.1");
        for _ in 0..3 {
            assert!(store.hit_rate_at(t0, Rate::Messages, a, 3, MINUTE).is_ok());
        }
        let refused = store
            .hit_rate_at(t0, Rate::Messages, a, 3, MINUTE)
            .unwrap_err();
        assert!(refused.first);
        let again = store
            .hit_rate_at(t0, Rate::Messages, a, 3, MINUTE)
            .unwrap_err();
        assert!(!again.first, "logged once per window");
        // Other rates and other clients have their own counts.
        assert!(
            store
                .hit_rate_at(t0, Rate::Recipients, a, 3, MINUTE)
                .is_ok()
        );
        assert!(
            store
                .hit_rate_at(t0, Rate::Messages, key("192.0.2.2"), 3, MINUTE)
                .is_ok()
        );
    }

    #[test]
    fn the_window_slides() {
        let store = MemoryStore::new(10);
        let t0 = Instant::now();
        let a = key("192.0.2.1");
        for _ in 0..4 {
            assert!(store.hit_rate_at(t0, Rate::Messages, a, 4, MINUTE).is_ok());
        }
        // Just after the window turned, the previous window still weighs in full.
        let t1 = t0 + MINUTE + Duration::from_secs(1);
        assert!(store.hit_rate_at(t1, Rate::Messages, a, 4, MINUTE).is_err());
        // Half way through it weighs half: room for two.
        let t2 = t0 + MINUTE + Duration::from_secs(30);
        assert!(store.hit_rate_at(t2, Rate::Messages, a, 4, MINUTE).is_ok());
        assert!(store.hit_rate_at(t2, Rate::Messages, a, 4, MINUTE).is_ok());
        assert!(store.hit_rate_at(t2, Rate::Messages, a, 4, MINUTE).is_err());
        // Two windows later everything is forgotten.
        let t3 = t0 + MINUTE * 3;
        for _ in 0..4 {
            assert!(store.hit_rate_at(t3, Rate::Messages, a, 4, MINUTE).is_ok());
        }
    }

    #[test]
    fn connections_are_counted_and_given_back() {
        let store = Arc::new(MemoryStore::new(10));
        let a = key("2001:db8:1:2::1");
        let same_prefix = key("2001:db8:1:2::99");
        let one = store.acquire_connection(a, 2).unwrap();
        let two = store.acquire_connection(same_prefix, 2).unwrap();
        assert!(store.acquire_connection(a, 2).is_err());
        assert!(store.acquire_connection(key("2001:db8:1:3::1"), 2).is_ok());
        drop(one);
        let three = store.acquire_connection(a, 2).unwrap();
        drop((two, three));
        // Nothing left to remember: the entry is gone.
        assert_eq!(store.tracked(), 0);
    }

    #[test]
    fn memory_is_bounded() {
        let store = MemoryStore::new(3);
        let t0 = Instant::now();
        for n in 1..=3 {
            let client = key(&format!("192.0.2.{n}"));
            assert!(
                store
                    .hit_rate_at(t0, Rate::Messages, client, 1, MINUTE)
                    .is_ok()
            );
        }
        assert_eq!(store.tracked(), 3);
        // Full: a new client is let through untracked; a tracked one keeps its count.
        let new = key("192.0.2.9");
        assert!(
            store
                .hit_rate_at(t0, Rate::Messages, new, 1, MINUTE)
                .is_ok()
        );
        assert!(
            store
                .hit_rate_at(t0, Rate::Messages, new, 1, MINUTE)
                .is_ok()
        );
        assert_eq!(store.tracked(), 3);
        assert!(
            store
                .hit_rate_at(t0, Rate::Messages, key("192.0.2.1"), 1, MINUTE)
                .is_err()
        );
        // Once the entries expire (two windows) a sweep makes room.
        let later = t0 + MINUTE * 2 + Duration::from_secs(1);
        assert!(
            store
                .hit_rate_at(later, Rate::Messages, new, 1, MINUTE)
                .is_ok()
        );
        assert!(
            store
                .hit_rate_at(later, Rate::Messages, new, 1, MINUTE)
                .is_err()
        );
        assert_eq!(store.tracked(), 1);
    }
}
