//! Sender authentication: iprev, DKIM, ARC and DMARC by mail-auth, SPF (HELO and MAIL
//! FROM) by our own RFC 7208 evaluator ([`spf`]), all over the shared DNS cache; what
//! mail-auth reads leniently is checked strictly before its pass is trusted
//! ([`strict`]). Checks return data ([`crate::findings`]); they decide nothing. The verdict is
//! made in `pipeline`.

mod bounded;
mod dmarc;
pub mod dns;
pub mod metrics;
mod prefetch;
pub mod reading;
pub mod resinfo;
pub mod spf;

/// The findings lived here before they moved below `rewrite`; the old path still names
/// them for the tests and the bench.
pub use crate::findings as results;
mod strict;

pub use bounded::Budget;

use crate::findings::{
    ArcCheck, AuthResult, DkimCheck, DmarcCheck, FromHeader, IprevCheck, SpfCheck,
};
use dns::DnsCaches;
use mail_auth::{
    ArcOutput, AuthenticatedMessage, DkimOutput, DkimResult, IprevResult, MessageAuthenticator,
    SpfOutput, SpfResult,
};
use std::net::IpAddr;
use std::time::Instant;

/// How many PTR names are tried for forward confirmation.
const MAX_PTR_NAMES: usize = 4;

/// How many of the policy's host names are looked up when the PTR look-up failed.
const MAX_TRUSTED_HOSTS: usize = 8;

/// A forward look-up of a host name, for iprev.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Forward {
    /// The name's addresses include the client's.
    Confirmed,
    /// They do not, or the name has none.
    Elsewhere,
    /// DNS trouble: a failed or unfinished look-up.
    Trouble,
}

pub struct Authenticator {
    resolver: MessageAuthenticator,
    caches: DnsCaches,
    /// Our own name, for SPF's `%{r}` macro.
    host_domain: String,
    /// The DNS settings this was built from (a reload reuses the cache if unchanged).
    pub dns_config: crate::config::DnsConfig,
    /// `auth.timeouts.spf` in milliseconds; a reload that keeps this authenticator
    /// updates it.
    spf_timeout_ms: std::sync::atomic::AtomicU64,
}

/// The outputs of the message checks, borrowing the parsed message (the ARC sealer needs
/// them later), plus the plain-data summary.
pub struct MessageVerification<'m> {
    pub dkim_outputs: Vec<DkimOutput<'m>>,
    pub arc_output: ArcOutput<'m>,
    /// ARC header fields that do not parse, or that mail-auth could not even group
    /// into sets: never seal on top of them.
    pub arc_malformed: bool,
    pub dkim: Vec<DkimCheck>,
    pub arc: ArcCheck,
    pub dmarc: DmarcCheck,
    pub from: FromHeader,
}

impl Authenticator {
    /// Builds the checks over a new resolver; also returns a warning when the DNS
    /// configuration is unusable.
    pub fn new(
        config: &crate::config::DnsConfig,
        host_domain: &str,
    ) -> Result<(Authenticator, Option<String>), String> {
        let (resolver, warning) = dns::resolver(config)?;
        Ok((
            Authenticator {
                resolver,
                caches: DnsCaches::new(
                    config.cache_max_bytes.get(),
                    config.cache_entries.get(),
                    config.timeout,
                ),
                host_domain: host_domain.to_string(),
                dns_config: config.clone(),
                spf_timeout_ms: std::sync::atomic::AtomicU64::new(
                    crate::config::AuthTimeouts::default().spf.as_millis() as u64,
                ),
            },
            warning,
        ))
    }

    /// Bounds each SPF evaluation (`auth.timeouts.spf`).
    pub fn set_spf_timeout(&self, limit: std::time::Duration) {
        let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        self.spf_timeout_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn spf_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.spf_timeout_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    pub fn host_domain(&self) -> &str {
        &self.host_domain
    }

    pub fn caches(&self) -> &DnsCaches {
        &self.caches
    }

    /// iprev (RFC 8601 section 3): PTR, then A/AAAA of those names back to the client.
    /// `trusted_hosts` are the exact host names the policy trusts (`client_host`): when
    /// the check ends in a temperror, they are the names it may still be (see
    /// [`IprevCheck::unsure`]).
    pub async fn iprev(&self, ip: IpAddr, trusted_hosts: &[String]) -> IprevCheck {
        let started = Instant::now();
        let output = self.resolver.verify_iprev(self.caches.parameters(ip)).await;
        let ptr: Vec<String> = output
            .ptr
            .as_ref()
            .map(|names| {
                names
                    .iter()
                    .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
                    .collect()
            })
            .unwrap_or_default();
        let mut confirmed = Vec::new();
        let mut unsure = Vec::new();
        match (&output.result, &output.ptr) {
            (IprevResult::Pass, _) => {
                for name in ptr.iter().take(MAX_PTR_NAMES) {
                    if self.forward(name, ip).await == Forward::Confirmed {
                        confirmed.push(name.clone());
                    }
                }
            }
            // A PTR name whose address look-up failed: mail-auth tries two.
            // Asked again, a name may now answer (the first try timed out while the
            // resolver was still recursing): then it counts as what it says.
            (IprevResult::TempError(_), Some(_)) => {
                for name in ptr.iter().take(2) {
                    match self.forward(name, ip).await {
                        Forward::Confirmed => confirmed.push(name.clone()),
                        Forward::Trouble => unsure.push(name.clone()),
                        Forward::Elsewhere => {}
                    }
                }
            }
            // The PTR look-up failed: whoever runs the client's reverse zone (an attacker
            // for his own addresses) decides that, so the client may be a trusted host
            // only if that host's own addresses (its owner's zone) say so, or cannot be
            // looked up.
            // All at once: a dead zone among them costs one look-up's time, not eight.
            (IprevResult::TempError(_), None) => {
                let names = &trusted_hosts[..trusted_hosts.len().min(MAX_TRUSTED_HOSTS)];
                let forwards =
                    bounded::join_all(names.iter().map(|name| self.forward(name, ip)).collect())
                        .await;
                for (name, forward) in names.iter().zip(forwards) {
                    if forward != Forward::Elsewhere {
                        unsure.push(name.clone());
                    }
                }
            }
            _ => {}
        }
        let check = IprevCheck {
            result: match output.result {
                IprevResult::Pass => AuthResult::Pass,
                IprevResult::Fail(_) => AuthResult::Fail,
                IprevResult::TempError(_) => AuthResult::TempError,
                IprevResult::PermError(_) => AuthResult::PermError,
                IprevResult::None => AuthResult::None,
            },
            ptr,
            confirmed,
            unsure,
        };
        metrics::check("iprev", check.result, started.elapsed());
        check
    }

    /// Whether `name`'s addresses (of the client's family) include `ip`.
    async fn forward(&self, name: &str, ip: IpAddr) -> Forward {
        let found = self
            .resolver
            .ip_lookup(
                &format!("{}.", name.trim_end_matches('.')),
                match ip {
                    IpAddr::V4(_) => mail_auth::IpLookupStrategy::Ipv4Only,
                    IpAddr::V6(_) => mail_auth::IpLookupStrategy::Ipv6Only,
                },
                32,
                Some(&self.caches.ipv4),
                Some(&self.caches.ipv6),
            )
            .await;
        match found {
            Ok(ips) if ips.contains(&ip) => Forward::Confirmed,
            Err(mail_auth::Error::Dns(mail_auth::DnsError::Resolver(_))) => Forward::Trouble,
            _ => Forward::Elsewhere,
        }
    }

    /// The addresses `name` resolves to (A records, else AAAA), for `mxgate check`'s
    /// forward confirmation of the host names policy rules trust. `Ok(empty)`: no
    /// address record; `Err`: the look-up failed.
    pub async fn host_addresses(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        let found = self
            .resolver
            .ip_lookup(
                &format!("{}.", name.trim_end_matches('.')),
                mail_auth::IpLookupStrategy::Ipv4thenIpv6,
                MAX_PTR_NAMES * 4,
                Some(&self.caches.ipv4),
                Some(&self.caches.ipv6),
            )
            .await;
        match found {
            Ok(addresses) => Ok(addresses),
            Err(mail_auth::Error::Dns(mail_auth::DnsError::RecordNotFound(_))) => Ok(Vec::new()),
            Err(err) => Err(err.to_string()),
        }
    }

    /// SPF for the HELO identity (RFC 7208 section 2.3).
    pub async fn spf_helo(&self, ip: IpAddr, helo: &str) -> SpfCheck {
        let started = Instant::now();
        if !checkable_domain(helo) {
            return no_spf_identity(helo, format!("postmaster@{helo}"));
        }
        let identity = format!("postmaster@{helo}");
        let outcome = self.check_host(ip, helo, &identity, helo).await;
        let check = spf_check(outcome, helo, identity);
        metrics::spf_check("helo_spf", &check, started.elapsed());
        check
    }

    /// SPF for the MAIL FROM identity; for the null sender, `postmaster@<HELO>`
    /// (RFC 7208 section 2.4).
    pub async fn spf_mail_from(&self, ip: IpAddr, helo: &str, mail_from: &str) -> SpfCheck {
        let started = Instant::now();
        let domain = mail_from.rsplit_once('@').map_or(helo, |(_, d)| d);
        if !checkable_domain(domain) {
            let identity = if mail_from.is_empty() {
                format!("postmaster@{helo}")
            } else {
                mail_from.to_string()
            };
            return no_spf_identity(domain, identity);
        }
        let identity = if mail_from.is_empty() {
            format!("postmaster@{helo}")
        } else {
            mail_from.to_string()
        };
        let outcome = self.check_host(ip, domain, &identity, helo).await;
        let check = spf_check(outcome, domain, identity);
        metrics::spf_check("spf", &check, started.elapsed());
        check
    }

    /// Whether the SPF record published at `record_domain` (for example
    /// `_spf.netigate.se`) authorises `ip`, evaluated with the full SPF engine. The
    /// HELO name and envelope sender are the client's, so macros such as `%{h}`, `%{s}`
    /// and `%{l}` see what they would see for the sender's own record.
    pub async fn spf_record_authorizes(
        &self,
        ip: IpAddr,
        record_domain: &str,
        helo: &str,
        mail_from: &str,
    ) -> AuthResult {
        // RFC 7208 section 4.3: a null sender is postmaster@ the HELO name. The sender's
        // macros (%{s}, %{l}, %{o}) are the client's word, as they are when the
        // sender's own record includes this one.
        let sender = match (mail_from.is_empty(), helo.is_empty()) {
            (false, _) => mail_from.to_string(),
            (true, false) => format!("postmaster@{helo}"),
            (true, true) => format!("postmaster@{record_domain}"),
        };
        self.spf_record_outcome(ip, record_domain, helo, &sender)
            .await
            .result
    }

    /// The full outcome behind [`Authenticator::spf_record_authorizes`] (with the
    /// permerror/temperror reason), for `mxgate check` and `explain`.
    pub async fn spf_record_outcome(
        &self,
        ip: IpAddr,
        record_domain: &str,
        helo: &str,
        sender: &str,
    ) -> spf::SpfOutcome {
        self.check_host(ip, record_domain, sender, helo).await
    }

    /// RFC 7208 `check_host()` by our own evaluator, over the shared resolver and cache.
    async fn check_host(
        &self,
        ip: IpAddr,
        domain: &str,
        sender: &str,
        helo: &str,
    ) -> spf::SpfOutcome {
        // An internationalised domain is looked up by its A-labels.
        let a_labels = crate::config::DomainName::parse(domain);
        let domain = a_labels.as_ref().map_or(domain, |d| d.as_str());
        spf::check_host(
            self.resolver.resolver(),
            &self.caches,
            &spf::SpfRequest {
                ip,
                domain,
                sender,
                helo,
                receiver: &self.host_domain,
            },
            self.spf_timeout(),
        )
        .await
    }

    /// The raw text of the TXT records at `name` (uncached; for diagnostics).
    pub async fn txt_raw(&self, name: &str) -> Option<Vec<u8>> {
        self.resolver
            .txt_raw_lookup(format!("{}.", name.trim_end_matches('.')))
            .await
            .ok()
    }

    /// DKIM alone (for checking our own published keys).
    pub async fn verify_dkim(&self, message: &AuthenticatedMessage<'_>) -> Vec<DkimCheck> {
        self.resolver
            .verify_dkim(self.caches.parameters(message))
            .await
            .iter()
            .map(dkim_check)
            .collect()
    }

    /// DKIM, ARC and DMARC for a received message, under `budget`: the first
    /// `max_dkim_signatures` signatures, ARC and the DMARC record look-up all start at
    /// once; DMARC itself needs SPF (done at MAIL) and DKIM. Whatever has not finished
    /// by `end_of_data` (DKIM and ARC: by four fifths of it) is a temperror. `from` is
    /// our reading of the From fields (`reading::WrittenFroms::header`); DMARC is evaluated on it.
    pub async fn verify_message<'m>(
        &'m self,
        message: &'m AuthenticatedMessage<'m>,
        from: FromHeader,
        spf: &SpfCheck,
        budget: Budget,
    ) -> MessageVerification<'m> {
        let started = Instant::now();
        let now = tokio::time::Instant::now();
        let deadline = now + budget.end_of_data;
        // DMARC can only be evaluated once DKIM is done: DKIM and ARC must finish a fifth
        // of the budget early, so that DMARC (whose look-ups started with them) is not
        // always cut off when a signature's key never comes.
        let signatures_deadline = now + budget.end_of_data * 4 / 5;
        // The keys are fetched first, all at once, so that mail-auth finds them in the
        // cache (see `prefetch`): DKIM and ARC often share one.
        let mut keys = self.dkim_key_names(message, budget.max_dkim_signatures);
        keys.extend(prefetch::arc_key_names(message));
        let signatures = async {
            let _ = tokio::time::timeout_at(signatures_deadline, self.prefetch_keys(keys)).await;
            tokio::join!(
                self.verify_dkim_bounded(message, budget.max_dkim_signatures, signatures_deadline),
                tokio::time::timeout_at(
                    signatures_deadline,
                    self.resolver.verify_arc(self.caches.parameters(message))
                ),
            )
        };
        let (((mut dkim_outputs, ignored), arc_output), ()) =
            tokio::join!(signatures, self.prefetch_dmarc(&from, deadline));
        strict::refuse_rsa_sha1(&mut dkim_outputs, message);
        if ignored > 0 {
            metrics::dkim_signatures_ignored(ignored);
            tracing::warn!(
                ignored,
                verified = budget.max_dkim_signatures,
                "message has more DKIM-Signature fields than auth.max_dkim_signatures; the rest are ignored"
            );
        }
        let arc_unfinished = arc_output.is_err();
        let arc_output = arc_output.unwrap_or_else(|_| {
            ArcOutput::default().with_result(DkimResult::TempError(bounded::unfinished()))
        });
        let dkim: Vec<DkimCheck> = dkim_outputs.iter().map(dkim_check).collect();
        let mut arc = arc_check(&arc_output);
        if arc_unfinished {
            // Who the chain says sealed last, unverified: a trusted sealer's unfinished
            // chain defers rather than refuses (`verdict::trusted_sealer_override`).
            arc.instances = message.as_headers.len() as u32;
            arc.sealer = message
                .as_headers
                .last()
                .map(|h| h.header.d.to_ascii_lowercase());
            arc.signer = message
                .ams_headers
                .last()
                .map(|h| h.header.d.to_ascii_lowercase());
            arc.sealer_results = message
                .aar_headers
                .last()
                .map(|h| String::from_utf8_lossy(h.value).trim().to_string());
        }
        // mail-auth reports `none` when there is no ARC-Message-Signature, even if ARC-Seal
        // or ARC-Authentication-Results are present, and a neutral result without sets
        // when an ARC header field does not parse (`cv=bogus`): both are broken chains.
        let unparsable = message.has_arc_errors;
        // Tag-lists mail-auth reads leniently, and algorithms RFC 8301 forbids.
        let strict_problem = strict::arc_problem(message.raw_parsed_headers());
        let arc_malformed = unparsable
            || strict_problem.is_some()
            || (arc.result == AuthResult::None
                && (!message.as_headers.is_empty() || !message.aar_headers.is_empty()));
        if arc_malformed {
            arc.result = AuthResult::Fail;
            arc.reason = Some(if unparsable {
                "ARC header fields that do not parse".into()
            } else if let Some(problem) = strict_problem {
                problem
            } else {
                "ARC header fields without an ARC-Message-Signature".into()
            });
        }
        for check in &dkim {
            metrics::check("dkim", check.result, started.elapsed());
        }
        if dkim.is_empty() {
            metrics::check("dkim", AuthResult::None, started.elapsed());
        }
        metrics::check("arc", arc.result, started.elapsed());
        let dmarc_started = Instant::now();
        let dmarc = match tokio::time::timeout_at(
            deadline,
            dmarc::evaluate(self, message, &dkim_outputs, spf, &from),
        )
        .await
        {
            Ok(dmarc) => dmarc,
            Err(_) => dmarc::unfinished(&from),
        };
        metrics::check("dmarc", dmarc.result, dmarc_started.elapsed());
        MessageVerification {
            dkim_outputs,
            arc_output,
            // A chain we could not finish verifying is not sealed on top of either.
            arc_malformed: arc_malformed || arc_unfinished,
            dkim,
            arc,
            dmarc,
            from,
        }
    }
}

/// RFC 7208 section 4.3: an identity that is not a fully qualified domain name (an
/// address literal like `[192.0.2.1]`, a bare IP, a malformed name) has no SPF record:
/// the result is none. mail-auth would report permerror for those.
fn checkable_domain(domain: &str) -> bool {
    let domain = domain.trim_end_matches('.');
    !domain.starts_with('[')
        && domain.parse::<IpAddr>().is_err()
        && domain.contains('.')
        && crate::config::DomainName::parse(domain).is_ok()
}

fn no_spf_identity(domain: &str, identity: String) -> SpfCheck {
    SpfCheck {
        result: AuthResult::None,
        domain: domain.to_ascii_lowercase(),
        identity,
        explanation: None,
        reason: None,
        reason_kind: None,
    }
}

fn spf_check(outcome: spf::SpfOutcome, domain: &str, identity: String) -> SpfCheck {
    SpfCheck {
        result: outcome.result,
        domain: domain.trim_end_matches('.').to_ascii_lowercase(),
        identity,
        explanation: outcome.explanation,
        reason_kind: outcome.error.as_ref().map(|e| e.kind.label()),
        reason: outcome.error.map(|e| e.detail),
    }
}

/// RFC 8601: a signature that verified but whose body hash did not match "failed the
/// verification test" (fail); one that could not be processed at all is neutral.
fn dkim_result(result: &DkimResult) -> (AuthResult, Option<String>) {
    use mail_auth::Error;
    use mail_auth::dkim::DkimError;
    match result {
        DkimResult::Pass => (AuthResult::Pass, None),
        DkimResult::Neutral(Error::Dkim(DkimError::FailedBodyHashMatch)) => {
            (AuthResult::Fail, Some("body hash did not verify".into()))
        }
        DkimResult::Neutral(err) => (AuthResult::Neutral, Some(err.to_string())),
        DkimResult::Fail(err) => (AuthResult::Fail, Some(err.to_string())),
        DkimResult::PermError(err) => (AuthResult::PermError, Some(err.to_string())),
        DkimResult::TempError(err) => (AuthResult::TempError, Some(err.to_string())),
        DkimResult::None => (AuthResult::None, None),
    }
}

fn dkim_check(output: &DkimOutput<'_>) -> DkimCheck {
    let (result, mut reason) = dkim_result(output.result());
    if strict::is_refused_rsa_sha1(output) {
        reason = Some(strict::RSA_SHA1_REFUSED.into());
    }
    let signature = output.signature();
    let b = signature
        .map(|s| {
            use base64::Engine;
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(&s.b[..s.b.len().min(6)]);
            encoded.chars().take(8).collect()
        })
        .unwrap_or_default();
    DkimCheck {
        result,
        domain: signature
            .map(|s| s.d.to_ascii_lowercase())
            .unwrap_or_default(),
        selector: signature.map(|s| s.s.clone()).unwrap_or_default(),
        b,
        algorithm: signature
            .map(|s| s.a.name().to_string())
            .unwrap_or_default(),
        reason,
    }
}

fn arc_check(output: &ArcOutput<'_>) -> ArcCheck {
    let (result, reason) = match output.result() {
        DkimResult::Pass => (AuthResult::Pass, None),
        DkimResult::None => (AuthResult::None, None),
        DkimResult::TempError(err) => (AuthResult::TempError, Some(err.to_string())),
        DkimResult::Fail(err) | DkimResult::Neutral(err) | DkimResult::PermError(err) => {
            (AuthResult::Fail, Some(err.to_string()))
        }
    };
    let last = output.sets().last();
    ArcCheck {
        result,
        instances: output.sets().len() as u32,
        sealer: last.map(|set| set.seal.header.d.to_ascii_lowercase()),
        signer: last.map(|set| set.signature.header.d.to_ascii_lowercase()),
        sealer_results: last.map(|set| {
            String::from_utf8_lossy(set.results.value)
                .trim()
                .to_string()
        }),
        reason,
    }
}

/// An author address in the form DMARC is evaluated on: the domain in A-labels,
/// lowercased, without a trailing dot or the whitespace obsolete syntax allows
/// (`ceo@bank . test`). `None` when the domain is not a usable domain name: such an
/// address must never be handed on as it is, or `bank.test.` would be looked up as a
/// different domain from `bank.test` and its policy never applied.
pub(crate) fn author_address(address: &str) -> Option<String> {
    let (local, domain) = address.rsplit_once('@')?;
    let compact: String = domain.chars().filter(|c| !c.is_whitespace()).collect();
    let domain = crate::config::DomainName::parse(&compact).ok()?;
    (!local.is_empty()).then(|| format!("{local}@{}", domain.as_str()))
}

/// Plain `SpfOutput` rebuilt from our summary, for mail-auth's DMARC check.
fn spf_output(check: &SpfCheck) -> SpfOutput {
    SpfOutput::new(check.domain.clone()).with_result(match check.result {
        AuthResult::Pass => SpfResult::Pass,
        AuthResult::Fail => SpfResult::Fail,
        AuthResult::SoftFail => SpfResult::SoftFail,
        AuthResult::Neutral => SpfResult::Neutral,
        AuthResult::TempError => SpfResult::TempError,
        AuthResult::PermError => SpfResult::PermError,
        AuthResult::None => SpfResult::None,
    })
}
