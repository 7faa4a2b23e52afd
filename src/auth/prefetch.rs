//! Look-ups made before mail-auth's checks, so that what they find is kept in the
//! weighed TXT cache: DKIM and ARC keys (mail-auth's own look-up hands the cache a
//! parsed key whose size cannot be told, so the cache refuses it) and DMARC records
//! (started while DKIM runs). Each look-up builds exactly the `Txt` value mail-auth's
//! `txt_lookup` would build, under the key it would use, and weighs it by the octets
//! received; mail-auth then finds it in the cache.
//!
//! Only the keys mail-auth is going to ask for are fetched: the DKIM signatures that
//! `bounded` verifies and that are neither expired nor failing their body hash, and an
//! ARC chain's keys only when mail-auth gets as far as looking one up. This module does
//! not decide anything: a look-up that fails or times out leaves the name to mail-auth,
//! which asks again and reports what it finds.
//!
//! Negative answers (NXDOMAIN, no data) are kept as mail-auth would see them had it
//! kept them itself (`Txt::Error` of the same error), for the SOA minimum; other
//! failures are not kept. An answer over [`super::dns::MAX_ENTRY_BYTES`] is not kept
//! either, and mail-auth looks it up again (two look-ups for such a key).

use super::Authenticator;
use super::bounded::join_all;
use crate::findings::FromHeader;
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::resolver::ToFqdn;
use mail_auth::common::verify::{DomainKey, VerifySignature};
use mail_auth::hickory_resolver::proto::rr::{Name, RData};
use mail_auth::{AuthenticatedMessage, DnsError, Error, ResolverCache, Txt};
use std::time::{Instant, SystemTime};

/// The most author domains whose DMARC record is fetched ahead.
const DMARC_DOMAINS: usize = 4;

impl Authenticator {
    /// Fetches the keys of `names` (from [`dkim_key_names`] and [`arc_key_names`]), all
    /// at once; the caller bounds it with the message's deadline.
    pub(super) async fn prefetch_keys(&self, mut names: Vec<String>) {
        names.sort_unstable();
        names.dedup();
        let lookups = names
            .into_iter()
            .map(|name| self.prefetch_txt::<DomainKey>(name));
        join_all(lookups.collect()).await;
    }

    /// Starts the DMARC record look-ups while DKIM runs, so that DMARC's evaluation
    /// after DKIM finds them in the cache. Errors are left for that evaluation to see.
    pub(super) async fn prefetch_dmarc(&self, from: &FromHeader, deadline: tokio::time::Instant) {
        let wanted = if from.too_many_domains() {
            0
        } else {
            DMARC_DOMAINS
        };
        let mut names: Vec<String> = (from.domains.iter().take(wanted))
            .flat_map(|domain| dmarc_walk(domain))
            .collect();
        names.sort_unstable();
        names.dedup();
        let lookups = names
            .into_iter()
            .map(|name| self.prefetch_txt::<mail_auth::dmarc::Dmarc>(name));
        let _ = tokio::time::timeout_at(deadline, join_all(lookups.collect())).await;
    }

    /// mail-auth's `txt_lookup::<T>` (mail-auth 0.13, `common/resolver.rs`), keeping
    /// what it finds weighed by the octets received.
    async fn prefetch_txt<T: TxtRecordParser + Into<Txt>>(&self, name: String) {
        let key = name.to_fqdn().into_owned().into_boxed_str();
        let cache = &self.caches.txt;
        if cache.get(&*key).is_some() {
            return;
        }
        let Ok(query) = Name::from_str_relaxed(&*key) else {
            // mail-auth fails the same way, without a look-up.
            return;
        };
        let lookup = match self.resolver.resolver().txt_lookup(query).await {
            Ok(lookup) => lookup,
            Err(err) if err.is_no_records_found() => {
                let until = Instant::now() + super::dns::negative_ttl(&err);
                cache.insert(key, Txt::Error(Error::from(err)), until);
                return;
            }
            // Timeouts, SERVFAIL: not kept; mail-auth asks and reports the temperror.
            Err(_) => return,
        };
        // A record's character-strings joined; records without any skipped.
        let records: Vec<Vec<u8>> = lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::TXT(txt) if !txt.txt_data.is_empty() => Some(txt.txt_data.concat()),
                _ => None,
            })
            .collect();
        let received = records.iter().map(Vec::len).sum();
        // The first record that parses; else the last error (none: InvalidRecordType).
        let mut result = Err(Error::Dns(DnsError::InvalidRecordType));
        for record in &records {
            result = T::parse(record);
            if result.is_ok() {
                break;
            }
        }
        cache.insert_received(key, Txt::from(result), lookup.valid_until(), received);
    }
}

/// The names mail-auth 0.13's DMARC tree walk (RFC 9989 4.10.1, `dmarc_tree_walk`)
/// asks for `domain`: the domain itself, then (from 8 labels, 7 first) one label fewer
/// at a time down to the top-level domain. Most are absent; their negative answers are
/// kept too, or every message would ask the name server for `_dmarc.<tld>`. (The walk
/// stops early at a `psd=` record: a name past it is fetched for nothing.)
fn dmarc_walk(domain: &str) -> Vec<String> {
    let labels: Vec<&str> = domain.split('.').filter(|l| !l.is_empty()).collect();
    let total = labels.len();
    let mut names = Vec::new();
    if total < 2 {
        return names;
    }
    let mut count = total;
    loop {
        names.push(format!("_dmarc.{}.", labels[total - count..].join(".")));
        if count == 1 {
            break;
        }
        count = if count >= 8 { 7 } else { count - 1 };
    }
    names
}

/// Whether mail-auth looks up the key of a signature with these tags: it does not when
/// the signature has expired or the body hash does not match (mail-auth 0.13,
/// `dkim/verify.rs` and `arc/verify.rs`, the same two tests).
fn key_wanted(
    message: &AuthenticatedMessage<'_>,
    (x, t): (u64, u64),
    body: (
        mail_auth::dkim::Canonicalization,
        mail_auth::common::crypto::Algorithm,
        u64,
    ),
    bh: &[u8],
) -> bool {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (canonicalization, algorithm, length) = body;
    let hash = mail_auth::common::crypto::HashAlgorithm::from(algorithm);
    (x == 0 || (x > t && x > now))
        && message
            .body_hashes
            .iter()
            .find(|(c, h, l, _)| *c == canonicalization && *h == hash && *l == length)
            .is_some_and(|found| found.3 == bh)
}

/// The key names of the DKIM signatures that will be verified and whose key mail-auth
/// will ask for.
pub(super) fn dkim_key_names<'a>(
    message: &AuthenticatedMessage<'_>,
    signatures: impl Iterator<Item = &'a mail_auth::dkim::Signature>,
) -> Vec<String> {
    signatures
        .filter(|s| key_wanted(message, (s.x, s.t), (s.cb, s.a, s.l), &s.bh))
        .map(VerifySignature::domain_key)
        .collect()
}

/// The key names of an ARC chain: the last ARC-Message-Signature's and every
/// ARC-Seal's, when mail-auth's `verify_arc` gets as far as its first look-up (the
/// chain is whole, numbered from 1 with the right cv=, and the last signature is
/// current and matches the body); none otherwise. mail-auth stops at the first key
/// that does not verify, so a chain that fails part way may have keys fetched that it
/// never asks for: at most the 50 sets' seals, which a chain that passes costs anyway.
pub(super) fn arc_key_names(message: &AuthenticatedMessage<'_>) -> Vec<String> {
    use mail_auth::arc::ChainValidation;
    let sets = message.ams_headers.len();
    if message.has_arc_errors
        || sets == 0
        || sets > 50
        || sets != message.as_headers.len()
        || sets != message.aar_headers.len()
    {
        return Vec::new();
    }
    let whole = message
        .as_headers
        .iter()
        .zip(&message.ams_headers)
        .zip(&message.aar_headers)
        .enumerate()
        .all(|(pos, ((seal, signature), results))| {
            let instance = pos as u32 + 1;
            let cv = if pos == 0 {
                ChainValidation::None
            } else {
                ChainValidation::Pass
            };
            seal.header.i == instance
                && signature.header.i == instance
                && results.header.i == instance
                && seal.header.cv == cv
        });
    let last = &message.ams_headers[sets - 1].header;
    if !whole
        || !key_wanted(
            message,
            (last.x, last.t),
            (last.cb, last.a, last.l),
            &last.bh,
        )
    {
        return Vec::new();
    }
    std::iter::once(last.domain_key())
        .chain(message.as_headers.iter().map(|s| s.header.domain_key()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::dmarc_walk;

    #[test]
    fn the_dmarc_walk_is_mail_auths() {
        assert_eq!(dmarc_walk("s1.test"), ["_dmarc.s1.test.", "_dmarc.test."]);
        assert_eq!(
            dmarc_walk("a.b.example.com"),
            [
                "_dmarc.a.b.example.com.",
                "_dmarc.b.example.com.",
                "_dmarc.example.com.",
                "_dmarc.com."
            ]
        );
        let deep = dmarc_walk("1.2.3.4.5.6.7.8.9.example");
        assert_eq!(deep[0], "_dmarc.1.2.3.4.5.6.7.8.9.example.");
        assert_eq!(deep[1], "_dmarc.4.5.6.7.8.9.example.");
        assert_eq!(deep.len(), 8);
        assert!(dmarc_walk("localhost").is_empty());
    }
}
