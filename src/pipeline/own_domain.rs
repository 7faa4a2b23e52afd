//! The own-domain guard (`dmarc.protect_own_domains`, on by default): a message from an
//! untrusted client whose header From is in one of our own domains (`server.domains`,
//! or a name below one) is refused with `550 5.7.1` unless
//! - it passes DMARC (or, where our domain publishes no usable DMARC record, SPF or DKIM
//!   passes for an identifier aligned with it), or a trusted ARC sealer recorded such a
//!   pass; or
//! - an `accept` policy rule with evidence decided it (a forward-confirmed host, an IP,
//!   an SPF record, a DKIM domain, ...: `own_domain: true` alone is not evidence).
//!
//! whatever policy the domain publishes: most companies publish `p=none`, and then
//! anyone could write the CEO's address to the staff. Trusted networks never get here
//! (no sender checks run for them), which is where the company's own servers belong.
//!
//! Pure: no I/O. The caller logs and counts what the guard decided.

use super::rules::PolicyHit;
use super::verdict::{Action, Proof, Verdict, deferred, trusted_sealer_override};
use crate::config::DmarcSettings;
use crate::findings::{AuthReport, AuthResult};
use crate::policy::RuleAction;
use crate::smtp::reply::Reply;
use serde::Serialize;

/// What the guard decided about a message From one of our domains.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GuardNote {
    /// The own domain in From.
    pub domain: String,
    /// `pass`, `refuse`, `tempfail`, or `not_applied` (refused anyway).
    pub decision: &'static str,
    /// Why, in words.
    pub reason: String,
}

/// Whether `name` is `domain` or a name below it (both lowercase, no trailing dot).
fn at_or_below(name: &str, domain: &str) -> bool {
    let name = name.trim_end_matches('.');
    name.eq_ignore_ascii_case(domain)
        || (name.len() > domain.len() + 1
            && name.as_bytes()[name.len() - domain.len() - 1] == b'.'
            && name[name.len() - domain.len()..].eq_ignore_ascii_case(domain))
}

/// The configured domain `domain` is at or below, if it is one of ours.
pub fn own_base<'a>(domain: &str, own: &'a [String]) -> Option<&'a str> {
    own.iter()
        .map(String::as_str)
        .find(|base| at_or_below(domain, base))
}

/// Whether every From address is in one of our domains (the `own_domain` policy fact).
/// No From address, or one without a usable domain, is not ours.
pub fn all_own(addresses: &[String], own: &[String]) -> bool {
    !addresses.is_empty()
        && addresses.iter().all(|a| {
            a.rsplit_once('@')
                .is_some_and(|(_, d)| own_base(d, own).is_some())
        })
}

/// Applies the guard to the verdict made from the policy and DMARC.
pub fn apply(
    settings: &DmarcSettings,
    report: Option<&AuthReport>,
    policy: Option<&PolicyHit>,
    mut verdict: Verdict,
) -> Verdict {
    if !settings.protect_own_domains {
        return verdict;
    }
    // No sender checks ran (trusted network, or `auth.enabled: false`): nothing to judge.
    let Some(report) = report else {
        return verdict;
    };
    let Some(domain) = report
        .from
        .domains
        .iter()
        .find(|d| own_base(d, &settings.own_domains).is_some())
        .cloned()
    else {
        return verdict;
    };
    let note = |decision, reason: String| {
        Some(GuardNote {
            domain: domain.clone(),
            decision,
            reason,
        })
    };
    if let Verdict::Refuse { why, .. } = &mut verdict {
        why.own_domain = note("not_applied", "the message is refused anyway".into());
        return verdict;
    }
    let unsure = match proof(settings, report, policy, &domain) {
        Proof::Holds(why) => {
            verdict.why_mut().own_domain = note("pass", why);
            return verdict;
        }
        Proof::Temperror(what) => Some(what),
        Proof::Missing => None,
    };
    let rule = verdict.rule().cloned();
    let mut refused = if report.dmarc.result == AuthResult::TempError {
        let mut v = Verdict::refuse(
            Reply::dmarc_temperror(&domain),
            format!(
                "own-domain guard: From {domain} is ours and DMARC could not be evaluated (DNS error)"
            ),
        );
        v.why_mut().own_domain = note("tempfail", "DMARC temperror".into());
        v
    } else {
        let why = if report.from.domains.len() > 1 {
            "the From field also names other domains, so only an accept rule with evidence can vouch for it".to_string()
        } else {
            format!(
                "dmarc={} and no accept rule with evidence matched",
                report.dmarc.result
            )
        };
        let mut v = Verdict::refuse(
            Reply::own_domain_spoof(&domain),
            format!("own-domain guard: From {domain} is ours but {why}"),
        );
        v.why_mut().own_domain = note("refuse", why);
        v
    };
    refused.why_mut().rule = rule;
    match unsure {
        // Already a 4xx when DMARC itself could not be evaluated.
        Some(what) if refused.action() == Action::Reject => {
            deferred(refused, "the sender's authentication", what)
        }
        _ => refused,
    }
}

/// What lets a message From our `domain` through, if anything; `Temperror` when only
/// DNS trouble kept a proof from holding: an SPF or DKIM check for an identifier
/// aligned with our domain (so a look-up in our own zone, or a key our own domain
/// publishes), or a trusted sealer's chain (see `trusted_sealer_override`).
fn proof(
    settings: &DmarcSettings,
    report: &AuthReport,
    policy: Option<&PolicyHit>,
    domain: &str,
) -> Proof<String> {
    if let Some(hit) = policy
        && hit.action == RuleAction::Accept
        && hit.evidence
    {
        return Proof::Holds(format!("policy rule `{}` accepts on evidence", hit.rule));
    }
    // Several From domains: the DMARC result is a summary (the strictest failure, or
    // one of the passes), which cannot vouch for each domain.
    if report.from.domains.len() != 1 {
        return Proof::Missing;
    }
    let mut unsure = None;
    match report.dmarc.result {
        AuthResult::Pass => return Proof::Holds("dmarc=pass".into()),
        // No usable DMARC record of ours: alignment is judged here, relaxed, with the
        // configured domain as the organizational domain.
        AuthResult::None | AuthResult::PermError => {
            let Some(base) = own_base(domain, &settings.own_domains) else {
                return Proof::Missing;
            };
            let spf_aligned = at_or_below(&report.spf.domain, base);
            if report.spf.result == AuthResult::Pass && spf_aligned {
                return Proof::Holds(format!(
                    "no DMARC record; spf=pass for {} is aligned",
                    report.spf.domain
                ));
            }
            let dkim = |result| {
                report
                    .dkim
                    .iter()
                    .find(move |d| d.result == result && at_or_below(&d.domain, base))
            };
            if let Some(dkim) = dkim(AuthResult::Pass) {
                return Proof::Holds(format!(
                    "no DMARC record; dkim=pass for d={} is aligned",
                    dkim.domain
                ));
            }
            if report.spf.result == AuthResult::TempError && spf_aligned {
                unsure = Some(format!(
                    "no DMARC record; spf for {} is aligned but could not be evaluated",
                    report.spf.domain
                ));
            } else if let Some(dkim) = dkim(AuthResult::TempError) {
                unsure = Some(format!(
                    "no DMARC record; dkim for d={} is aligned but could not be verified",
                    dkim.domain
                ));
            }
        }
        _ => {}
    }
    match (trusted_sealer_override(settings, report), unsure) {
        (Proof::Holds(note), _) => Proof::Holds(note.reason),
        (_, Some(what)) => Proof::Temperror(what),
        (Proof::Temperror(note), None) => Proof::Temperror(format!(
            "{}, but its chain could not be validated",
            note.reason
        )),
        (Proof::Missing, None) => Proof::Missing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TempErrorAction;
    use crate::findings::*;
    use crate::pipeline::verdict::Action;

    fn settings() -> DmarcSettings {
        DmarcSettings {
            enforce: true,
            quarantine_header: ("X-Spam-Flag".into(), "YES".into()),
            on_temperror: TempErrorAction::Tempfail,
            reject_invalid_from: true,
            trusted_sealers: vec!["edge.test".into()],
            protect_own_domains: true,
            own_domains: vec!["example.test".into()],
        }
    }

    fn report(from: &str, dmarc: AuthResult) -> AuthReport {
        let domain = from.rsplit_once('@').unwrap().1.to_string();
        let spf = SpfCheck {
            result: AuthResult::None,
            domain: "attacker.test".into(),
            identity: "x@attacker.test".into(),
            explanation: None,
            reason: None,
            reason_kind: None,
        };
        AuthReport {
            iprev: IprevCheck {
                result: AuthResult::None,
                ptr: vec![],
                confirmed: vec![],
                unsure: vec![],
            },
            helo_spf: spf.clone(),
            spf,
            dkim: vec![],
            arc: ArcCheck {
                result: AuthResult::None,
                instances: 0,
                sealer: None,
                sealer_results: None,
                signer: None,
                reason: None,
            },
            dmarc: DmarcCheck {
                result: dmarc,
                domain: domain.clone(),
                policy: DmarcPolicy::None,
                applied_policy: DmarcPolicy::None,
                spf_aligned: false,
                dkim_aligned: false,
                pct: None,
                reason: None,
            },
            from: FromHeader {
                fields: 1,
                addresses: vec![from.into()],
                domains: vec![domain],
                unusable: Vec::new(),
            },
        }
    }

    fn hit(action: RuleAction, evidence: bool) -> PolicyHit {
        PolicyHit {
            rule: "r".into(),
            action,
            stage: crate::policy::Stage::Data,
            evidence,
        }
    }

    fn decide(report: &AuthReport, policy: Option<&PolicyHit>) -> Verdict {
        super::super::verdict::decide(&settings(), Some(report), policy)
    }

    #[test]
    fn names_at_or_below_our_domains_are_ours() {
        let own = vec!["example.test".to_string()];
        assert_eq!(own_base("example.test", &own), Some("example.test"));
        assert_eq!(own_base("HR.Example.Test.", &own), Some("example.test"));
        assert_eq!(own_base("badexample.test", &own), None);
        assert_eq!(own_base("example.test.evil", &own), None);
        assert!(all_own(
            &["a@example.test".into(), "b@x.example.test".into()],
            &own
        ));
        assert!(!all_own(
            &["a@example.test".into(), "b@other.test".into()],
            &own
        ));
        assert!(!all_own(&[], &own));
    }

    #[test]
    fn a_spoof_under_p_none_is_refused() {
        let v = decide(&report("ceo@example.test", AuthResult::Fail), None);
        assert_eq!(v.action(), Action::Reject);
        let reply = v.reply().unwrap().clone();
        assert_eq!(
            (
                reply.code(),
                reply.status().unwrap().to_string(),
                reply.reason().as_label()
            ),
            (550, "5.7.1".into(), "own_domain")
        );
        assert_eq!(v.own_domain().unwrap().decision, "refuse");
        // Subdomains count; no DMARC record at all is no proof either.
        let v = decide(&report("ceo@hr.example.test", AuthResult::None), None);
        assert_eq!(v.action(), Action::Reject);
        // Other domains are not the guard's business.
        let v = decide(&report("ceo@other.test", AuthResult::Fail), None);
        assert_eq!((v.action(), v.own_domain()), (Action::Deliver, None));
    }

    #[test]
    fn the_guard_can_be_switched_off() {
        let mut off = settings();
        off.protect_own_domains = false;
        let v = super::super::verdict::decide(
            &off,
            Some(&report("ceo@example.test", AuthResult::Fail)),
            None,
        );
        assert_eq!(v.action(), Action::Deliver);
    }

    #[test]
    fn proof_lets_own_domain_mail_through() {
        assert_eq!(
            decide(&report("ceo@example.test", AuthResult::Pass), None).action(),
            Action::Deliver
        );
        // No DMARC record, but DKIM by our domain passed.
        let mut r = report("ceo@example.test", AuthResult::None);
        r.dkim.push(DkimCheck {
            result: AuthResult::Pass,
            domain: "example.test".into(),
            selector: "s".into(),
            algorithm: "rsa-sha256".into(),
            b: String::new(),
            reason: None,
        });
        let v = decide(&r, None);
        assert_eq!(v.action(), Action::Deliver, "{}", v.reason());
        // ...but not when our published DMARC says the message fails.
        r.dmarc.result = AuthResult::Fail;
        r.dkim[0].domain = "attacker.test".into();
        assert_eq!(decide(&r, None).action(), Action::Reject);
        let r = report("ceo@example.test", AuthResult::Fail);
        let v = decide(&r, Some(&hit(RuleAction::Accept, true)));
        assert_eq!(v.action(), Action::Deliver);
        assert_eq!(v.own_domain().unwrap().decision, "pass");
    }

    #[test]
    fn rules_without_evidence_do_not_lift_the_guard() {
        let r = report("ceo@example.test", AuthResult::Fail);
        for action in [
            RuleAction::Accept,
            RuleAction::Quarantine(None),
            RuleAction::Tag("X-T".into(), "1".into()),
        ] {
            let v = decide(&r, Some(&hit(action.clone(), false)));
            assert_eq!(v.action(), Action::Reject, "{action:?}");
            assert_eq!(v.rule().map(|r| &**r), Some("r"));
        }
        // A quarantine rule with evidence quarantines, it does not deliver outright:
        // only `accept` lifts the guard.
        let v = decide(&r, Some(&hit(RuleAction::Quarantine(None), true)));
        assert_eq!(v.action(), Action::Reject);
    }

    #[test]
    fn several_from_domains_need_a_rule() {
        let mut r = report("ceo@example.test", AuthResult::Pass);
        r.from.addresses.push("x@other.test".into());
        r.from.domains.push("other.test".into());
        assert_eq!(decide(&r, None).action(), Action::Reject);
        assert_eq!(
            decide(&r, Some(&hit(RuleAction::Accept, true))).action(),
            Action::Deliver
        );
    }

    #[test]
    fn dns_trouble_defers() {
        let mut accepting = settings();
        accepting.on_temperror = TempErrorAction::Accept;
        let v = super::super::verdict::decide(
            &accepting,
            Some(&report("ceo@example.test", AuthResult::TempError)),
            None,
        );
        assert_eq!(
            (v.action(), v.reply().unwrap().clone().code()),
            (Action::Tempfail, 451)
        );
    }

    #[test]
    fn a_trusted_sealers_pass_counts() {
        let mut r = report("ceo@example.test", AuthResult::Fail);
        r.arc.result = AuthResult::Pass;
        r.arc.sealer = Some("edge.test".into());
        r.arc.sealer_results =
            Some("i=1; mx.edge.test; dmarc=pass header.from=example.test".into());
        assert_eq!(decide(&r, None).action(), Action::Deliver);
        r.arc.sealer = Some("attacker.test".into());
        assert_eq!(decide(&r, None).action(), Action::Reject);
    }
}
