//! The backend's definite answers about recipients, kept for a while so that a recipient
//! is probed once per `ttl_accept` (or `ttl_reject`), not once per message.
//!
//! Only definite answers are kept: a 2xx (accepted) or a 5xx (refused) to RCPT after an
//! accepted MAIL. A 4xx, an error, or a refused MAIL (which is about the sender) is
//! never kept. An acceptance is kept under the recipient exactly as relayed (a
//! differently spelled address is merely a miss; an acceptance that does not hold for
//! another sender costs a `451` at delivery, never a loss). A refusal is kept under the
//! recipient *and the whole envelope* (sender, SIZE, BODY, SMTPUTF8): a backend may
//! refuse a recipient because of the sender or the declared size (a quota, a
//! sender-restricted list), and a client must never make us refuse other senders' mail
//! to that recipient by sending one envelope the backend refuses. The cache is bounded by `max_entries` (least recently used
//! answers go first); a client that makes us probe random addresses can only evict
//! answers, which costs probes, never correctness.

use super::metrics;
use super::{BackendReply, Envelope};
use crate::config::RelayRecipientCache;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub struct RecipientCache {
    entries: moka::sync::Cache<String, Kept>,
    ttl_accept: Duration,
    ttl_reject: Duration,
}

#[derive(Clone)]
struct Kept {
    reply: BackendReply,
    ttl: Duration,
}

struct KeptFor;

impl moka::Expiry<String, Kept> for KeptFor {
    fn expire_after_create(&self, _key: &String, value: &Kept, _at: Instant) -> Option<Duration> {
        Some(value.ttl)
    }
}

impl RecipientCache {
    pub fn new(config: &RelayRecipientCache) -> Self {
        let max_entries = config.max_entries;
        let warned = Arc::new(AtomicBool::new(false));
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_entries)
            .expire_after(KeptFor)
            .eviction_listener(move |_, _, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    metrics::recipient_cache_evicted();
                    if !warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            max_entries,
                            "relay.recipient_cache is full: answers are evicted before they expire (more recipients are probed)"
                        );
                    }
                }
            })
            .build();
        RecipientCache {
            entries,
            ttl_accept: config.ttl_accept,
            ttl_reject: config.ttl_reject,
        }
    }

    /// The kept answer for this recipient under this envelope, if any (counted as a hit
    /// or a miss).
    pub fn get(&self, envelope: &Envelope, rcpt: &str) -> Option<BackendReply> {
        // A refusal under this envelope wins over an acceptance of the recipient.
        let kept = self
            .entries
            .get(&refusal_key(envelope, rcpt))
            .or_else(|| self.entries.get(rcpt))
            .map(|kept| kept.reply);
        metrics::recipient_cache_lookup(kept.is_some());
        kept
    }

    /// Keeps the backend's answer to RCPT under `envelope` if it is a definite one.
    pub fn offer(&self, envelope: &Envelope, rcpt: &str, reply: &BackendReply) {
        let (ttl, key) = match reply.code {
            200..=299 => (self.ttl_accept, rcpt.to_string()),
            500..=599 => (self.ttl_reject, refusal_key(envelope, rcpt)),
            _ => return,
        };
        if ttl.is_zero() {
            return;
        }
        self.entries.insert(
            key,
            Kept {
                reply: reply.clone(),
                ttl,
            },
        );
        metrics::recipient_cache_size(self.entries.entry_count());
    }
}

/// The key of a refusal: the recipient and everything of the envelope the backend saw
/// with it. NUL never occurs in an address, so two envelopes never share a key.
fn refusal_key(envelope: &Envelope, rcpt: &str) -> String {
    format!(
        "{rcpt}\0{}\0{:?}\0{}\0{}",
        envelope.mail_from, envelope.size, envelope.eight_bit, envelope.smtputf8
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::reply::Status;

    fn reply(code: u16) -> BackendReply {
        BackendReply {
            code,
            status: Some(Status((code / 100) as u8, 1, 1)),
            lines: vec![format!("answer {code}")],
        }
    }

    fn envelope(mail_from: &str, size: Option<u64>) -> Envelope {
        Envelope {
            mail_from: mail_from.into(),
            smtputf8: false,
            eight_bit: false,
            size,
        }
    }

    fn alice() -> Envelope {
        envelope("alice@sender.test", None)
    }

    fn cache(ttl_accept: u64, ttl_reject: u64) -> RecipientCache {
        RecipientCache::new(&RelayRecipientCache {
            ttl_accept: Duration::from_millis(ttl_accept),
            ttl_reject: Duration::from_millis(ttl_reject),
            max_entries: 100,
        })
    }

    #[test]
    fn only_definite_answers_are_kept() {
        let cache = cache(60_000, 60_000);
        cache.offer(&alice(), "a@x.test", &reply(250));
        cache.offer(&alice(), "b@x.test", &reply(550));
        cache.offer(&alice(), "c@x.test", &reply(450));
        cache.offer(&alice(), "d@x.test", &reply(421));
        assert_eq!(cache.get(&alice(), "a@x.test"), Some(reply(250)));
        assert_eq!(cache.get(&alice(), "b@x.test"), Some(reply(550)));
        assert_eq!(cache.get(&alice(), "c@x.test"), None);
        assert_eq!(cache.get(&alice(), "d@x.test"), None);
        assert_eq!(
            cache.get(&alice(), "A@x.test"),
            None,
            "the key is the address as relayed"
        );
    }

    #[test]
    fn each_kind_of_answer_expires_at_its_own_ttl() {
        let cache = cache(60_000, 50);
        cache.offer(&alice(), "a@x.test", &reply(250));
        cache.offer(&alice(), "b@x.test", &reply(550));
        std::thread::sleep(Duration::from_millis(120));
        assert!(cache.get(&alice(), "a@x.test").is_some());
        assert!(cache.get(&alice(), "b@x.test").is_none());
    }

    #[test]
    fn a_zero_ttl_keeps_nothing() {
        let cache = cache(0, 0);
        cache.offer(&alice(), "a@x.test", &reply(250));
        cache.offer(&alice(), "b@x.test", &reply(550));
        assert!(cache.get(&alice(), "a@x.test").is_none());
        assert!(cache.get(&alice(), "b@x.test").is_none());
    }

    #[test]
    fn a_full_cache_evicts_and_counts_but_stays_bounded() {
        let cache = cache(60_000, 60_000);
        let evicted_before = super::metrics::CACHE_EVICTIONS.get();
        // A client probing random addresses: ten times what the cache holds.
        for n in 0..1_000 {
            cache.offer(&alice(), &format!("r{n}@x.test"), &reply(250));
        }
        cache.entries.run_pending_tasks();
        let kept = cache.entries.entry_count();
        assert!((1..=100).contains(&kept), "{kept} entries kept");
        assert!(
            super::metrics::CACHE_EVICTIONS.get() >= evicted_before + 800,
            "evictions are counted"
        );
        // Whatever was evicted is only a miss: asked again, never answered wrongly.
        let hits = (0..1_000)
            .filter_map(|n| cache.get(&alice(), &format!("r{n}@x.test")))
            .inspect(|kept| assert_eq!(kept, &reply(250)))
            .count();
        assert!(hits <= 100, "{hits} hits");
    }

    #[test]
    fn a_refusal_is_kept_for_its_envelope_only() {
        let cache = cache(60_000, 60_000);
        let big = envelope("mallory@attacker.test", Some(50_000_000));
        cache.offer(&big, "bob@x.test", &reply(552));
        assert_eq!(cache.get(&big, "bob@x.test"), Some(reply(552)));
        for other in [
            alice(),
            envelope("mallory@attacker.test", None),
            envelope("alice@sender.test", Some(50_000_000)),
        ] {
            assert_eq!(cache.get(&other, "bob@x.test"), None, "{other:?}");
        }
        // An acceptance holds for every envelope (delivery asks again anyway).
        cache.offer(&alice(), "carol@x.test", &reply(250));
        assert_eq!(cache.get(&big, "carol@x.test"), Some(reply(250)));
    }

    #[test]
    fn a_refusal_under_one_envelope_wins_over_an_acceptance() {
        let cache = cache(60_000, 60_000);
        let big = envelope("alice@sender.test", Some(50_000_000));
        // The acceptance came first.
        cache.offer(&alice(), "bob@x.test", &reply(250));
        cache.offer(&big, "bob@x.test", &reply(552));
        assert_eq!(cache.get(&big, "bob@x.test"), Some(reply(552)));
        assert_eq!(cache.get(&alice(), "bob@x.test"), Some(reply(250)));
    }
}
