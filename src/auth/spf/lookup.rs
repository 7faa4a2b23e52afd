//! DNS for the SPF evaluator: the authenticator's hickory resolver (its timeouts and its
//! negative cache) and the shared TTL caches of [`crate::auth::dns`], so SPF and
//! mail-auth's DKIM/DMARC/iprev see one cache. A/AAAA/MX/PTR answers go in the same
//! caches mail-auth fills, under the keys mail-auth uses (lowercase, trailing dot); TXT
//! answers for SPF are kept raw (every record, for the several-records rule) in their
//! own cache, and so are their negative answers (no record: an empty list), since
//! hickory's own cache is off (see [`crate::auth::dns`]).
//!
//! Names are put on the wire label by label, as octets: an expanded macro may hold
//! bytes hickory's text parser refuses (`%`, spaces), and RFC 7208 still looks them up.

use crate::auth::dns::DnsCaches;
use mail_auth::hickory_resolver::TokioResolver;
use mail_auth::hickory_resolver::net::NetError;
use mail_auth::hickory_resolver::proto::rr::{Name, RData};
use mail_auth::{DnssecStatus, MX, RecordSet, ResolverCache};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

/// The TXT records at a name, each with its character-strings joined.
pub type TxtRecords = Arc<[Box<[u8]>]>;

/// Why a look-up gave nothing.
#[derive(Debug)]
pub enum Failure {
    /// NXDOMAIN or no records of the type: a "void lookup" (RFC 7208 section 4.6.4).
    Void,
    /// Timeout, SERVFAIL, a response that does not parse: temperror.
    Error(String),
}

pub struct Dns<'a> {
    pub resolver: &'a TokioResolver,
    pub caches: &'a DnsCaches,
}

/// The name as DNS labels (no trailing dot); `None` when it cannot be a DNS name: an
/// empty label or one over 63 octets. Over 253 octets, labels are taken off the left
/// (RFC 7208 section 7.3).
pub fn query_name(expanded: &str) -> Option<&str> {
    let mut name = expanded.strip_suffix('.').unwrap_or(expanded);
    while name.len() > 253 {
        name = name.split_once('.')?.1;
    }
    (!name.is_empty() && name.split('.').all(|l| !l.is_empty() && l.len() <= 63)).then_some(name)
}

/// Where a name came from: a macro expansion (raw octets between the dots) or a DNS
/// answer (MX exchange, PTR name: hickory's text form, where odd octets are escaped).
#[derive(Clone, Copy)]
pub enum Source {
    Expanded,
    Answer,
}

fn wire_name(name: &str, source: Source) -> Result<Name, Failure> {
    match source {
        Source::Expanded => Name::from_labels(name.split('.').map(str::as_bytes)),
        Source::Answer => Name::from_labels(unescape(name)),
    }
    .map_err(|e| Failure::Error(format!("cannot query {name:?}: {e}")))
}

/// The labels of a name in hickory's text form (`Label::write_ascii`): `\X` is the
/// octet X, `\DDD` an octal octet; its own parser refuses some of what it writes
/// (`foo\:bar`), so the escapes are undone here.
fn unescape(name: &str) -> Vec<Vec<u8>> {
    let bytes = name.as_bytes();
    let mut labels = vec![Vec::new()];
    let mut i = 0;
    while i < bytes.len() {
        let label = labels.last_mut().expect("never empty");
        match bytes[i] {
            b'\\'
                if i + 3 < bytes.len()
                    && bytes[i + 1..i + 4]
                        .iter()
                        .all(|b| (b'0'..=b'7').contains(b)) =>
            {
                let value = bytes[i + 1..i + 4]
                    .iter()
                    .fold(0u16, |n, d| n * 8 + u16::from(d - b'0'));
                label.push(value as u8);
                i += 4;
            }
            b'\\' if i + 1 < bytes.len() => {
                label.push(bytes[i + 1]);
                i += 2;
            }
            b'.' => {
                labels.push(Vec::new());
                i += 1;
            }
            byte => {
                label.push(byte);
                i += 1;
            }
        }
    }
    labels
}

fn cache_key(name: &str) -> Box<str> {
    let mut key = String::with_capacity(name.len() + 1);
    key.push_str(name);
    key.make_ascii_lowercase();
    key.push('.');
    key.into_boxed_str()
}

fn failure(name: &str, err: NetError) -> Failure {
    if err.is_no_records_found() {
        Failure::Void
    } else {
        Failure::Error(format!("DNS look-up of {name} failed: {err}"))
    }
}

impl Dns<'_> {
    pub async fn txt(&self, name: &str) -> Result<TxtRecords, Failure> {
        let key = cache_key(name);
        if let Some(records) = self.caches.spf.get(&*key) {
            return if records.is_empty() {
                Err(Failure::Void)
            } else {
                Ok(records)
            };
        }
        let lookup = match self
            .resolver
            .txt_lookup(wire_name(name, Source::Expanded)?)
            .await
        {
            Ok(lookup) => lookup,
            Err(err) => {
                if err.is_no_records_found() {
                    let until = std::time::Instant::now() + crate::auth::dns::negative_ttl(&err);
                    self.caches.spf.insert(key, Arc::new([]), until);
                }
                return Err(failure(name, err));
            }
        };
        let records: TxtRecords = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(txt) => Some(txt.txt_data.concat().into_boxed_slice()),
                _ => None,
            })
            .collect();
        self.caches
            .spf
            .insert(key, records.clone(), lookup.valid_until());
        if records.is_empty() {
            return Err(Failure::Void);
        }
        Ok(records)
    }

    pub async fn a(&self, name: &str, source: Source) -> Result<Arc<[Ipv4Addr]>, Failure> {
        let key = cache_key(name);
        if let Some(set) = self.caches.ipv4.get(&*key) {
            return non_empty(set.rrset);
        }
        let lookup = self
            .resolver
            .ipv4_lookup(wire_name(name, source)?)
            .await
            .map_err(|e| failure(name, e))?;
        let found: Arc<[Ipv4Addr]> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        self.caches
            .ipv4
            .insert(key, record_set(found.clone()), lookup.valid_until());
        non_empty(found)
    }

    pub async fn aaaa(&self, name: &str, source: Source) -> Result<Arc<[Ipv6Addr]>, Failure> {
        let key = cache_key(name);
        if let Some(set) = self.caches.ipv6.get(&*key) {
            return non_empty(set.rrset);
        }
        let lookup = self
            .resolver
            .ipv6_lookup(wire_name(name, source)?)
            .await
            .map_err(|e| failure(name, e))?;
        let found: Arc<[Ipv6Addr]> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::AAAA(a) => Some(a.0),
                _ => None,
            })
            .collect();
        self.caches
            .ipv6
            .insert(key, record_set(found.clone()), lookup.valid_until());
        non_empty(found)
    }

    /// Whether `name` has an address of `ip`'s family equal to `ip` under `prefix`.
    pub async fn address_matches(
        &self,
        name: &str,
        source: Source,
        ip: IpAddr,
        prefix: u8,
    ) -> Result<bool, Failure> {
        Ok(match ip {
            IpAddr::V4(ip) => self
                .a(name, source)
                .await?
                .iter()
                .any(|a| super::in_network4(ip, *a, prefix)),
            IpAddr::V6(ip) => self
                .aaaa(name, source)
                .await?
                .iter()
                .any(|a| super::in_network6(ip, *a, prefix)),
        })
    }

    /// The exchanges, in preference order (lowercase, no trailing dot; a null MX is
    /// an empty name).
    pub async fn mx(&self, name: &str) -> Result<Vec<Box<str>>, Failure> {
        let key = cache_key(name);
        let set = match self.caches.mx.get(&*key) {
            Some(set) => set,
            None => {
                let lookup = self
                    .resolver
                    .mx_lookup(wire_name(name, Source::Expanded)?)
                    .await
                    .map_err(|e| failure(name, e))?;
                // Grouped by preference as mail-auth stores them, for the shared cache.
                let mut groups: Vec<(u16, Vec<Box<str>>)> = Vec::new();
                for record in lookup.answers() {
                    let RData::MX(mx) = &record.data else {
                        continue;
                    };
                    let exchange = mx.exchange.to_lowercase().to_ascii().into_boxed_str();
                    match groups.iter_mut().find(|g| g.0 == mx.preference) {
                        Some(group) => group.1.push(exchange),
                        None => groups.push((mx.preference, vec![exchange])),
                    }
                }
                groups.sort_unstable_by_key(|g| g.0);
                let set = RecordSet {
                    rrset: groups
                        .into_iter()
                        .map(|(preference, exchanges)| MX {
                            preference,
                            exchanges: exchanges.into_boxed_slice(),
                        })
                        .collect(),
                    dnssec_status: DnssecStatus::Indeterminate,
                };
                self.caches
                    .mx
                    .insert(key, set.clone(), lookup.valid_until());
                set
            }
        };
        if set.rrset.is_empty() {
            return Err(Failure::Void);
        }
        let names: Vec<Box<str>> = set
            .rrset
            .iter()
            .flat_map(|mx| mx.exchanges.iter())
            .map(|e| e.trim_end_matches('.').into())
            .collect();
        if names.is_empty() {
            return Err(Failure::Void);
        }
        Ok(names)
    }

    /// PTR names of `ip` (lowercase, no trailing dot).
    pub async fn ptr(&self, ip: IpAddr) -> Result<Vec<Box<str>>, Failure> {
        let set = match self.caches.ptr.get(&ip) {
            Some(set) => set,
            None => {
                let lookup = self
                    .resolver
                    .reverse_lookup(ip)
                    .await
                    .map_err(|e| failure(&ip.to_string(), e))?;
                let names: Arc<[Box<str>]> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::PTR(ptr) if !ptr.is_empty() => {
                            Some(ptr.to_lowercase().to_ascii().into_boxed_str())
                        }
                        _ => None,
                    })
                    .collect();
                let set = record_set(names);
                self.caches
                    .ptr
                    .insert(ip, set.clone(), lookup.valid_until());
                set
            }
        };
        let names: Vec<Box<str>> = set
            .rrset
            .iter()
            .map(|n| n.trim_end_matches('.').into())
            .collect();
        if names.is_empty() {
            return Err(Failure::Void);
        }
        Ok(names)
    }
}

fn record_set<T>(rrset: Arc<[T]>) -> RecordSet<T> {
    RecordSet {
        rrset,
        dnssec_status: DnssecStatus::Indeterminate,
    }
}

fn non_empty<T>(found: Arc<[T]>) -> Result<Arc<[T]>, Failure> {
    if found.is_empty() {
        Err(Failure::Void)
    } else {
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_expansions() {
        assert_eq!(query_name("example.com."), Some("example.com"));
        assert_eq!(query_name("a..example.com"), None);
        assert_eq!(query_name(""), None);
        assert_eq!(query_name(&format!("{}.example.com", "a".repeat(64))), None);
        // Over 253 octets: labels come off the left until it fits (RFC 7208 7.3).
        let long = format!("{}example.com", "abcdefghi.".repeat(30));
        let fitted = query_name(&long).unwrap();
        assert!(fitted.len() <= 253 && fitted.ends_with("abcdefghi.example.com"));
        assert!(long.ends_with(fitted));
    }

    #[test]
    fn names_from_answers_are_unescaped() {
        assert_eq!(
            unescape(r"foo\:bar\/baz.example.com"),
            vec![
                b"foo:bar/baz".to_vec(),
                b"example".to_vec(),
                b"com".to_vec()
            ]
        );
        assert_eq!(unescape(r"a\.b.c"), vec![b"a.b".to_vec(), b"c".to_vec()]);
        assert_eq!(unescape(r"x\040y.c"), vec![b"x y".to_vec(), b"c".to_vec()]);
    }
}
