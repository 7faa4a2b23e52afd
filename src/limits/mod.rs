//! Per-client budgets (the `limits:` section; Postfix's anvil, `smtpd_junk_command_limit`
//! and `smtpd_min_data_rate` are the models): open connections per client, connection,
//! message and recipient rates per client, junk commands and the minimum data rate per
//! connection. A client is an IPv4 address or an IPv6 prefix ([`ClientKey`]).
//!
//! The [`Limiter`] lives as long as the process (a reload keeps the counts); settings
//! come from the snapshot a connection was accepted with. The session asks a
//! [`ClientBudget`] before it spends: each answer is allowed or the reply to send. Every
//! refusal moves `mxgate_limit_exceeded_total{limit}` and is logged (once per client and
//! window for the counters a flood would repeat). This module decides nothing about mail.
//!
//! The counters live in this process's memory or, with `limits.store: redis://…`, in a
//! store shared by every instance (see `redis.rs`), which falls back to memory whenever
//! the store fails. Junk commands and the data rate are per connection and never shared.
//!
//! Clients in `server.trusted_networks` (our own relays, which may send in bulk) are
//! exempt from the per-minute rates; the connection count, junk commands and the data
//! rate apply to everyone, since they bound what a broken client can hold.

mod data_rate;
mod key;
mod memory;
pub mod metrics;
mod redis;
mod store;

pub use data_rate::DataMeter;
pub use key::ClientKey;
pub use redis::StoreUrl;
pub use store::{ConnectionGuard, Exceeded, Rate, Refused, Store};

use crate::config::{Config, LimitsConfig};
use crate::smtp::metrics as smtp_metrics;
use crate::smtp::reply::Reply;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The window of the `*_per_minute` rates.
const MINUTE: Duration = Duration::from_secs(60);

/// The limits of one snapshot. 0 turns a rate, the junk limit or the data rate off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub ipv6_prefix_length: u8,
    pub max_connections_per_ip: usize,
    pub connections_per_minute: u32,
    pub messages_per_minute: u32,
    pub recipients_per_minute: u32,
    pub max_junk_commands: u32,
    pub min_data_rate: u64,
    /// Before this much time into a message the data rate is not judged.
    pub data_grace: Duration,
    pub max_tracked_clients: usize,
}

impl Settings {
    pub fn from_config(config: &Config) -> Settings {
        let limits = &config.limits;
        Settings {
            ipv6_prefix_length: limits.ipv6_prefix_length,
            max_connections_per_ip: config.server.max_connections_per_ip.get(),
            connections_per_minute: limits.connections_per_minute,
            messages_per_minute: limits.messages_per_minute,
            recipients_per_minute: limits.recipients_per_minute,
            max_junk_commands: limits.max_junk_commands,
            min_data_rate: limits.min_data_rate,
            data_grace: config.server.timeouts.data_block,
            max_tracked_clients: limits.max_tracked_clients.get(),
        }
    }
}

/// The process's counters.
pub struct Limiter {
    store: Store,
}

impl Limiter {
    /// Counts in memory.
    pub fn new(settings: &Settings) -> Arc<Limiter> {
        metrics::STORE_UP.set(1);
        Arc::new(Limiter {
            store: Store::memory(settings.max_tracked_clients),
        })
    }

    /// The limiter for `limits.store` (validated at load). With a shared store: one
    /// attempt to reach it (at most `limits.store_timeout`; a store that is down only
    /// means counting in memory), and the task that keeps it, for the caller to run
    /// in the background.
    pub async fn start(
        settings: &Settings,
        config: &LimitsConfig,
    ) -> (Arc<Limiter>, Option<tokio::task::JoinHandle<()>>) {
        let url = match StoreUrl::parse(&config.store) {
            Ok(StoreUrl::Redis(url)) => url,
            Ok(StoreUrl::Memory) | Err(_) => return (Limiter::new(settings), None),
        };
        let fallback = Arc::new(memory::MemoryStore::new(settings.max_tracked_clients));
        let shared = redis::RedisSettings {
            url,
            timeout: config.store_timeout,
            key_prefix: config.store_key_prefix.clone(),
            connection_ttl: config.store_connection_ttl,
        };
        match redis::RedisStore::new(shared, fallback.clone()) {
            Ok((store, keeper)) => {
                store.connect().await;
                let keeper = tokio::spawn(keeper);
                let limiter = Arc::new(Limiter {
                    store: Store::Redis(store, fallback),
                });
                (limiter, Some(keeper))
            }
            Err(err) => {
                tracing::error!(error = %err, "limits store not usable: counting in memory");
                (Limiter::new(settings), None)
            }
        }
    }

    /// After the drain: gives the store the slots of the last sessions back (at most
    /// about a second; what is left ends with its lease), then stops `keeper`.
    pub async fn finish(&self, mut keeper: tokio::task::JoinHandle<()>) {
        if let Store::Redis(store, _) = &self.store {
            store.finish();
            if tokio::time::timeout(Duration::from_secs(1), &mut keeper)
                .await
                .is_ok()
            {
                return;
            }
        }
        keeper.abort();
    }

    /// A client connected: counts the connection and its rate. `Err` is the reply that
    /// refuses it (the caller sends it and closes).
    pub async fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        trusted: bool,
        settings: Settings,
    ) -> Result<ClientBudget, Reply> {
        self.store.configure(settings.max_tracked_clients);
        let ip = crate::config::canonical_ip(ip);
        let key = ClientKey::of(ip, settings.ipv6_prefix_length);
        let rate_limit = match trusted {
            true => 0,
            false => settings.connections_per_minute,
        };
        let admitted = self
            .store
            .admit(key, settings.max_connections_per_ip, rate_limit, MINUTE)
            .await;
        let guard = match admitted {
            Ok(guard) => guard,
            Err(Refused::Connections(exceeded)) => {
                smtp_metrics::CONNECTIONS_REFUSED
                    .with_label_values(&["per_ip_limit"])
                    .inc();
                refused(
                    exceeded,
                    ip,
                    key,
                    "max_connections_per_ip",
                    settings.max_connections_per_ip as u64,
                );
                return Err(Reply::too_many_connections_from_ip());
            }
            Err(Refused::Rate(exceeded)) => {
                smtp_metrics::CONNECTIONS_REFUSED
                    .with_label_values(&["rate_limit"])
                    .inc();
                refused(
                    exceeded,
                    ip,
                    key,
                    "connections_per_minute",
                    settings.connections_per_minute.into(),
                );
                return Err(Reply::connection_rate_exceeded());
            }
        };
        let budget = ClientBudget {
            limiter: self.clone(),
            ip,
            key,
            exempt: trusted,
            settings,
            junk: 0,
            data: None,
            _connection: guard,
        };
        Ok(budget)
    }
}

/// What one connection may still spend; holds its connection slot until dropped.
pub struct ClientBudget {
    limiter: Arc<Limiter>,
    ip: IpAddr,
    key: ClientKey,
    /// In `server.trusted_networks`: no per-minute rates.
    exempt: bool,
    settings: Settings,
    /// Junk commands since the connection started or a message was last accepted.
    junk: u32,
    /// The message being received, if any.
    data: Option<DataMeter>,
    _connection: ConnectionGuard,
}

impl ClientBudget {
    async fn rate(&self, rate: Rate, limit: u32) -> Result<(), Exceeded> {
        if limit == 0 || self.exempt {
            return Ok(());
        }
        self.limiter
            .store
            .hit_rate(rate, self.key, limit, MINUTE)
            .await
    }

    /// A MAIL command: `Err` is the `450 4.7.1` to answer.
    pub async fn message(&self) -> Result<(), Reply> {
        let limit = self.settings.messages_per_minute;
        self.rate(Rate::Messages, limit).await.map_err(|exceeded| {
            refused(
                exceeded,
                self.ip,
                self.key,
                "messages_per_minute",
                limit.into(),
            );
            Reply::message_rate_exceeded()
        })
    }

    /// A RCPT command: `Err` is the `450 4.7.1` to answer.
    pub async fn recipient(&self) -> Result<(), Reply> {
        let limit = self.settings.recipients_per_minute;
        self.rate(Rate::Recipients, limit)
            .await
            .map_err(|exceeded| {
                refused(
                    exceeded,
                    self.ip,
                    self.key,
                    "recipients_per_minute",
                    limit.into(),
                );
                Reply::recipient_rate_exceeded()
            })
    }

    /// A command that did nothing (NOOP, VRFY, HELP, RSET with no transaction). True
    /// when it is past `max_junk_commands`: the caller counts it as an error.
    pub fn junk_command(&mut self) -> bool {
        let max = self.settings.max_junk_commands;
        if max == 0 {
            return false;
        }
        self.junk = self.junk.saturating_add(1);
        if self.junk <= max {
            return false;
        }
        metrics::exceeded("max_junk_commands");
        if self.junk == max.saturating_add(1) {
            tracing::info!(
                client_ip = %self.ip,
                limit = "max_junk_commands",
                max,
                "limit exceeded: too many commands that do nothing; each further one counts as an error"
            );
        }
        true
    }

    /// A message was accepted: the client is doing real work, junk starts over (as in
    /// Postfix).
    pub fn message_accepted(&mut self) {
        self.junk = 0;
    }

    /// Called before each read: `receiving` says whether the session is inside message
    /// content (DATA or BDAT). Returns when the next read must end for the data rate to
    /// hold (`None`: no such deadline), or the reply that closes a client already below
    /// it.
    pub fn before_read(&mut self, receiving: bool) -> Result<Option<Instant>, Reply> {
        if !receiving {
            self.data = None;
            return Ok(None);
        }
        let now = Instant::now();
        let meter = *self.data.get_or_insert_with(|| DataMeter::start(now));
        let deadline = meter.deadline(self.settings.min_data_rate, self.settings.data_grace);
        match deadline {
            Some(deadline) if now >= deadline => Err(self.data_too_slow()),
            other => Ok(other),
        }
    }

    /// Bytes read while receiving a message.
    pub fn received(&mut self, bytes: usize) {
        if let Some(meter) = &mut self.data {
            meter.add(bytes);
        }
    }

    /// The rate deadline of [`Self::before_read`] passed: the reply that closes.
    pub fn data_too_slow(&mut self) -> Reply {
        let rate = self.data.map_or(0, |m| m.rate(Instant::now()));
        metrics::exceeded("min_data_rate");
        tracing::info!(
            client_ip = %self.ip,
            limit = "min_data_rate",
            max = self.settings.min_data_rate,
            rate,
            "limit exceeded: message data arrives too slowly; closing"
        );
        Reply::data_rate_too_low()
    }
}

/// Counts a refusal and logs the first of a series.
fn refused(exceeded: Exceeded, ip: IpAddr, key: ClientKey, limit: &'static str, max: u64) {
    metrics::exceeded(limit);
    if exceeded.first {
        tracing::info!(client_ip = %ip, client = %key, limit, max, "limit exceeded");
    }
}
