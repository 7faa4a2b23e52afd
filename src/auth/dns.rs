//! DNS for the authentication checks: one hickory resolver and one shared, bounded,
//! TTL-honouring cache per record type, plugged into mail-auth through its
//! `ResolverCache` trait and built on `moka`.
//!
//! Positive answers (and TXT records that exist but do not parse) live in these caches
//! for their TTL, bounded in bytes (`dns.cache_max_bytes`, each entry weighed by the
//! heap it holds) and in entries (`dns.cache_entries`). An answer that weighs more than
//! [`MAX_ENTRY_BYTES`], or whose size cannot be told, is used but not kept: a hostile
//! zone's 60 KB wildcard TXT must not occupy the cache.
//!
//! hickory's own cache is switched off: it keeps the whole parsed `Message` (authority
//! section included, even for NXDOMAIN) bounded only by a count, and a 64 KB answer over
//! TCP parses into much more than 64 KB, so no count bounds its bytes. Every positive
//! answer mxgate uses is kept here anyway. The price: mail-auth hands only successful
//! look-ups to `ResolverCache::insert`, so negative answers are kept only for the names
//! mxgate looks up itself: the SPF evaluator's TXT (in its own cache), and DKIM and ARC
//! keys and DMARC records (`prefetch`); mail-auth's other NXDOMAINs (iprev, DMARC's
//! organisational domain) go to the name server each time. Parsed DKIM keys, which
//! cannot be weighed, are kept only when `prefetch` fetched them, weighed by their record.

use crate::config::DnsConfig;
use crate::metrics::{LATENCY_BUCKETS, counter_vec, histogram_vec};
use mail_auth::hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use mail_auth::hickory_resolver::net::NetError;
use mail_auth::{MX, MessageAuthenticator, RecordSet, ResolverCache, Txt};
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use std::borrow::Borrow;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
#[cfg(test)]
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

static CACHE_BYTES: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    crate::metrics::gauge_vec(
        "mxgate_dns_cache_bytes",
        "Approximate heap bytes the DNS caches hold, by cache (txt, spf, mx, a, aaaa, ptr); together at most dns.cache_max_bytes.",
        &["cache"],
    )
});

static CACHE_NOT_KEPT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_dns_cache_not_kept_total",
        "DNS answers used but not cached, by cache and reason: too_large (over the per-entry cap) or unweighed (a parsed DKIM key, whose size mail-auth hides).",
        &["cache", "reason"],
    )
});

static CACHE_EVICTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "mxgate_dns_cache_evictions_total",
        "DNS answers evicted before their TTL because a cache reached its share of dns.cache_max_bytes or dns.cache_entries, by cache.",
        &["cache"],
    )
});

pub fn init_metrics() {
    LazyLock::force(&CACHE_REQUESTS);
    LazyLock::force(&LOOKUPS);
    LazyLock::force(&LOOKUP_SECONDS);
    for cache in CACHE_NAMES {
        CACHE_BYTES.with_label_values(&[cache]);
        CACHE_EVICTIONS.with_label_values(&[cache]);
        for reason in ["too_large", "unweighed"] {
            CACHE_NOT_KEPT.with_label_values(&[cache, reason]);
        }
    }
}

const CACHE_NAMES: [&str; 6] = ["txt", "spf", "mx", "a", "aaaa", "ptr"];

/// The heaviest answer a cache keeps. Real SPF, DKIM, DMARC and ARC records are well
/// under a kilobyte (RFC 7208 section 3.4 asks SPF answers to fit 512 octets; a
/// 4096-bit RSA key is 736 octets of base64), and the largest real TXT sets at a zone
/// apex (site verifications) a few kilobytes; 16 KiB leaves room and keeps a
/// hostile 60 KB answer out.
pub const MAX_ENTRY_BYTES: u32 = 16 * 1024;

/// What an entry costs beyond its key and value: moka's node and hash-table slot, the
/// timestamps, the `Timed` wrapper (measured roughly; an overestimate is safe).
const ENTRY_OVERHEAD: usize = 160;

/// What a value parsed from a record holds beyond the record's octets, at most: for a
/// DKIM key, the `Arc` of `Txt::DomainKey`, the `DomainKey`, the boxed key and its
/// vector's header (the key itself is the decoded `p=`, shorter than the record).
const PARSED_OVERHEAD: usize = 128;

/// How long a negative answer (NXDOMAIN, no data) is kept: the SOA minimum of the
/// answer (RFC 2308 section 5), clamped to 30 s .. 1 h as hickory did when it kept them.
pub fn negative_ttl(err: &NetError) -> Duration {
    use mail_auth::hickory_resolver::net::{DnsError, NoRecords};
    let ttl = match err {
        NetError::Dns(DnsError::NoRecordsFound(NoRecords {
            negative_ttl: Some(ttl),
            ..
        })) => u64::from(*ttl),
        _ => 0,
    };
    Duration::from_secs(ttl.clamp(30, 3600))
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
    // Off: see the module comment. Every answer kept is kept by `DnsCaches`, weighed.
    options.cache_size = 0;
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
    /// `max_bytes` and `entries` are shared out between the record types by how much
    /// each is used.
    pub fn new(max_bytes: u64, entries: u64, lookup_timeout: Duration) -> Self {
        // A miss not answered within this time is counted as unanswered.
        let give_up = lookup_timeout * 3 + Duration::from_secs(1);
        let bound = |percent: u64| Bound {
            bytes: (max_bytes * percent / 100).max(u64::from(MAX_ENTRY_BYTES)),
            entries: (entries * percent / 100).max(16),
        };
        DnsCaches {
            txt: TtlCache::new("txt", "txt", bound(35), give_up),
            spf: TtlCache::new("txt", "spf", bound(15), give_up),
            mx: TtlCache::new("mx", "mx", bound(10), give_up),
            ipv4: TtlCache::new("a", "a", bound(20), give_up),
            ipv6: TtlCache::new("aaaa", "aaaa", bound(10), give_up),
            ptr: TtlCache::new("ptr", "ptr", bound(10), give_up),
        }
    }

    /// Approximate heap bytes held by all the caches together.
    pub fn bytes(&self) -> u64 {
        self.txt.bytes()
            + self.spf.bytes()
            + self.mx.bytes()
            + self.ipv4.bytes()
            + self.ipv6.bytes()
            + self.ptr.bytes()
    }

    /// Housekeeping: lets look-ups that never got an answer expire into the
    /// `unanswered` count even when no further look-up touches the caches.
    pub fn run_pending_tasks(&self) {
        self.txt.housekeeping();
        self.mx.housekeeping();
        self.ipv4.housekeeping();
        self.ipv6.housekeeping();
        self.ptr.housekeeping();
        self.spf.housekeeping();
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

/// A cache's share of `dns.cache_max_bytes` and `dns.cache_entries`.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub bytes: u64,
    pub entries: u64,
}

/// Approximate heap bytes a cached key or value holds (its inline size included);
/// `None` when it cannot be told, and then the value is not kept.
pub trait Weigh {
    fn weigh(&self) -> Option<usize>;
}

fn boxed_strs<'a>(items: impl ExactSizeIterator<Item = &'a [u8]>) -> usize {
    items.len() * size_of::<Box<[u8]>>() + items.map(<[u8]>::len).sum::<usize>()
}

impl Weigh for Box<str> {
    fn weigh(&self) -> Option<usize> {
        Some(size_of::<Self>() + self.len())
    }
}

impl Weigh for IpAddr {
    fn weigh(&self) -> Option<usize> {
        Some(size_of::<Self>())
    }
}

impl Weigh for crate::auth::spf::TxtRecords {
    fn weigh(&self) -> Option<usize> {
        Some(size_of::<Self>() + boxed_strs(self.iter().map(|r| &r[..])))
    }
}

impl Weigh for RecordSet<Ipv4Addr> {
    fn weigh(&self) -> Option<usize> {
        Some(size_of::<Self>() + size_of_val(&*self.rrset))
    }
}

impl Weigh for RecordSet<Ipv6Addr> {
    fn weigh(&self) -> Option<usize> {
        Some(size_of::<Self>() + size_of_val(&*self.rrset))
    }
}

impl Weigh for RecordSet<Box<str>> {
    fn weigh(&self) -> Option<usize> {
        Some(size_of::<Self>() + boxed_strs(self.rrset.iter().map(|n| n.as_bytes())))
    }
}

impl Weigh for RecordSet<MX> {
    fn weigh(&self) -> Option<usize> {
        let exchanges = self
            .rrset
            .iter()
            .map(|mx| boxed_strs(mx.exchanges.iter().map(|e| e.as_bytes())))
            .sum::<usize>();
        Some(size_of::<Self>() + size_of_val(&*self.rrset) + exchanges)
    }
}

impl Weigh for Txt {
    fn weigh(&self) -> Option<usize> {
        let inner = match self {
            Txt::Dmarc(dmarc) => {
                let uris = dmarc.rua.iter().chain(dmarc.ruf.iter());
                size_of::<mail_auth::dmarc::Dmarc>()
                    + uris
                        .map(|u| size_of::<mail_auth::dmarc::URI>() + u.uri.capacity())
                        .sum::<usize>()
            }
            Txt::Error(err) => size_of::<mail_auth::Error>() + err.to_string().len(),
            Txt::MtaSts(sts) => size_of::<mail_auth::mta_sts::MtaSts>() + sts.id.capacity(),
            // A DKIM key's bytes sit behind `Box<dyn VerifyingKey>` (an RSA key keeps
            // whatever followed the modulus in `p=`), SPF's parsed terms are nested
            // deeply: their size cannot be told, so they are not kept.
            _ => return None,
        };
        Some(size_of::<Self>() + inner)
    }
}

/// One record type's cache: entries expire at the answer's TTL; weighed in bytes.
pub struct TtlCache<K, V> {
    entries: moka::sync::Cache<K, Timed<V>>,
    /// Misses waiting for their answer, by key hash (for the look-up metrics). The
    /// `Borrow` contract guarantees a key and its borrowed form hash alike, which is
    /// what lets `insert` find the miss that `get` recorded.
    pending: moka::sync::Cache<u64, Instant>,
    kind: &'static str,
    /// The cache's own name in the byte metrics (`spf` shares `txt` with mail-auth's
    /// TXT cache in the look-up metrics).
    name: &'static str,
    /// Every entry weighs at least this (`bytes / entries`), so the byte bound also
    /// keeps the entry count within `dns.cache_entries`.
    floor: u32,
    /// This cache's children of the look-up metrics, made on first use: the vectors'
    /// `with_label_values` costs a hash and a lock on each of the ~6 look-ups per message.
    hits: OnceLock<IntCounter>,
    misses: OnceLock<IntCounter>,
    answered: OnceLock<IntCounter>,
    seconds: OnceLock<Histogram>,
    bytes: IntGauge,
    /// Whether the first answer too large to keep was logged.
    logged_not_kept: AtomicBool,
}

#[derive(Clone)]
pub struct Timed<V> {
    value: V,
    valid_until: Instant,
    weight: u32,
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
    K: Hash + Eq + Send + Sync + Weigh + 'static,
    V: Clone + Send + Sync + Weigh + 'static,
{
    fn new(kind: &'static str, name: &'static str, bound: Bound, give_up: Duration) -> Self {
        let full = AtomicBool::new(false);
        let evictions = CACHE_EVICTIONS.with_label_values(&[name]);
        TtlCache {
            entries: moka::sync::Cache::builder()
                .max_capacity(bound.bytes)
                .weigher(|_, timed: &Timed<V>| timed.weight)
                .expire_after(UntilValid)
                .eviction_listener(move |_, _, cause| {
                    if cause == moka::notification::RemovalCause::Size {
                        evictions.inc();
                        if !full.swap(true, Ordering::Relaxed) {
                            tracing::warn!(
                                cache = name,
                                bytes = bound.bytes,
                                entries = bound.entries,
                                "DNS cache full: answers are evicted before their TTL (dns.cache_max_bytes, dns.cache_entries); logged once"
                            );
                        }
                    }
                })
                .build(),
            pending: moka::sync::Cache::builder()
                .max_capacity(bound.entries.min(10_000))
                .time_to_live(give_up)
                .eviction_listener(move |_, _, cause| {
                    if cause == moka::notification::RemovalCause::Expired {
                        LOOKUPS.with_label_values(&[kind, "unanswered"]).inc();
                    }
                })
                .build(),
            kind,
            name,
            floor: u32::try_from(bound.bytes / bound.entries.max(1)).unwrap_or(u32::MAX),
            hits: OnceLock::new(),
            misses: OnceLock::new(),
            answered: OnceLock::new(),
            seconds: OnceLock::new(),
            bytes: CACHE_BYTES.with_label_values(&[name]),
            logged_not_kept: AtomicBool::new(false),
        }
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// Approximate heap bytes held (the sum of the entries' weights).
    pub fn bytes(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.weighted_size()
    }

    fn housekeeping(&self) {
        self.pending.run_pending_tasks();
        self.entries.run_pending_tasks();
        self.bytes
            .set(i64::try_from(self.entries.weighted_size()).unwrap_or(i64::MAX));
    }

    /// The entry's weight, or why it is not kept.
    fn weight(&self, key: &K, value: Option<usize>) -> Result<u32, &'static str> {
        let (Some(key), Some(value)) = (key.weigh(), value) else {
            return Err("unweighed");
        };
        match u32::try_from(ENTRY_OVERHEAD + key + value) {
            Ok(weight) if weight <= MAX_ENTRY_BYTES => Ok(weight.max(self.floor)),
            _ => Err("too_large"),
        }
    }

    /// Keeps an answer that mxgate looked up itself, weighed by the `received` octets
    /// of its records as well as by its heap when that can be told. A parsed DKIM key
    /// cannot be weighed (mail-auth keeps it behind `Box<dyn VerifyingKey>`), but it
    /// holds no more than the octets of its record plus a couple of small allocations
    /// (the `Arc`, the box, the vector's header), which [`PARSED_OVERHEAD`] covers.
    pub fn insert_received(&self, key: K, value: V, valid_until: Instant, received: usize) {
        let parsed = size_of::<V>() + PARSED_OVERHEAD + received;
        let weight = self.weight(&key, Some(value.weigh().unwrap_or(0).max(parsed)));
        self.keep(key, value, valid_until, weight);
    }

    /// Counts the answer and keeps it if it could be weighed and is not too heavy.
    fn keep(&self, key: K, value: V, valid_until: Instant, weight: Result<u32, &'static str>) {
        self.answered
            .get_or_init(|| LOOKUPS.with_label_values(&[self.kind, "answered"]))
            .inc();
        if let Some(started) = self.pending.remove(&key_hash(&key)) {
            self.seconds
                .get_or_init(|| LOOKUP_SECONDS.with_label_values(&[self.kind]))
                .observe(started.elapsed().as_secs_f64());
        }
        match weight {
            Ok(weight) => {
                self.entries.insert(
                    key,
                    Timed {
                        value,
                        valid_until,
                        weight,
                    },
                );
                self.bytes
                    .set(i64::try_from(self.entries.weighted_size()).unwrap_or(i64::MAX));
            }
            Err(reason) => {
                // A stale answer under this name must not outlive the new one.
                self.entries.invalidate(&key);
                self.not_kept(reason);
            }
        }
    }

    fn not_kept(&self, reason: &'static str) {
        CACHE_NOT_KEPT.with_label_values(&[self.name, reason]).inc();
        if reason == "too_large" && !self.logged_not_kept.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                cache = self.name,
                max_entry_bytes = MAX_ENTRY_BYTES,
                "DNS answer too large to cache: used once, asked again next time; logged once, counted in mxgate_dns_cache_not_kept_total"
            );
        }
    }
}

impl<K, V> ResolverCache<K, V> for TtlCache<K, V>
where
    K: Hash + Eq + Send + Sync + Weigh + 'static,
    V: Clone + Send + Sync + Weigh + 'static,
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
        let weight = self.weight(&key, value.weigh());
        self.keep(key, value, valid_until, weight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::spf::TxtRecords;

    const MIB: u64 = 1024 * 1024;

    fn records(bytes: usize, strings: usize) -> TxtRecords {
        (0..strings)
            .map(|_| vec![b'a'; bytes / strings].into_boxed_slice())
            .collect()
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[test]
    fn caches_hold_their_share_of_the_bytes() {
        let caches = DnsCaches::new(MIB, 50_000, Duration::from_secs(1));
        // 12 KiB answers at 400 names: 4.8 MB offered, the SPF share is 15% of 1 MiB.
        for i in 0..400 {
            let name: Box<str> = format!("n{i}.attacker.test.").into();
            caches.spf.insert(name, records(12 * 1024, 48), later());
        }
        let held = caches.spf.bytes();
        assert!(held <= MIB * 15 / 100, "{held} bytes held");
        assert!(held >= 4 * 12 * 1024, "nothing kept: {held}");
        assert!(
            caches.spf.entry_count() < 20,
            "{}",
            caches.spf.entry_count()
        );
        assert!(caches.bytes() <= MIB);
    }

    #[test]
    fn an_answer_over_the_entry_cap_is_not_kept() {
        let caches = DnsCaches::new(32 * MIB, 50_000, Duration::from_secs(1));
        let huge: Box<str> = "huge.attacker.test.".into();
        caches
            .spf
            .insert(huge.clone(), records(60_000, 240), later());
        assert!(caches.spf.get(&*huge).is_none());
        // Many tiny strings weigh more than their octets: 4,000 one-octet strings are
        // 4 KB of text but 68 KB of boxes.
        let split: Box<str> = "split.attacker.test.".into();
        caches
            .spf
            .insert(split.clone(), records(4_000, 4_000), later());
        assert!(caches.spf.get(&*split).is_none());
        let real: Box<str> = "example.com.".into();
        caches.spf.insert(real.clone(), records(400, 2), later());
        assert!(caches.spf.get(&*real).is_some());
        // A stale entry under a name whose new answer is too large goes too.
        caches
            .spf
            .insert(real.clone(), records(60_000, 240), later());
        assert!(caches.spf.get(&*real).is_none());
    }

    #[test]
    fn the_entry_count_still_bounds_small_answers() {
        // 100 entries in all: the A cache's share is 20.
        let caches = DnsCaches::new(32 * MIB, 100, Duration::from_secs(1));
        for i in 0..500u32 {
            let name: Box<str> = format!("h{i}.example.").into();
            let set = RecordSet {
                rrset: Arc::from([Ipv4Addr::from(i)]),
                dnssec_status: mail_auth::DnssecStatus::Indeterminate,
            };
            caches.ipv4.insert(name, set, later());
        }
        assert!(
            caches.ipv4.entry_count() <= 20,
            "{}",
            caches.ipv4.entry_count()
        );
    }

    #[test]
    fn weights_follow_the_heap() {
        let small = records(100, 1).weigh().unwrap();
        let many_strings = records(100, 100).weigh().unwrap();
        assert!(many_strings >= small + 99 * 16, "{small} {many_strings}");
        let dmarc = |rua: usize| {
            let record = format!(
                "v=DMARC1; p=reject; rua={}",
                (0..rua)
                    .map(|i| format!("mailto:r{i}@example.com"))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let parsed =
                <mail_auth::dmarc::Dmarc as mail_auth::common::parse::TxtRecordParser>::parse(
                    record.as_bytes(),
                )
                .unwrap();
            Txt::from(parsed).weigh().unwrap()
        };
        assert!(dmarc(200) > dmarc(1) + 199 * 20);
        // A DKIM key hides its size: not weighed, so not kept.
        let key = <mail_auth::common::verify::DomainKey as mail_auth::common::parse::TxtRecordParser>::parse(
            b"v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
        )
        .unwrap();
        assert!(Txt::from(key).weigh().is_none());
    }

    #[test]
    fn a_key_is_kept_weighed_by_its_record() {
        let caches = DnsCaches::new(32 * MIB, 50_000, Duration::from_secs(1));
        let record = b"v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
        let key = || {
            <mail_auth::common::verify::DomainKey as mail_auth::common::parse::TxtRecordParser>::parse(record)
                .map(Txt::from)
                .unwrap()
        };
        let name: Box<str> = "s._domainkey.example.com.".into();
        caches
            .txt
            .insert_received(name.clone(), key(), later(), record.len());
        assert!(matches!(caches.txt.get(&*name), Some(Txt::DomainKey(_))));
        // Received over the cap: not kept, and a stale entry goes.
        caches
            .txt
            .insert_received(name.clone(), key(), later(), 20 * 1024);
        assert!(caches.txt.get(&*name).is_none());
    }
}
