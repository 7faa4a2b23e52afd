//! SPF exactly per RFC 7208: `check_host()` over the authenticator's resolver and
//! shared DNS cache. Used for the HELO and MAIL FROM identities, the policy's
//! `spf_record` condition and `mxgate check`.
//!
//! Contract: the result is one of the seven RFC 8601 words; `permerror` and `temperror`
//! always carry an [`SpfError`] whose kind is from a closed set (a metric label) and
//! whose text tells a sender's admin what to fix. Bounds (section 4.6.4): 10 terms that
//! query the DNS (`include`, `a`, `mx`, `ptr`, `exists`, `redirect`), 2 void look-ups,
//! 10 MX exchanges per `mx`, the first 10 PTR names; each look-up is bounded by the
//! resolver's timeout and attempts. Nothing here decides about a message.

mod lookup;
pub mod macros;
pub mod record;

use super::dns::DnsCaches;
use crate::findings::AuthResult;
pub(crate) use lookup::Dns;
pub use lookup::TxtRecords;
use lookup::{Failure, Source, query_name};
use macros::{Context, Values};
use mail_auth::hickory_resolver::TokioResolver;
use record::{DomainSpec, Mechanism, Qualifier, Record};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::Pin;

/// Terms that query the DNS, per evaluation (section 4.6.4).
const MAX_DNS_TERMS: u32 = 10;
/// Look-ups that found nothing (NXDOMAIN or no answer), per evaluation.
const MAX_VOID_LOOKUPS: u32 = 2;
/// MX exchanges and PTR names looked at per mechanism.
const MAX_NAMES: usize = 10;

/// Why a check gave permerror or temperror: a closed set, for the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpfErrorKind {
    /// More than one `v=spf1` record at a name (section 4.5).
    MultipleRecords,
    /// A record that does not follow the ABNF, or an `exp=`/`redirect=` given twice.
    Syntax,
    /// More than 10 DNS-querying terms, or more than 10 MX exchanges.
    LookupLimit,
    /// More than 2 look-ups that found nothing.
    VoidLookupLimit,
    /// An `include:` target without an SPF record.
    IncludeNone,
    /// A `redirect=` target without an SPF record.
    RedirectNone,
    /// An `include:`/`redirect=` target that is not a domain name after expansion.
    InvalidDomain,
    /// A DNS look-up that timed out or failed (temperror).
    Dns,
    /// The whole evaluation took longer than `auth.timeouts.spf` (temperror, RFC 7208
    /// section 4.6.4).
    Timeout,
}

impl SpfErrorKind {
    pub const ALL: [SpfErrorKind; 9] = [
        SpfErrorKind::MultipleRecords,
        SpfErrorKind::Syntax,
        SpfErrorKind::LookupLimit,
        SpfErrorKind::VoidLookupLimit,
        SpfErrorKind::IncludeNone,
        SpfErrorKind::RedirectNone,
        SpfErrorKind::InvalidDomain,
        SpfErrorKind::Dns,
        SpfErrorKind::Timeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            SpfErrorKind::MultipleRecords => "multiple_records",
            SpfErrorKind::Syntax => "syntax",
            SpfErrorKind::LookupLimit => "lookup_limit",
            SpfErrorKind::VoidLookupLimit => "void_lookup_limit",
            SpfErrorKind::IncludeNone => "include_without_record",
            SpfErrorKind::RedirectNone => "redirect_without_record",
            SpfErrorKind::InvalidDomain => "invalid_domain",
            SpfErrorKind::Dns => "dns",
            SpfErrorKind::Timeout => "timeout",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpfError {
    pub kind: SpfErrorKind,
    /// For people: what was wrong and where (`two v=spf1 records at example.com`).
    pub detail: String,
}

impl SpfError {
    fn new(kind: SpfErrorKind, detail: impl Into<String>) -> Self {
        SpfError {
            kind,
            detail: detail.into(),
        }
    }
}

/// What `check_host()` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpfOutcome {
    pub result: AuthResult,
    /// The `exp=` text, for a fail whose record gives one that expands cleanly.
    pub explanation: Option<String>,
    /// Set exactly for permerror and temperror.
    pub error: Option<SpfError>,
}

impl SpfOutcome {
    fn result(result: AuthResult) -> Self {
        SpfOutcome {
            result,
            explanation: None,
            error: None,
        }
    }

    fn error(error: SpfError) -> Self {
        SpfOutcome {
            result: if matches!(error.kind, SpfErrorKind::Dns | SpfErrorKind::Timeout) {
                AuthResult::TempError
            } else {
                AuthResult::PermError
            },
            explanation: None,
            error: Some(error),
        }
    }
}

/// The inputs of `check_host()` (section 4.1).
pub struct SpfRequest<'a> {
    pub ip: IpAddr,
    /// The domain whose record is evaluated first.
    pub domain: &'a str,
    /// `local@domain`; for the null sender `postmaster@<helo>` (section 4.3).
    pub sender: &'a str,
    pub helo: &'a str,
    /// Our own name (`%{r}`).
    pub receiver: &'a str,
}

/// Evaluates SPF for `request` (section 4) within `limit` for the whole evaluation:
/// each look-up has the resolver's timeout, but a record can ask for some 110 of them
/// (10 terms, 10 MX exchanges each), each answered just in time. Section 4.6.4: limit
/// the elapsed time, allowing at least 20 seconds; over it the result is temperror.
/// The caller has checked that the domain is a fully qualified domain name (section
/// 4.3, otherwise the result is none).
pub async fn check_host(
    resolver: &TokioResolver,
    caches: &DnsCaches,
    request: &SpfRequest<'_>,
    limit: std::time::Duration,
) -> SpfOutcome {
    match tokio::time::timeout(limit, check_host_unbounded(resolver, caches, request)).await {
        Ok(outcome) => outcome,
        Err(_) => SpfOutcome::error(SpfError::new(
            SpfErrorKind::Timeout,
            format!(
                "the evaluation for {} took longer than {} (auth.timeouts.spf)",
                request.domain,
                humantime::format_duration(limit)
            ),
        )),
    }
}

async fn check_host_unbounded(
    resolver: &TokioResolver,
    caches: &DnsCaches,
    request: &SpfRequest<'_>,
) -> SpfOutcome {
    let (local, sender_domain) = request
        .sender
        .rsplit_once('@')
        .unwrap_or(("postmaster", request.sender));
    let mut evaluation = Evaluation {
        dns: Dns { resolver, caches },
        ip: request.ip.to_canonical(),
        sender: request.sender,
        local: if local.is_empty() {
            "postmaster"
        } else {
            local
        },
        sender_domain,
        helo: request.helo,
        receiver: request.receiver,
        dns_terms: 0,
        void_lookups: 0,
        validated_names: None,
        scratch: String::new(),
    };
    let domain = request.domain.trim_end_matches('.');
    match evaluation.check(domain.to_string()).await {
        Ok(outcome) => outcome,
        Err(error) => SpfOutcome::error(error),
    }
}

/// Whether a TXT answer holds a record that parses, for `mxgate check`.
pub fn parses(text: &[u8]) -> bool {
    record::is_spf(text) && record::parse(text).is_ok()
}

struct Evaluation<'a> {
    dns: Dns<'a>,
    ip: IpAddr,
    sender: &'a str,
    local: &'a str,
    sender_domain: &'a str,
    helo: &'a str,
    receiver: &'a str,
    dns_terms: u32,
    void_lookups: u32,
    /// PTR names of the client confirmed by an address look-up, found once.
    validated_names: Option<Vec<Box<str>>>,
    scratch: String,
}

type Step<T> = Result<T, SpfError>;

impl<'a> Evaluation<'a> {
    /// `check_host()` for one domain (recursing for `include` and `redirect`; the depth
    /// is bounded by the DNS-term limit).
    fn check(
        &mut self,
        domain: String,
    ) -> Pin<Box<dyn Future<Output = Step<SpfOutcome>> + Send + '_>> {
        Box::pin(async move {
            let records = match self.dns.txt(&domain).await {
                Ok(records) => records,
                Err(Failure::Void) => return Ok(SpfOutcome::result(AuthResult::None)),
                Err(Failure::Error(why)) => return Err(SpfError::new(SpfErrorKind::Dns, why)),
            };
            let mut spf = records.iter().filter(|r| record::is_spf(r));
            let Some(text) = spf.next() else {
                return Ok(SpfOutcome::result(AuthResult::None));
            };
            let others = spf.count();
            if others > 0 {
                return Err(SpfError::new(
                    SpfErrorKind::MultipleRecords,
                    format!("{} v=spf1 records at {domain}", number(others + 1)),
                ));
            }
            let record = record::parse(text).map_err(|why| {
                SpfError::new(
                    SpfErrorKind::Syntax,
                    format!("the record at {domain}: {why}"),
                )
            })?;
            self.evaluate(&domain, &record).await
        })
    }

    async fn evaluate(&mut self, domain: &str, record: &Record<'_>) -> Step<SpfOutcome> {
        for directive in &record.directives {
            if self.matches(domain, &directive.mechanism).await? {
                let result = match directive.qualifier {
                    Qualifier::Pass => AuthResult::Pass,
                    Qualifier::Fail => AuthResult::Fail,
                    Qualifier::SoftFail => AuthResult::SoftFail,
                    Qualifier::Neutral => AuthResult::Neutral,
                };
                let mut outcome = SpfOutcome::result(result);
                if result == AuthResult::Fail
                    && let Some(exp) = record.exp
                {
                    outcome.explanation = self.explanation(domain, exp).await;
                }
                return Ok(outcome);
            }
        }
        if let Some(target) = record.redirect {
            self.count_dns_term()?;
            let target = self.target(domain, target).await?.ok_or_else(|| {
                SpfError::new(
                    SpfErrorKind::InvalidDomain,
                    format!(
                        "redirect={} in the record at {domain} is not a domain name",
                        target.0
                    ),
                )
            })?;
            let outcome = self.check(target.clone()).await?;
            if outcome.result == AuthResult::None {
                return Err(SpfError::new(
                    SpfErrorKind::RedirectNone,
                    format!("redirect={target} (from {domain}) has no SPF record"),
                ));
            }
            return Ok(outcome);
        }
        Ok(SpfOutcome::result(AuthResult::Neutral))
    }

    async fn matches(&mut self, domain: &str, mechanism: &Mechanism<'_>) -> Step<bool> {
        let ip = self.ip;
        match *mechanism {
            Mechanism::All => Ok(true),
            Mechanism::Ip4(network, prefix) => Ok(match ip {
                IpAddr::V4(ip) => in_network4(ip, network, prefix),
                IpAddr::V6(_) => false,
            }),
            Mechanism::Ip6(network, prefix) => Ok(match ip {
                IpAddr::V6(ip) => in_network6(ip, network, prefix),
                IpAddr::V4(_) => false,
            }),
            Mechanism::Include(spec) => {
                self.count_dns_term()?;
                let target = self.target(domain, spec).await?.ok_or_else(|| {
                    SpfError::new(
                        SpfErrorKind::InvalidDomain,
                        format!(
                            "include:{} in the record at {domain} is not a domain name",
                            spec.0
                        ),
                    )
                })?;
                let outcome = self.check(target.clone()).await?;
                match outcome.result {
                    AuthResult::Pass => Ok(true),
                    AuthResult::None => Err(SpfError::new(
                        SpfErrorKind::IncludeNone,
                        format!("include:{target} (from {domain}) has no SPF record"),
                    )),
                    _ => Ok(false),
                }
            }
            Mechanism::A(spec, cidr) => {
                self.count_dns_term()?;
                let Some(name) = self.name_or_domain(domain, spec).await? else {
                    return Ok(false);
                };
                let prefix = self.prefix(cidr);
                let found = self
                    .dns
                    .address_matches(&name, Source::Expanded, ip, prefix)
                    .await;
                self.void_is_false(found)
            }
            Mechanism::Mx(spec, cidr) => {
                self.count_dns_term()?;
                let Some(name) = self.name_or_domain(domain, spec).await? else {
                    return Ok(false);
                };
                let exchanges = match self.dns.mx(&name).await {
                    Ok(exchanges) => exchanges,
                    Err(failure) => return self.void_is_false(Err(failure)),
                };
                if exchanges.len() > MAX_NAMES {
                    return Err(SpfError::new(
                        SpfErrorKind::LookupLimit,
                        format!(
                            "{name} has {} MX names; SPF looks at 10 at most",
                            exchanges.len()
                        ),
                    ));
                }
                let prefix = self.prefix(cidr);
                // A null MX (`.`, RFC 7505) has no addresses.
                for exchange in exchanges.iter().filter(|e| !e.is_empty()) {
                    match self
                        .dns
                        .address_matches(exchange, Source::Answer, ip, prefix)
                        .await
                    {
                        Ok(true) => return Ok(true),
                        Ok(false) | Err(Failure::Void) => {}
                        Err(Failure::Error(why)) => {
                            return Err(SpfError::new(SpfErrorKind::Dns, why));
                        }
                    }
                }
                Ok(false)
            }
            Mechanism::Ptr(spec) => {
                self.count_dns_term()?;
                let Some(target) = self.name_or_domain(domain, spec).await? else {
                    return Ok(false);
                };
                let names = self.validated_names().await?;
                Ok(names.iter().any(|name| is_subdomain(name, &target)))
            }
            Mechanism::Exists(spec) => {
                self.count_dns_term()?;
                let Some(name) = self.target(domain, spec).await? else {
                    return Ok(false);
                };
                // Section 5.7: an A query whatever the client's address family.
                let found = self.dns.a(&name, Source::Expanded).await.map(|_| true);
                self.void_is_false(found)
            }
        }
    }

    fn prefix(&self, cidr: record::DualCidr) -> u8 {
        match self.ip {
            IpAddr::V4(_) => cidr.v4,
            IpAddr::V6(_) => cidr.v6,
        }
    }

    /// A look-up that found nothing does not match, and counts as void.
    fn void_is_false(&mut self, found: Result<bool, Failure>) -> Step<bool> {
        match found {
            Ok(matched) => Ok(matched),
            Err(Failure::Void) => {
                self.void_lookups += 1;
                if self.void_lookups > MAX_VOID_LOOKUPS {
                    return Err(SpfError::new(
                        SpfErrorKind::VoidLookupLimit,
                        format!(
                            "more than {MAX_VOID_LOOKUPS} look-ups found nothing (void lookup limit)"
                        ),
                    ));
                }
                Ok(false)
            }
            Err(Failure::Error(why)) => Err(SpfError::new(SpfErrorKind::Dns, why)),
        }
    }

    fn count_dns_term(&mut self) -> Step<()> {
        self.dns_terms += 1;
        if self.dns_terms > MAX_DNS_TERMS {
            return Err(SpfError::new(
                SpfErrorKind::LookupLimit,
                format!("more than {MAX_DNS_TERMS} DNS-querying terms (DNS lookup limit)"),
            ));
        }
        Ok(())
    }

    /// The mechanism's target: its domain-spec expanded, or the current domain.
    async fn name_or_domain(
        &mut self,
        domain: &str,
        spec: Option<DomainSpec<'_>>,
    ) -> Step<Option<String>> {
        match spec {
            Some(spec) => self.target(domain, spec).await,
            None => Ok(Some(domain.to_string())),
        }
    }

    /// A domain-spec expanded for the current domain, as a name DNS can be asked
    /// about; `None` when it cannot be one (an empty or over-long label), which the
    /// mechanisms treat as no match (RFC 7208 leaves this undefined).
    async fn target(&mut self, domain: &str, spec: DomainSpec<'_>) -> Step<Option<String>> {
        let ptr = if macros::uses_ptr(spec.0) {
            self.ptr_macro(domain).await?
        } else {
            String::new()
        };
        self.scratch.clear();
        let mut out = std::mem::take(&mut self.scratch);
        let expanded = macros::expand(
            spec.0,
            Context::Domain,
            &self.values(domain, &ptr),
            &mut out,
        );
        let name = match expanded {
            Ok(()) => query_name(&out).map(str::to_string),
            Err(_) => None,
        };
        self.scratch = out;
        Ok(name)
    }

    fn values<'v>(&'v self, domain: &'v str, ptr: &'v str) -> Values<'v> {
        Values {
            sender: self.sender,
            local: self.local,
            sender_domain: self.sender_domain,
            domain,
            ip: self.ip,
            helo: self.helo,
            receiver: self.receiver,
            ptr,
        }
    }

    /// PTR names of the client whose address look-up gives the client back (the first
    /// 10 only). A failed PTR look-up means no names (section 5.5).
    async fn validated_names(&mut self) -> Step<&[Box<str>]> {
        if self.validated_names.is_none() {
            let names = match self.dns.ptr(self.ip).await {
                Ok(names) => names,
                Err(Failure::Void) => {
                    self.void_is_false(Err(Failure::Void))?;
                    Vec::new()
                }
                Err(Failure::Error(_)) => Vec::new(),
            };
            let mut validated = Vec::new();
            for name in names.into_iter().take(MAX_NAMES) {
                if name.is_empty() {
                    continue;
                }
                let prefix = if self.ip.is_ipv4() { 32 } else { 128 };
                if let Ok(true) = self
                    .dns
                    .address_matches(&name, Source::Answer, self.ip, prefix)
                    .await
                {
                    validated.push(name);
                }
            }
            self.validated_names = Some(validated);
        }
        Ok(self.validated_names.as_deref().unwrap_or_default())
    }

    /// `%{p}` (section 7.3): a validated name equal to or under the domain if there is
    /// one, else any validated name, else `unknown`.
    async fn ptr_macro(&mut self, domain: &str) -> Step<String> {
        let names = self.validated_names().await?;
        let chosen = names
            .iter()
            .find(|n| is_subdomain(n, domain))
            .or_else(|| names.first());
        Ok(chosen.map_or_else(|| "unknown".to_string(), |n| n.to_string()))
    }

    /// The `exp=` text (section 6.2); any problem means no explanation.
    async fn explanation(&mut self, domain: &str, spec: DomainSpec<'_>) -> Option<String> {
        let name = self.target(domain, spec).await.ok()??;
        let records = self.dns.txt(&name).await.ok()?;
        let [text] = &records[..] else {
            return None;
        };
        let text = std::str::from_utf8(text).ok()?;
        macros::check(text, Context::Explanation).ok()?;
        let ptr = if macros::uses_ptr(text) {
            self.ptr_macro(domain).await.ok()?
        } else {
            String::new()
        };
        let mut out = String::new();
        macros::expand(
            text,
            Context::Explanation,
            &self.values(domain, &ptr),
            &mut out,
        )
        .ok()?;
        out.is_ascii().then_some(out)
    }
}

fn number(n: usize) -> String {
    match n {
        2 => "two".into(),
        3 => "three".into(),
        n => n.to_string(),
    }
}

/// `name` is `domain` or a name under it (case-insensitively, trailing dots ignored).
fn is_subdomain(name: &str, domain: &str) -> bool {
    let name = name.trim_end_matches('.');
    let domain = domain.trim_end_matches('.');
    name.eq_ignore_ascii_case(domain)
        || (name.len() > domain.len()
            && name.as_bytes()[name.len() - domain.len() - 1] == b'.'
            && name[name.len() - domain.len()..].eq_ignore_ascii_case(domain))
}

pub(crate) fn in_network4(ip: Ipv4Addr, network: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(network) & mask
}

pub(crate) fn in_network6(ip: Ipv6Addr, network: Ipv6Addr, prefix: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    u128::from(ip) & mask == u128::from(network) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks() {
        let ip: Ipv4Addr = "192.0.2.77".parse().unwrap();
        assert!(in_network4(ip, "192.0.2.0".parse().unwrap(), 24));
        assert!(!in_network4(ip, "192.0.3.0".parse().unwrap(), 24));
        assert!(in_network4(ip, "10.0.0.0".parse().unwrap(), 0));
        assert!(in_network4(ip, ip, 32));
        let ip6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert!(in_network6(ip6, "2001:db8::".parse().unwrap(), 32));
        assert!(in_network6(ip6, "::".parse().unwrap(), 0));
        assert!(!in_network6(ip6, "2001:db9::".parse().unwrap(), 32));
    }

    #[test]
    fn subdomains() {
        assert!(is_subdomain("mx.Example.com.", "example.com"));
        assert!(is_subdomain("example.com", "example.com."));
        assert!(!is_subdomain("badexample.com", "example.com"));
    }
}
