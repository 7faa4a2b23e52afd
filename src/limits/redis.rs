//! Counters shared by several instances in Redis or Valkey (`limits.store: redis://…`).
//!
//! Contract:
//! - Every check is one Lua script, atomic in the store, that answers within
//!   `limits.store_timeout`. The script reads the store's clock (`TIME`), so instances
//!   whose clocks disagree still count in one window.
//! - Rates use the memory store's sliding window counter (the current window's count plus
//!   the previous one's, weighted by how much of it still overlaps), in one hash per client
//!   and rate that expires two windows after its last use.
//! - An open connection is a member of a sorted set per client, scored by when its lease
//!   ends (`limits.store_connection_ttl`). The instance renews the leases of the slots it
//!   holds every third of that, and removes a slot when its connection ends. The slots of
//!   an instance that dies without saying so (SIGKILL, a lost host) end with their lease.
//! - When the store fails or is slow, the instance counts in its own memory (the
//!   fallback), sets `mxgate_limits_store_up` to 0, logs once, and reconnects in the
//!   background; no mail is refused because of the store. Slots taken in memory stay in
//!   memory until their connection ends.
//! - At shutdown the slots of the drained sessions are removed before the process ends.
//! - The store URL may hold a password: only [`StoreUrl::redacted`] is ever logged.

use super::key::ClientKey;
use super::memory::{MemoryGuard, MemoryStore};
use super::metrics;
use super::store::{Exceeded, Rate, Refused};
use crate::config::StoreUrl;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Script};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

/// How long the keeper waits between two attempts to reach a store that is down.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// Leases renewed by one script call at most.
const RENEW_BATCH: usize = 500;

/// The settings of the shared store (read at start-up).
#[derive(Clone, Debug)]
pub struct RedisSettings {
    pub url: String,
    pub timeout: Duration,
    pub key_prefix: String,
    pub connection_ttl: Duration,
}

/// The store's clock in milliseconds; scripts that read it must replicate effects.
const NOW_LUA: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// The sliding window counter of `memory.rs` in a hash (`w`: window number, `c`: its
/// count, `p`: the previous one's, `l`: a refusal was logged in it). Counts one event
/// unless `limit` would be passed. Returns 0 (counted), 1 (refused), 2 (refused, first
/// in this window).
const HIT_LUA: &str = r"
local function hit(key, limit, window)
  local index = math.floor(now / window)
  local v = redis.call('HMGET', key, 'w', 'c', 'p', 'l')
  local w = tonumber(v[1])
  local c = tonumber(v[2]) or 0
  local p = tonumber(v[3]) or 0
  local l = tonumber(v[4]) or 0
  if w ~= index then
    if w == index - 1 then p = c else p = 0 end
    c = 0
    l = 0
  end
  local into = (now - index * window) / window
  local refused = p * (1 - into) + c + 1 > limit
  if not refused then c = c + 1 end
  redis.call('HSET', key, 'w', index, 'c', c, 'p', p, 'l', refused and 1 or l)
  redis.call('PEXPIRE', key, window * 2)
  if not refused then return 0 end
  if l == 1 then return 1 end
  return 2
end
";

/// A new connection: takes a slot unless `ARGV[1]` are held, then counts the
/// connection rate (when `ARGV[4]` is not 0), in one round trip. KEYS: the client's
/// slots, its refusal-log marker, its connection rate. ARGV: max, lease (ms), member,
/// rate limit, window (ms). Returns 0 (admitted), 1 or 2 (too many connections; 2: first
/// in a minute), 3 or 4 (rate; 4: first in its window). A refused connection takes no
/// slot.
static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW_LUA}{HIT_LUA}{}",
        r"
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  if redis.call('SET', KEYS[2], '1', 'NX', 'PX', 60000) then return 2 end
  return 1
end
local limit = tonumber(ARGV[4])
if limit > 0 then
  local rate = hit(KEYS[3], limit, tonumber(ARGV[5]))
  if rate ~= 0 then return rate + 2 end
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
redis.call('PEXPIRE', KEYS[1], ttl)
return 0
"
    ))
});

/// Renews leases. KEYS: slot sets; ARGV: lease (ms), then one member per key. Re-adds a
/// slot a restarted store forgot: its connection is still open.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
",
    )
});

/// Counts one event. KEYS: the client's hash for this rate. ARGV: limit, window (ms).
/// Returns as `hit`.
static HIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW_LUA}{HIT_LUA}{}",
        "return hit(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))\n"
    ))
});

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

pub struct RedisStore {
    client: Client,
    /// For logs: the URL without its password.
    name: String,
    settings: RedisSettings,
    /// `None` while the store is down: checks go to `fallback` without waiting.
    connection: Mutex<Option<Live>>,
    /// Numbers the connections, so that a late failure on an old one cannot drop the
    /// new one.
    connections_made: AtomicU64,
    state: AtomicU8,
    /// Wakes the keeper when a check found the store down.
    reconnect: Notify,
    /// Tells the keeper to give back the slots released so far and end.
    finishing: Notify,
    /// Tells slots of different instances apart in the store.
    instance: String,
    next_slot: AtomicU64,
    /// Slots this instance holds in the store: id -> key. Their leases are renewed.
    held: Mutex<HashMap<u64, String>>,
    releases: mpsc::UnboundedSender<(String, String)>,
    fallback: Arc<MemoryStore>,
}

#[derive(Clone)]
struct Live {
    id: u64,
    connection: MultiplexedConnection,
}

/// A connection slot held in the store; dropping it asks the keeper to remove it.
pub struct RedisGuard {
    store: Arc<RedisStore>,
    slot: u64,
}

impl Drop for RedisGuard {
    fn drop(&mut self) {
        let key = self.store.held_lock().remove(&self.slot);
        if let Some(key) = key {
            // If the keeper is gone (shutdown), the lease ends by itself.
            let _ = self
                .store
                .releases
                .send((key, self.store.member(self.slot)));
        }
    }
}

pub enum Acquired {
    Shared(RedisGuard),
    Local(MemoryGuard),
}

impl RedisStore {
    /// The store and its keeper (the task that reconnects, renews leases and removes
    /// slots); the caller runs the keeper as a background task.
    pub fn new(
        settings: RedisSettings,
        fallback: Arc<MemoryStore>,
    ) -> Result<(Arc<RedisStore>, impl Future<Output = ()> + Send + 'static), String> {
        // `rediss://` builds its TLS client from rustls's process default: make it the
        // provider the rest of mxgate uses (an error means one is installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::open(settings.url.as_str())
            .map_err(|_| "limits.store is not a valid Redis URL".to_string())?;
        let (releases, released) = mpsc::unbounded_channel();
        let store = Arc::new(RedisStore {
            client,
            name: StoreUrl::Redis(settings.url.clone()).redacted(),
            settings,
            connection: Mutex::new(None),
            connections_made: AtomicU64::new(0),
            state: AtomicU8::new(UNKNOWN),
            reconnect: Notify::new(),
            finishing: Notify::new(),
            instance: instance_id(),
            next_slot: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
            releases,
            fallback,
        });
        metrics::STORE_UP.set(0);
        let keeper = keep(store.clone(), released);
        Ok((store, keeper))
    }

    /// One attempt to connect, for start-up: true when the store answered.
    pub async fn connect(&self) -> bool {
        match self.open().await {
            Ok(connection) => {
                let id = self.connections_made.fetch_add(1, Ordering::Relaxed);
                *self.connection_lock() = Some(Live { id, connection });
                self.mark_up();
                true
            }
            Err(err) => {
                self.mark_down(None, &err);
                false
            }
        }
    }

    /// A new connection of `key`: a slot unless it has `max` open, and the connection
    /// rate unless `rate_limit` is 0.
    pub async fn admit(
        self: &Arc<Self>,
        key: ClientKey,
        max: usize,
        rate_limit: u32,
        window: Duration,
    ) -> Result<Acquired, Refused> {
        if let Some(Live { id, mut connection }) = self.current() {
            let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
            let slots = self.key("conn", key);
            let mut call = ADMIT.prepare_invoke();
            call.key(&slots)
                .key(self.key("conn-refused", key))
                .key(self.key(rate_name(Rate::Connections), key))
                .arg(max)
                .arg(self.ttl_ms())
                .arg(self.member(slot))
                .arg(rate_limit)
                .arg(window.as_millis().max(1) as u64);
            match self.within(call.invoke_async::<u8>(&mut connection)).await {
                Ok(0) => {
                    self.held_lock().insert(slot, slots);
                    return Ok(Acquired::Shared(RedisGuard {
                        store: self.clone(),
                        slot,
                    }));
                }
                Ok(answer @ (1 | 2)) => {
                    return Err(Refused::Connections(Exceeded { first: answer == 2 }));
                }
                Ok(answer) => return Err(Refused::Rate(Exceeded { first: answer == 4 })),
                // A slot the script took before the deadline passed is not renewed: its
                // lease ends.
                Err(err) => self.mark_down(Some(id), &err),
            }
        }
        let guard = self
            .fallback
            .acquire_connection(key, max)
            .map_err(Refused::Connections)?;
        if rate_limit > 0 {
            self.fallback
                .hit_rate(Rate::Connections, key, rate_limit, window)
                .map_err(Refused::Rate)?;
        }
        Ok(Acquired::Local(guard))
    }

    pub async fn hit_rate(
        &self,
        rate: Rate,
        key: ClientKey,
        limit: u32,
        window: Duration,
    ) -> Result<(), Exceeded> {
        if let Some(Live { id, mut connection }) = self.current() {
            let mut call = HIT.prepare_invoke();
            call.key(self.key(rate_name(rate), key))
                .arg(limit)
                .arg(window.as_millis().max(1) as u64);
            match self.within(call.invoke_async::<u8>(&mut connection)).await {
                Ok(0) => return Ok(()),
                Ok(answer) => return Err(Exceeded { first: answer == 2 }),
                Err(err) => self.mark_down(Some(id), &err),
            }
        }
        self.fallback.hit_rate(rate, key, limit, window)
    }

    fn key(&self, what: &str, client: ClientKey) -> String {
        // The braces are a Redis Cluster hash tag: all keys of a client in one slot.
        format!("{}{what}:{{{client}}}", self.settings.key_prefix)
    }

    fn member(&self, slot: u64) -> String {
        format!("{}:{slot}", self.instance)
    }

    fn ttl_ms(&self) -> u64 {
        self.settings.connection_ttl.as_millis() as u64
    }

    fn current(&self) -> Option<Live> {
        self.connection_lock().clone()
    }

    fn connection_lock(&self) -> std::sync::MutexGuard<'_, Option<Live>> {
        self.connection.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn held_lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, String>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn within<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err(format!(
                "no answer within limits.store_timeout ({})",
                humantime::format_duration(self.settings.timeout)
            )),
        }
    }

    async fn open(&self) -> Result<MultiplexedConnection, String> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.settings.timeout))
            .set_response_timeout(Some(self.settings.timeout));
        let mut connection = self
            .within(
                self.client
                    .get_multiplexed_async_connection_with_config(&config),
            )
            .await?;
        let ping = redis::cmd("PING");
        self.within(ping.query_async::<String>(&mut connection))
            .await?;
        Ok(connection)
    }

    fn mark_up(&self) {
        metrics::STORE_UP.set(1);
        if self.state.swap(UP, Ordering::AcqRel) != UP {
            tracing::info!(store = %self.name, "limits store reachable: limits are shared");
        }
    }

    /// Drops connection `failed` (the keeper makes a new one) and logs the first
    /// failure. A failure of a connection already replaced changes nothing.
    fn mark_down(&self, failed: Option<u64>, err: &str) {
        {
            let mut connection = self.connection_lock();
            match (&*connection, failed) {
                (Some(live), Some(failed)) if live.id != failed => return,
                _ => *connection = None,
            }
        }
        metrics::STORE_UP.set(0);
        if self.state.swap(DOWN, Ordering::AcqRel) != DOWN {
            tracing::warn!(
                store = %self.name,
                error = %err,
                "limits store unreachable: counting in this instance's memory until it is back"
            );
        }
        self.reconnect.notify_one();
    }

    /// Asks the keeper to remove the slots released so far and end.
    pub fn finish(&self) {
        self.finishing.notify_one();
    }

    /// Renews the leases of every slot held; false when the store failed.
    async fn renew(&self) -> bool {
        let Some(Live { id, mut connection }) = self.current() else {
            return false;
        };
        let held: Vec<(u64, String)> = self
            .held_lock()
            .iter()
            .map(|(slot, key)| (*slot, key.clone()))
            .collect();
        for batch in held.chunks(RENEW_BATCH) {
            let mut call = RENEW.prepare_invoke();
            call.arg(self.ttl_ms());
            for (slot, key) in batch {
                call.key(key).arg(self.member(*slot));
            }
            if let Err(err) = self.within(call.invoke_async::<u64>(&mut connection)).await {
                self.mark_down(Some(id), &err);
                return false;
            }
        }
        true
    }

    async fn release(&self, key: &str, member: &str) {
        let Some(Live { id, mut connection }) = self.current() else {
            return;
        };
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(key).arg(member);
        if let Err(err) = self.within(zrem.query_async::<u64>(&mut connection)).await {
            self.mark_down(Some(id), &err);
        }
    }
}

/// The keeper: reconnects while the store is down, renews leases, removes released
/// slots. At shutdown, after the drain, it removes what was released and ends (or is
/// aborted; leases not renewed end by themselves).
async fn keep(store: Arc<RedisStore>, mut released: mpsc::UnboundedReceiver<(String, String)>) {
    let mut renew = tokio::time::interval(store.settings.connection_ttl / 3);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if store.current().is_none() {
            if store.connect().await {
                // The store may have restarted empty: put the open slots back at once.
                store.renew().await;
            } else {
                tokio::time::sleep(RECONNECT_EVERY).await;
                continue;
            }
        }
        tokio::select! {
            _ = renew.tick() => {
                store.renew().await;
            }
            message = released.recv() => {
                let Some((key, member)) = message else { return };
                store.release(&key, &member).await;
            }
            _ = store.reconnect.notified() => {}
            _ = store.finishing.notified() => {
                while let Ok((key, member)) = released.try_recv() {
                    store.release(&key, &member).await;
                }
                return;
            }
        }
    }
}

fn rate_name(rate: Rate) -> &'static str {
    match rate {
        Rate::Connections => "rate-conn",
        Rate::Messages => "rate-msg",
        Rate::Recipients => "rate-rcpt",
    }
}

/// Unique per process start: host name, process id and random bits (a restarted
/// instance must not renew the slots of the one before it).
fn instance_id() -> String {
    use ring::rand::SecureRandom;
    let mut random = [0u8; 6];
    let _ = ring::rand::SystemRandom::new().fill(&mut random);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let random: String = random.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{random}", host.trim(), std::process::id())
}
