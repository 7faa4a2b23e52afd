//! DMARC evaluation on top of mail-auth.
//!
//! mail-auth 0.13 implements RFC 9989 (DMARCbis): the Organizational Domain comes from a
//! DNS tree walk instead of the public suffix list, and `t=y` replaces `pct`. Two things
//! are added here:
//! - `pct` (RFC 7489 6.6.4), still published by many domains: a failing message outside
//!   the sample gets the next less strict policy. mail-auth does not parse the tag, so
//!   the record it used is read raw.
//! - A From header field with several addresses in different domains (RFC 7489 6.6.1):
//!   each domain is evaluated and the strictest failing policy wins, where mail-auth
//!   would exempt the message.

use super::{Authenticator, spf_output};
use crate::findings::{AuthResult, DmarcCheck, DmarcPolicy, FromHeader, SpfCheck};
use mail_auth::dmarc::Policy;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::{AuthenticatedMessage, DkimOutput, DmarcOutput, DmarcResult, ResolverCache, Txt};
use std::sync::Arc;

pub(super) async fn evaluate(
    auth: &Authenticator,
    message: &AuthenticatedMessage<'_>,
    dkim: &[DkimOutput<'_>],
    spf: &SpfCheck,
    from: &FromHeader,
) -> DmarcCheck {
    if from.too_many_domains() {
        // Refused at the verdict (`FromHeader::problem`); nothing is looked up.
        let mut check = unfinished(from);
        check.result = AuthResult::None;
        check.reason = Some(format!(
            "{} From domains, more than {}: not evaluated",
            from.domains.len(),
            crate::findings::MAX_AUTHOR_DOMAINS
        ));
        return check;
    }
    let spf_output = spf_output(spf);
    if from.domains.len() <= 1 {
        // mail-auth reads the author domain from the addresses as written; it gets
        // them normalised, so that `bank.test.` is evaluated as `bank.test`.
        let normalised;
        let message = if message.from == from.addresses {
            message
        } else {
            normalised = AuthenticatedMessage {
                from: from.addresses.clone(),
                ..message.clone()
            };
            &normalised
        };
        let output = auth
            .resolver
            .verify_dmarc(auth.caches.parameters(DmarcParameters::new(
                message,
                dkim,
                &spf.domain,
                &spf_output,
            )))
            .await;
        return summarise(auth, &output, from.domains.first().cloned()).await;
    }
    // One evaluation per author domain.
    let mut checks = Vec::with_capacity(from.domains.len());
    for domain in &from.domains {
        let mut single = message.clone();
        single.from = from
            .addresses
            .iter()
            .filter(|a| a.ends_with(&format!("@{domain}")))
            .take(1)
            .cloned()
            .collect();
        let output = auth
            .resolver
            .verify_dmarc(auth.caches.parameters(DmarcParameters::new(
                &single,
                dkim,
                &spf.domain,
                &spf_output,
            )))
            .await;
        checks.push(summarise(auth, &output, Some(domain.clone())).await);
    }
    strictest(checks)
}

/// DMARC that did not finish within `auth.timeouts.end_of_data`: a temperror.
pub(super) fn unfinished(from: &FromHeader) -> DmarcCheck {
    DmarcCheck {
        result: AuthResult::TempError,
        domain: from.domains.first().cloned().unwrap_or_default(),
        policy: DmarcPolicy::None,
        applied_policy: DmarcPolicy::None,
        spf_aligned: false,
        dkim_aligned: false,
        pct: None,
        reason: Some(super::bounded::unfinished().to_string()),
    }
}

/// The check that decides: the failing one with the strictest policy, else a
/// temperror, else one that did not pass, else the first. A pass speaks only for its
/// own domain: one author domain without a DMARC record beside one that passes is not
/// a pass for the message (the domains are in alphabetical order, so an attacker could
/// otherwise pick which one is reported).
fn strictest(mut checks: Vec<DmarcCheck>) -> DmarcCheck {
    let rank = |c: &DmarcCheck| match (c.result, c.applied_policy) {
        (AuthResult::Fail, DmarcPolicy::Reject) => 0,
        (AuthResult::Fail, DmarcPolicy::Quarantine) => 1,
        (AuthResult::TempError, _) => 2,
        (AuthResult::Fail, DmarcPolicy::None) => 3,
        (AuthResult::Pass, _) => 5,
        _ => 4,
    };
    checks.sort_by_key(rank);
    checks.swap_remove(0)
}

async fn summarise(
    auth: &Authenticator,
    output: &DmarcOutput,
    fallback_domain: Option<String>,
) -> DmarcCheck {
    let (result, reason) = match output.result() {
        DmarcResult::Pass => (AuthResult::Pass, None),
        DmarcResult::Fail(err) => (AuthResult::Fail, Some(failure_reason(output, &err))),
        DmarcResult::TempError(err) => (AuthResult::TempError, Some(err.to_string())),
        DmarcResult::PermError(err) => (AuthResult::PermError, Some(err.to_string())),
        DmarcResult::None => (AuthResult::None, None),
    };
    let policy = match output.policy() {
        Policy::Reject => DmarcPolicy::Reject,
        Policy::Quarantine => DmarcPolicy::Quarantine,
        Policy::None | Policy::Unspecified => DmarcPolicy::None,
    };
    let domain = if output.domain().is_empty() {
        fallback_domain.unwrap_or_default()
    } else {
        output.domain().to_ascii_lowercase()
    };
    let mut check = DmarcCheck {
        result,
        domain,
        policy,
        applied_policy: policy,
        spf_aligned: matches!(output.spf_result(), DmarcResult::Pass),
        dkim_aligned: matches!(output.dkim_result(), DmarcResult::Pass),
        pct: None,
        reason,
    };
    if check.result == AuthResult::Fail
        && check.policy != DmarcPolicy::None
        && let Some(record) = output.dmarc_record_cloned()
        && let Some(pct) = published_pct(auth, &check.domain, &record).await
        && pct < 100
    {
        check.pct = Some(pct);
        if !sampled(pct) {
            check.applied_policy = check.policy.relaxed();
        }
    }
    check
}

fn failure_reason(output: &DmarcOutput, err: &mail_auth::Error) -> String {
    let spf = match output.spf_result() {
        DmarcResult::Pass => "SPF aligned",
        DmarcResult::Fail(_) => "SPF passed but is not aligned",
        _ => "no SPF pass",
    };
    let dkim = match output.dkim_result() {
        DmarcResult::Pass => "DKIM aligned",
        DmarcResult::Fail(_) => "DKIM passed but is not aligned",
        _ => "no DKIM pass",
    };
    let _ = err;
    format!("{spf}, {dkim}")
}

/// The `pct` tag of the DMARC record mail-auth applied, found by looking for that very
/// record in the TXT cache at the author domain and its parents.
async fn published_pct(
    auth: &Authenticator,
    author_domain: &str,
    record: &Arc<mail_auth::dmarc::Dmarc>,
) -> Option<u8> {
    let mut domain = author_domain;
    loop {
        let name = format!("_dmarc.{domain}.");
        if let Some(Txt::Dmarc(cached)) = auth.caches.txt.get(name.as_str())
            && Arc::ptr_eq(&cached, record)
        {
            // The raw records, from the weighed raw-TXT cache SPF keeps (hickory keeps
            // none): mail-auth's parsed record no longer carries `pct`.
            let dns = super::spf::Dns {
                resolver: auth.resolver.resolver(),
                caches: &auth.caches,
            };
            let records = dns.txt(name.trim_end_matches('.')).await.ok()?;
            return records
                .iter()
                .map(|r| String::from_utf8_lossy(r))
                .find(|r| {
                    r.trim_start()
                        .get(..8)
                        .is_some_and(|v| v.eq_ignore_ascii_case("v=DMARC1"))
                })
                .and_then(|r| parse_pct(&r));
        }
        domain = domain.split_once('.')?.1;
        if !domain.contains('.') && domain.len() < 2 {
            return None;
        }
    }
}

fn parse_pct(record: &str) -> Option<u8> {
    record.split(';').find_map(|tag| {
        let (name, value) = tag.split_once('=')?;
        if name.trim().eq_ignore_ascii_case("pct") {
            value.trim().parse::<u8>().ok().map(|p| p.min(100))
        } else {
            None
        }
    })
}

/// True for `pct` percent of calls.
fn sampled(pct: u8) -> bool {
    use ring::rand::SecureRandom;
    let mut byte = [0u8; 2];
    if ring::rand::SystemRandom::new().fill(&mut byte).is_err() {
        return true;
    }
    (u16::from_le_bytes(byte) % 100) < u16::from(pct)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pct_tag() {
        assert_eq!(
            parse_pct("v=DMARC1; p=reject; pct=25; rua=mailto:x@y"),
            Some(25)
        );
        assert_eq!(parse_pct("v=DMARC1; p=reject"), None);
        assert_eq!(parse_pct("v=DMARC1;PCT = 0"), Some(0));
    }

    #[test]
    fn sampling_follows_pct() {
        assert!((0..200).all(|_| !sampled(0)));
        assert!((0..200).all(|_| sampled(100)));
        let hits = (0..4000).filter(|_| sampled(25)).count();
        assert!((800..1200).contains(&hits), "{hits}");
    }

    fn check(result: AuthResult, policy: DmarcPolicy) -> DmarcCheck {
        DmarcCheck {
            result,
            domain: format!("{result}-{}", policy.as_str()),
            policy,
            applied_policy: policy,
            spf_aligned: false,
            dkim_aligned: false,
            pct: None,
            reason: None,
        }
    }

    #[test]
    fn strictest_failing_policy_wins() {
        let pick = strictest(vec![
            check(AuthResult::Pass, DmarcPolicy::Reject),
            check(AuthResult::Fail, DmarcPolicy::Quarantine),
            check(AuthResult::Fail, DmarcPolicy::Reject),
        ]);
        assert_eq!(pick.domain, "fail-reject");
        let pick = strictest(vec![
            check(AuthResult::Pass, DmarcPolicy::Reject),
            check(AuthResult::TempError, DmarcPolicy::None),
        ]);
        assert_eq!(pick.domain, "temperror-none");
    }

    /// `From: a@aaa-attacker.test, ceo@ours.test` where ours.test publishes no DMARC
    /// record: the message does not pass DMARC because its first domain does.
    #[test]
    fn a_pass_does_not_speak_for_another_domain() {
        for other in [AuthResult::None, AuthResult::PermError] {
            let pick = strictest(vec![
                check(AuthResult::Pass, DmarcPolicy::Reject),
                check(other, DmarcPolicy::None),
            ]);
            assert_eq!(pick.result, other);
        }
        let pick = strictest(vec![
            check(AuthResult::Pass, DmarcPolicy::Reject),
            check(AuthResult::Pass, DmarcPolicy::None),
        ]);
        assert_eq!(pick.result, AuthResult::Pass);
    }
}
