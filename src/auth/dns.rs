//! DNS for the authentication checks: one hickory resolver and one shared, bounded,
//! TTL-honouring cache per record type, plugged into mail-auth through its
//! `ResolverCache` trait and built on `moka`.
//!
//! Positive answers (and TXT records that exist but do not parse) live in these caches
//! for their TTL. Negative answers (NXDOMAIN, NODATA) are cached by hickory's own cache
//! with the SOA minimum as TTL (clamped to 30 s .. 1 h), because mail-auth only hands
//! successful lookups to `ResolverCache::insert`. Both caches are bounded by
//! `dns.cache_entries`.

use crate::config::DnsConfig;
use crate::metrics::{LATENCY_BUCKETS, counter_vec, histogram_vec};
use mail_auth::hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use mail_auth::{MX, MessageAuthenticator, RecordSet, ResolverCache, Txt};
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec};
use std::borrow::Borrow;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, Instant};

static CACHE_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_dns_cache_requests_total",
        "DNS cache look-ups by record type and result (hit, miss).",
        &["type", "result"],
    )
});

static LOOKUPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_dns_lookups_total",
        "DNS look-ups that missed the cache, by record type and result: answered (a record came back) or unanswered (NXDOMAIN, no data, SERVFAIL or timeout).",
        &["type", "result"],
    )
});

static LOOKUP_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "mxgate_dns_lookup_duration_seconds",
        "Time from cache miss to answer, for answered DNS look-ups, by record type.",
        &["type"],
        LATENCY_BUCKETS,
    )
});

pub fn init_metrics() {
    LazyLock::force(&CACHE_REQUESTS);
    LazyLock::force(&LOOKUPS);
    LazyLock::force(&LOOKUP_SECONDS);
}

/// Longest time any answer is kept, whatever its TTL says.
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// Builds the resolver from `dns:`. Without `nameservers` and without a readable
/// system configuration the resolver has no servers: every look-up fails, checks give
/// temperror and untrusted mail is deferred (451), which is safe; the warning says why.
pub fn resolver(config: &DnsConfig) -> Result<(MessageAuthenticator, Option<String>), String> {
    let mut warning = None;
    let (resolver_config, mut options) = match &config.nameservers {
        Some(servers) => {
            let name_servers = servers
                .iter()
                .map(|addr| {
                    let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                    for connection in &mut ns.connections {
                        connection.port = addr.port();
                    }
                    ns
                })
                .collect();
            (
                ResolverConfig::from_name_servers(name_servers),
                ResolverOpts::default(),
            )
        }
        None => match mail_auth::hickory_resolver::system_conf::read_system_conf() {
            Ok(system) => system,
            Err(err) => {
                warning = Some(format!(
                    "cannot read the system resolver configuration ({err}); set dns.nameservers, or untrusted senders will be deferred"
                ));
                (
                    ResolverConfig::from_name_servers(Vec::new()),
                    ResolverOpts::default(),
                )
            }
        },
    };
    options.timeout = config.timeout;
    options.attempts = config.attempts.get();
    options.cache_size = config.cache_entries.get();
    options.positive_max_ttl = Some(MAX_TTL);
    options.negative_min_ttl = Some(Duration::from_secs(30));
    options.negative_max_ttl = Some(Duration::from_secs(3600));
    // Authentication must ask the DNS, not /etc/hosts.
    options.use_hosts_file = ResolveHosts::Never;
    // mail-auth resolves SPF's `exists:` through the generic address lookup, which
    // RFC 7208 section 5.7 restricts to A records.
    options.ip_strategy = LookupIpStrategy::Ipv4Only;
    MessageAuthenticator::new(resolver_config, options)
        .map(|resolver| (resolver, warning))
        .map_err(|e| format!("cannot build the DNS resolver: {e}"))
}

/// mail-auth's check parameters with our caches plugged in.
pub type CachedParameters<'a, P> = mail_auth::Parameters<
    'a,
    P,
    TtlCache<Box<str>, Txt>,
    TtlCache<Box<str>, RecordSet<MX>>,
    TtlCache<Box<str>, RecordSet<Ipv4Addr>>,
    TtlCache<Box<str>, RecordSet<Ipv6Addr>>,
    TtlCache<IpAddr, RecordSet<Box<str>>>,
>;

/// The caches handed to mail-auth with every check.
pub struct DnsCaches {
    pub txt: TtlCache<Box<str>, Txt>,
    pub mx: TtlCache<Box<str>, RecordSet<MX>>,
    pub ipv4: TtlCache<Box<str>, RecordSet<Ipv4Addr>>,
    pub ipv6: TtlCache<Box<str>, RecordSet<Ipv6Addr>>,
    pub ptr: TtlCache<IpAddr, RecordSet<Box<str>>>,
    /// Every TXT record at a name, raw, for the SPF evaluator (it must see them all to
    /// refuse several `v=spf1` records); counted as `txt` in the metrics.
    pub spf: TtlCache<Box<str>, crate::auth::spf::TxtRecords>,
}

impl DnsCaches {
    /// `entries` is shared out between the record types by how much each is used.
    pub fn new(entries: u64, lookup_timeout: Duration) -> Self {
        let share = |percent: u64| (entries * percent / 100).max(16);
        // A miss not answered within this time is counted as unanswered.
        let give_up = lookup_timeout * 3 + Duration::from_secs(1);
        DnsCaches {
            txt: TtlCache::new("txt", share(35), give_up),
            spf: TtlCache::new("txt", share(15), give_up),
            mx: TtlCache::new("mx", share(10), give_up),
            ipv4: TtlCache::new("a", share(20), give_up),
            ipv6: TtlCache::new("aaaa", share(10), give_up),
            ptr: TtlCache::new("ptr", share(10), give_up),
        }
    }

    /// Housekeeping: lets look-ups that never got an answer expire into the
    /// `unanswered` count even when no further look-up touches the caches.
    pub fn run_pending_tasks(&self) {
        self.txt.pending.run_pending_tasks();
        self.mx.pending.run_pending_tasks();
        self.ipv4.pending.run_pending_tasks();
        self.ipv6.pending.run_pending_tasks();
        self.ptr.pending.run_pending_tasks();
        self.spf.pending.run_pending_tasks();
    }

    /// mail-auth's parameter bundle for one check.
    pub fn parameters<P>(&self, params: P) -> CachedParameters<'_, P> {
        mail_auth::Parameters {
            params,
            cache_txt: Some(&self.txt),
            cache_mx: Some(&self.mx),
            cache_ptr: Some(&self.ptr),
            cache_ipv4: Some(&self.ipv4),
            cache_ipv6: Some(&self.ipv6),
        }
    }
}

/// One record type's cache: entries expire at the answer's TTL.
pub struct TtlCache<K, V> {
    entries: moka::sync::Cache<K, Timed<V>>,
    /// Misses waiting for their answer, by key hash (for the look-up metrics). The
    /// `Borrow` contract guarantees a key and its borrowed form hash alike, which is
    /// what lets `insert` find the miss that `get` recorded.
    pending: moka::sync::Cache<u64, Instant>,
    kind: &'static str,
    /// This cache's children of the look-up metrics, made on first use: the vectors'
    /// `with_label_values` costs a hash and a lock on each of the ~6 look-ups per message.
    hits: OnceLock<IntCounter>,
    misses: OnceLock<IntCounter>,
    answered: OnceLock<IntCounter>,
    seconds: OnceLock<Histogram>,
}

#[derive(Clone)]
pub struct Timed<V> {
    value: V,
    valid_until: Instant,
}

struct UntilValid;

impl<K, V> moka::Expiry<K, Timed<V>> for UntilValid {
    fn expire_after_create(
        &self,
        _key: &K,
        value: &Timed<V>,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(
            value
                .valid_until
                .saturating_duration_since(created_at)
                .min(MAX_TTL),
        )
    }
}

fn key_hash<T: Hash + ?Sized>(key: &T) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(key)
}

impl<K, V> TtlCache<K, V>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn new(kind: &'static str, capacity: u64, give_up: Duration) -> Self {
        TtlCache {
            entries: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .expire_after(UntilValid)
                .build(),
            pending: moka::sync::Cache::builder()
                .max_capacity(capacity.min(10_000))
                .time_to_live(give_up)
                .eviction_listener(move |_, _, cause| {
                    if cause == moka::notification::RemovalCause::Expired {
                        LOOKUPS.with_label_values(&[kind, "unanswered"]).inc();
                    }
                })
                .build(),
            kind,
            hits: OnceLock::new(),
            misses: OnceLock::new(),
            answered: OnceLock::new(),
            seconds: OnceLock::new(),
        }
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }
}

impl<K, V> ResolverCache<K, V> for TtlCache<K, V>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.entries.get(name) {
            Some(timed) if timed.valid_until > Instant::now() => {
                self.hits
                    .get_or_init(|| CACHE_REQUESTS.with_label_values(&[self.kind, "hit"]))
                    .inc();
                Some(timed.value)
            }
            _ => {
                self.misses
                    .get_or_init(|| CACHE_REQUESTS.with_label_values(&[self.kind, "miss"]))
                    .inc();
                self.pending.insert(key_hash(name), Instant::now());
                None
            }
        }
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.remove(name).map(|timed| timed.value)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        self.answered
            .get_or_init(|| LOOKUPS.with_label_values(&[self.kind, "answered"]))
            .inc();
        if let Some(started) = self.pending.remove(&key_hash(&key)) {
            self.seconds
                .get_or_init(|| LOOKUP_SECONDS.with_label_values(&[self.kind]))
                .observe(started.elapsed().as_secs_f64());
        }
        self.entries.insert(key, Timed { value, valid_until });
    }
}
