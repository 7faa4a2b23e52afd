//! The decision for a message, from the checks' results and the configuration: deliver,
//! quarantine, reject or tempfail. Pure: no I/O, no clock.

use super::rules::{PolicyDecision, PolicyHit};
use crate::config::{DmarcSettings, TempErrorAction};
use crate::findings::{AuthReport, AuthResult, DmarcPolicy};
use crate::policy::RuleAction;
use crate::rewrite::auth_results::OverrideNote;
use crate::smtp::reply::Reply;
use serde::Serialize;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Deliver,
    Quarantine,
    Reject,
    Tempfail,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Deliver => "deliver",
            Action::Quarantine => "quarantine",
            Action::Reject => "reject",
            Action::Tempfail => "tempfail",
        }
    }
}

/// What happens to a message. A refusal carries its reply; delivered mail gets the
/// backend's reply, so there is none here.
#[derive(Clone, Debug)]
pub enum Verdict {
    Deliver {
        /// Marked with the quarantine header (and maybe sent to `redirect`).
        quarantine: bool,
        /// Header fields to add (quarantine marker, policy tags).
        headers: Vec<(String, String)>,
        /// Quarantine to this address instead of the recipients.
        redirect: Option<String>,
        /// Set when a DMARC failure was not enforced.
        dmarc_override: Option<OverrideNote>,
        why: Why,
    },
    /// Refused with `reply`: a 5xx is a reject, a 4xx a tempfail (the policy compiler
    /// and the reply constructors keep each action in its class).
    Refuse { reply: Reply, why: Why },
}

/// Why a verdict was reached: for logs, the transaction record and `explain`.
#[derive(Clone, Debug, Default)]
pub struct Why {
    /// One line for logs and `explain`.
    pub reason: String,
    /// The policy rule that decided, if any.
    pub rule: Option<Arc<str>>,
    /// What the own-domain guard decided, when From is one of our domains.
    pub own_domain: Option<super::own_domain::GuardNote>,
    /// A refusal for good deferred because DNS trouble kept evidence that would have
    /// spared the message from being checked: which evidence.
    pub temperror: Option<String>,
}

/// Evidence that lets a message through, three-valued like the policy's conditions
/// (`policy::Truth`): it holds, it could not be checked for DNS trouble, or it is
/// missing. What it carries says what the evidence is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proof<T> {
    Holds(T),
    Temperror(T),
    Missing,
}

impl Verdict {
    pub fn deliver(reason: impl Into<String>) -> Self {
        Verdict::Deliver {
            quarantine: false,
            headers: Vec::new(),
            redirect: None,
            dmarc_override: None,
            why: Why {
                reason: reason.into(),
                ..Why::default()
            },
        }
    }

    /// Delivered with the quarantine header, to `redirect` if set.
    pub fn quarantine(
        reason: impl Into<String>,
        header: (String, String),
        redirect: Option<String>,
    ) -> Self {
        Verdict::Deliver {
            quarantine: true,
            headers: vec![header],
            redirect,
            dmarc_override: None,
            why: Why {
                reason: reason.into(),
                ..Why::default()
            },
        }
    }

    pub fn refuse(reply: Reply, reason: impl Into<String>) -> Self {
        Verdict::Refuse {
            reply,
            why: Why {
                reason: reason.into(),
                ..Why::default()
            },
        }
    }

    pub fn action(&self) -> Action {
        match self {
            Verdict::Deliver {
                quarantine: false, ..
            } => Action::Deliver,
            Verdict::Deliver {
                quarantine: true, ..
            } => Action::Quarantine,
            Verdict::Refuse { reply, .. } if reply.is_permanent() => Action::Reject,
            Verdict::Refuse { .. } => Action::Tempfail,
        }
    }

    /// The refusal's reply; `None` for a message to deliver.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            Verdict::Refuse { reply, .. } => Some(reply),
            Verdict::Deliver { .. } => None,
        }
    }

    pub fn why(&self) -> &Why {
        match self {
            Verdict::Deliver { why, .. } | Verdict::Refuse { why, .. } => why,
        }
    }

    pub fn why_mut(&mut self) -> &mut Why {
        match self {
            Verdict::Deliver { why, .. } | Verdict::Refuse { why, .. } => why,
        }
    }

    pub fn reason(&self) -> &str {
        &self.why().reason
    }

    pub fn rule(&self) -> Option<&Arc<str>> {
        self.why().rule.as_ref()
    }

    pub fn own_domain(&self) -> Option<&super::own_domain::GuardNote> {
        self.why().own_domain.as_ref()
    }

    pub fn dmarc_override(&self) -> Option<&OverrideNote> {
        match self {
            Verdict::Deliver { dmarc_override, .. } => dmarc_override.as_ref(),
            Verdict::Refuse { .. } => None,
        }
    }

    pub fn headers(&self) -> &[(String, String)] {
        match self {
            Verdict::Deliver { headers, .. } => headers,
            Verdict::Refuse { .. } => &[],
        }
    }

    pub fn redirect(&self) -> Option<&str> {
        match self {
            Verdict::Deliver { redirect, .. } => redirect.as_deref(),
            Verdict::Refuse { .. } => None,
        }
    }

    fn with_override(mut self, note: OverrideNote) -> Self {
        if let Verdict::Deliver { dmarc_override, .. } = &mut self {
            *dmarc_override = Some(note);
        }
        self
    }
}

/// Decides with the policy's whole decision at the end of data: a refusal for good that
/// one of the rules DNS trouble left undecided would have spared (had it matched, the
/// verdict would not have been a 5xx) becomes a `451 4.7.5`. The sender retries, and
/// the rule is decided again then. A rule that cannot spare anything (a `reject`, or an
/// `accept` whose message is refused anyway) changes nothing.
pub fn decide_policy(
    settings: &DmarcSettings,
    report: Option<&AuthReport>,
    decision: &PolicyDecision,
) -> Verdict {
    let verdict = decide(settings, report, decision.hit.as_ref());
    if verdict.action() != Action::Reject {
        return verdict;
    }
    let spared = decision
        .temperror
        .iter()
        .find(|doubt| decide(settings, report, Some(doubt)).action() != Action::Reject);
    match spared {
        Some(doubt) => deferred(
            verdict,
            "the sender's allowlist evidence",
            format!("policy rule `{}` could not be decided", doubt.rule),
        ),
        None => verdict,
    }
}

/// `refused` as a `451 4.7.5`: evidence that would have spared it could not be checked.
/// `what` is for the client (no rule or host names), `why` for logs and `explain`.
pub fn deferred(refused: Verdict, what: &str, why: String) -> Verdict {
    let mut verdict = Verdict::refuse(
        Reply::evidence_temperror(what),
        format!("{}; deferred: {why} (DNS temperror)", refused.reason()),
    );
    let mut own_domain = refused.own_domain().cloned();
    if let Some(note) = &mut own_domain
        && note.decision == "refuse"
    {
        note.decision = "tempfail";
        note.reason = format!("{}; deferred: {why} (DNS temperror)", note.reason);
    }
    let out = verdict.why_mut();
    out.rule = refused.rule().cloned();
    out.own_domain = own_domain;
    out.temperror = Some(why);
    verdict
}

/// Decides what happens to a message: a policy rule's decision first, then DMARC on
/// the checks' `report` (absent when sender checks did not run), then the own-domain
/// guard.
pub fn decide(
    settings: &DmarcSettings,
    report: Option<&AuthReport>,
    policy: Option<&PolicyHit>,
) -> Verdict {
    let verdict = decide_policy_and_dmarc(settings, report, policy);
    super::own_domain::apply(settings, report, policy, verdict)
}

fn decide_policy_and_dmarc(
    settings: &DmarcSettings,
    report: Option<&AuthReport>,
    policy: Option<&PolicyHit>,
) -> Verdict {
    let Some(hit) = policy else {
        return match report {
            Some(report) => decide_dmarc(settings, report),
            None => Verdict::deliver("no sender checks ran"),
        };
    };
    let rule = format!("policy rule `{}`", hit.rule);
    // A rule decides whether the sender may be believed, not whether From can be read:
    // a From DMARC refuses (RFC 7489 6.6.1, and more than 10 domains whatever the
    // configuration) is refused after an accept or a quarantine too.
    if matches!(hit.action, RuleAction::Accept | RuleAction::Quarantine(_))
        && let Some(report) = report
        && let Some(refused) = from_refusal(settings, report)
    {
        let mut refused = refused;
        refused.why_mut().rule = Some(hit.rule.clone());
        return refused;
    }
    let mut verdict = match &hit.action {
        RuleAction::Reject(reply) => Verdict::refuse(reply.clone(), format!("{rule} rejects")),
        RuleAction::Tempfail(reply) => Verdict::refuse(reply.clone(), format!("{rule} defers")),
        RuleAction::Accept => {
            let verdict = Verdict::deliver(format!("{rule} accepts"));
            if report.is_some_and(|r| r.dmarc.result == AuthResult::Fail) {
                verdict.with_override(OverrideNote {
                    reason: rule.clone(),
                    kind: "local_policy",
                    sealer: None,
                })
            } else {
                verdict
            }
        }
        RuleAction::Quarantine(to) => {
            let verdict = Verdict::quarantine(
                format!("{rule} quarantines"),
                settings.quarantine_header.clone(),
                to.clone(),
            );
            // Delivered although DMARC asked for a rejection: say so, as for an accept.
            if report.is_some_and(|r| {
                r.dmarc.result == AuthResult::Fail && r.dmarc.applied_policy == DmarcPolicy::Reject
            }) {
                verdict.with_override(OverrideNote {
                    reason: rule.clone(),
                    kind: "local_policy",
                    sealer: None,
                })
            } else {
                verdict
            }
        }
        RuleAction::Tag(name, value) => {
            let mut verdict = match report {
                Some(report) => decide_dmarc(settings, report),
                None => Verdict::deliver("no sender checks ran"),
            };
            if let Verdict::Deliver { headers, why, .. } = &mut verdict {
                headers.push((name.clone(), value.clone()));
                why.reason = format!("{}; {rule} tags", why.reason);
            }
            verdict
        }
        // TLS rules never reach here: they are decided at MAIL.
        RuleAction::RequireTls | RuleAction::AllowPlaintext => match report {
            Some(report) => decide_dmarc(settings, report),
            None => Verdict::deliver("no sender checks ran"),
        },
    };
    verdict.why_mut().rule = Some(hit.rule.clone());
    verdict
}

/// The refusal of a From that cannot be evaluated (RFC 7489 6.6.1), if it is one.
fn from_refusal(settings: &DmarcSettings, report: &AuthReport) -> Option<Verdict> {
    // Too many author domains is a bound, not a matter of taste: refused either way.
    if !(settings.reject_invalid_from || report.from.too_many_domains()) {
        return None;
    }
    let problem = report.from.problem()?;
    Some(Verdict::refuse(
        Reply::from_header_invalid(problem),
        format!("From header field: {problem}"),
    ))
}

fn decide_dmarc(settings: &DmarcSettings, report: &AuthReport) -> Verdict {
    if let Some(refused) = from_refusal(settings, report) {
        return refused;
    }
    let dmarc = &report.dmarc;
    match dmarc.result {
        AuthResult::TempError => match settings.on_temperror {
            TempErrorAction::Tempfail => Verdict::refuse(
                Reply::dmarc_temperror(&dmarc.domain),
                format!("DMARC temperror for {}", dmarc.domain),
            ),
            TempErrorAction::Accept => Verdict::deliver(format!(
                "DMARC temperror for {} accepted by configuration",
                dmarc.domain
            )),
        },
        AuthResult::Fail => {
            let failure = dmarc.reason.as_deref().unwrap_or("not aligned");
            if !settings.enforce {
                return Verdict::deliver(format!(
                    "DMARC failed for {} ({failure}); enforcement is off",
                    dmarc.domain
                ));
            }
            let sealer = match dmarc.applied_policy {
                DmarcPolicy::None => Proof::Missing,
                _ => trusted_sealer_override(settings, report),
            };
            if let Proof::Holds(note) = sealer {
                return Verdict::deliver(format!(
                    "DMARC failed for {} ({failure}) but {}",
                    dmarc.domain, note.reason
                ))
                .with_override(note);
            }
            match dmarc.applied_policy {
                DmarcPolicy::Reject => {
                    let refused = Verdict::refuse(
                        Reply::dmarc_reject(&dmarc.domain, failure),
                        format!("DMARC p=reject failed for {} ({failure})", dmarc.domain),
                    );
                    match sealer {
                        Proof::Temperror(note) => deferred(
                            refused,
                            "a trusted ARC sealer's chain",
                            format!("{}, but its chain could not be validated", note.reason),
                        ),
                        _ => refused,
                    }
                }
                DmarcPolicy::Quarantine => Verdict::quarantine(
                    format!("DMARC p=quarantine failed for {} ({failure})", dmarc.domain),
                    settings.quarantine_header.clone(),
                    None,
                ),
                DmarcPolicy::None => Verdict::deliver(format!(
                    "DMARC failed for {} ({failure}); policy is none",
                    dmarc.domain
                )),
            }
        }
        result => Verdict::deliver(format!("DMARC {result}")),
    }
}

/// RFC 8617 section 7.2: a DMARC failure may be overridden by the verdict of an ARC
/// sealer the receiver trusts. All of these must hold:
/// - the chain validates here (`arc=pass`): every seal verified with its domain's key,
///   so an attacker cannot borrow a trusted domain's name;
/// - the newest seal was made by a sealer in `arc.trusted_sealers` (a chain an attacker
///   sealed himself ends with his own domain);
/// - that sealer's ARC-Authentication-Results says DMARC passed for this From domain,
///   or SPF or DKIM passed for an identifier aligned with it.
///
/// `Temperror` when the last two hold but validation ended in a temperror (DNS trouble,
/// or unfinished at `auth.timeouts.end_of_data`), and only when the newest
/// ARC-Message-Signature is the sealer's own: validation looks up its key first and the
/// newest seal's next, both in the sealer's zone, so a chain an attacker forged in the
/// sealer's name fails there, and cannot end in a temperror through a key of his own.
pub fn trusted_sealer_override(
    settings: &DmarcSettings,
    report: &AuthReport,
) -> Proof<OverrideNote> {
    let Some(note) = sealer_record(settings, report) else {
        return Proof::Missing;
    };
    let signed_by_sealer = report
        .arc
        .signer
        .as_deref()
        .zip(report.arc.sealer.as_deref())
        .is_some_and(|(signer, sealer)| signer.eq_ignore_ascii_case(sealer));
    match report.arc.result {
        AuthResult::Pass => Proof::Holds(note),
        AuthResult::TempError if signed_by_sealer => Proof::Temperror(note),
        _ => Proof::Missing,
    }
}

/// What the newest ARC set says, if it is a trusted sealer's and records a pass for our
/// From domain; whether the chain validates is for the caller.
fn sealer_record(settings: &DmarcSettings, report: &AuthReport) -> Option<OverrideNote> {
    let sealer = report.arc.sealer.as_deref()?;
    if !settings
        .trusted_sealers
        .iter()
        .any(|t| t.eq_ignore_ascii_case(sealer))
    {
        return None;
    }
    // Our From domain, from our one reading of the header section; with several From
    // domains no single sealer verdict can vouch for all of them.
    let from = match report.from.domains.as_slice() {
        [one] if one.eq_ignore_ascii_case(&report.dmarc.domain) => one.as_str(),
        _ => return None,
    };
    let results = crate::auth::resinfo::parse(report.arc.sealer_results.as_deref()?);
    let passed = |method: &'static str| {
        results
            .iter()
            .filter(move |r| r.method == method && r.result == "pass")
    };
    // The sealer's dmarc=pass counts only for the very domain DMARC failed for here: a
    // result without `header.from` could be about any message.
    let dmarc_pass = passed("dmarc").any(|r| {
        r.property("header.from")
            .is_some_and(|d| !from.is_empty() && d.eq_ignore_ascii_case(from))
    });
    let spf_aligned = passed("spf").any(|r| {
        r.property("smtp.mailfrom")
            .map(|v| v.rsplit('@').next().unwrap_or(v))
            .is_some_and(|d| aligned(d, from))
    });
    let dkim_aligned = passed("dkim").any(|r| {
        r.property("header.d")
            .or_else(|| {
                r.property("header.i")
                    .map(|i| i.rsplit('@').next().unwrap_or(i))
            })
            .is_some_and(|d| aligned(d, from))
    });
    let evidence = if dmarc_pass {
        "dmarc=pass"
    } else if dkim_aligned {
        "an aligned dkim=pass"
    } else if spf_aligned {
        "an aligned spf=pass"
    } else {
        return None;
    };
    Some(OverrideNote {
        reason: format!("trusted ARC sealer {sealer} recorded {evidence}"),
        kind: "local_policy",
        sealer: Some(sealer.to_ascii_lowercase()),
    })
}

/// Alignment without a public suffix list: the identifier is the From domain or a
/// subdomain of it. Never a parent: without knowing the organizational domain, `co.uk`
/// would be "aligned" with `victim.co.uk`.
fn aligned(identifier: &str, from: &str) -> bool {
    let (a, b) = (
        identifier.trim_end_matches('.').to_ascii_lowercase(),
        from.to_ascii_lowercase(),
    );
    !b.is_empty() && (a == b || a.ends_with(&format!(".{b}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::findings::*;

    fn settings() -> DmarcSettings {
        DmarcSettings {
            enforce: true,
            quarantine_header: ("X-Spam-Flag".into(), "YES".into()),
            on_temperror: TempErrorAction::Tempfail,
            reject_invalid_from: true,
            trusted_sealers: vec!["sealer.test".into()],
            protect_own_domains: true,
            own_domains: vec![],
        }
    }

    fn report(result: AuthResult, policy: DmarcPolicy) -> AuthReport {
        let spf = SpfCheck {
            result: AuthResult::None,
            domain: "x.test".into(),
            identity: "a@x.test".into(),
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
                result,
                domain: "sender.test".into(),
                policy,
                applied_policy: policy,
                spf_aligned: false,
                dkim_aligned: false,
                pct: None,
                reason: Some("no SPF pass, no DKIM pass".into()),
            },
            from: FromHeader {
                fields: 1,
                addresses: vec!["a@sender.test".into()],
                domains: vec!["sender.test".into()],
                unusable: Vec::new(),
            },
        }
    }

    #[test]
    fn dmarc_policies_are_enforced() {
        let v = decide(
            &settings(),
            Some(&report(AuthResult::Fail, DmarcPolicy::Reject)),
            None,
        );
        assert_eq!(v.action(), Action::Reject);
        let reply = v.reply().unwrap().clone();
        assert_eq!(
            (reply.code(), reply.status().unwrap().to_string()),
            (550, "5.7.1".into())
        );
        assert!(reply.text().contains("sender.test"), "{reply}");
        let v = decide(
            &settings(),
            Some(&report(AuthResult::Fail, DmarcPolicy::Quarantine)),
            None,
        );
        assert_eq!(v.action(), Action::Quarantine);
        assert_eq!(
            v.headers(),
            vec![("X-Spam-Flag".to_string(), "YES".to_string())]
        );
        let v = decide(
            &settings(),
            Some(&report(AuthResult::Fail, DmarcPolicy::None)),
            None,
        );
        assert_eq!(v.action(), Action::Deliver);
        let v = decide(
            &settings(),
            Some(&report(AuthResult::Pass, DmarcPolicy::Reject)),
            None,
        );
        assert_eq!(v.action(), Action::Deliver);
    }

    #[test]
    fn temperror_defers_unless_configured() {
        let v = decide(
            &settings(),
            Some(&report(AuthResult::TempError, DmarcPolicy::None)),
            None,
        );
        assert_eq!(v.action(), Action::Tempfail);
        assert_eq!(v.reply().unwrap().clone().code(), 451);
        let mut accepting = settings();
        accepting.on_temperror = TempErrorAction::Accept;
        assert_eq!(
            decide(
                &accepting,
                Some(&report(AuthResult::TempError, DmarcPolicy::None)),
                None
            )
            .action(),
            Action::Deliver
        );
    }

    #[test]
    fn enforcement_can_be_off() {
        let mut off = settings();
        off.enforce = false;
        assert_eq!(
            decide(
                &off,
                Some(&report(AuthResult::Fail, DmarcPolicy::Reject)),
                None
            )
            .action(),
            Action::Deliver
        );
    }

    #[test]
    fn invalid_from_is_rejected() {
        let mut r = report(AuthResult::None, DmarcPolicy::None);
        r.from.fields = 2;
        let v = decide(&settings(), Some(&r), None);
        assert_eq!(v.action(), Action::Reject);
        r.from.fields = 0;
        assert_eq!(decide(&settings(), Some(&r), None).action(), Action::Reject);
        r.from.fields = 1;
        r.from.domains.clear();
        assert_eq!(decide(&settings(), Some(&r), None).action(), Action::Reject);
    }

    #[test]
    fn too_many_author_domains_are_refused_even_when_invalid_from_is_allowed() {
        let mut r = report(AuthResult::None, DmarcPolicy::None);
        r.from.fields = 1;
        r.from.domains = (0..10).map(|i| format!("d{i}.test")).collect();
        let mut lenient = settings();
        lenient.reject_invalid_from = false;
        assert_eq!(decide(&lenient, Some(&r), None).action(), Action::Deliver);
        r.from.domains.push("d10.test".into());
        let v = decide(&lenient, Some(&r), None);
        assert_eq!(v.action(), Action::Reject);
        assert_eq!(v.reply().unwrap().clone().code(), 550);
    }
}

#[cfg(test)]
mod override_tests {
    use super::*;
    use crate::findings::*;

    fn failing(sealer: &str, arc: AuthResult, aar: &str) -> AuthReport {
        let spf = SpfCheck {
            result: AuthResult::Fail,
            domain: "relay.test".into(),
            identity: "a@relay.test".into(),
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
                result: arc,
                instances: 1,
                sealer: Some(sealer.into()),
                sealer_results: Some(aar.into()),
                signer: None,
                reason: None,
            },
            dmarc: DmarcCheck {
                result: AuthResult::Fail,
                domain: "netvisor.fi".into(),
                policy: DmarcPolicy::Reject,
                applied_policy: DmarcPolicy::Reject,
                spf_aligned: false,
                dkim_aligned: false,
                pct: None,
                reason: None,
            },
            from: FromHeader {
                fields: 1,
                addresses: vec!["noreply@netvisor.fi".into()],
                domains: vec!["netvisor.fi".into()],
                unusable: Vec::new(),
            },
        }
    }

    fn settings() -> DmarcSettings {
        DmarcSettings {
            enforce: true,
            quarantine_header: ("X-Spam-Flag".into(), "YES".into()),
            on_temperror: TempErrorAction::Tempfail,
            reject_invalid_from: true,
            trusted_sealers: vec!["edge.example".into()],
            protect_own_domains: true,
            own_domains: vec![],
        }
    }

    const GOOD_AAR: &str = "i=1; mx.edge.example; spf=pass smtp.mailfrom=bounce@amazonses.com; dkim=pass header.d=amazonses.com; dmarc=pass header.from=netvisor.fi";

    #[test]
    fn trusted_passing_chain_overrides() {
        let verdict = decide(
            &settings(),
            Some(&failing("edge.example", AuthResult::Pass, GOOD_AAR)),
            None,
        );
        assert_eq!(verdict.action(), Action::Deliver);
        let note = verdict.dmarc_override().unwrap();
        assert_eq!(note.sealer.as_deref(), Some("edge.example"));
        assert!(note.reason.contains("dmarc=pass"), "{}", note.reason);
    }

    #[test]
    fn aligned_dkim_in_the_aar_is_enough() {
        let aar = "i=1; mx.edge.example; dkim=pass header.d=netvisor.fi; dmarc=none";
        assert_eq!(
            decide(
                &settings(),
                Some(&failing("edge.example", AuthResult::Pass, aar)),
                None
            )
            .action(),
            Action::Deliver
        );
    }

    /// The sender chose a MAIL FROM whose quoted local part holds `@netvisor.fi\"`:
    /// the trusted sealer quoted it correctly, and the escaped quote must not end the
    /// value early and leave `@netvisor.fi` as an aligned SPF domain.
    #[test]
    fn an_escaped_quote_cannot_forge_an_aligned_spf_pass() {
        let aar = r#"i=1; mx.edge.example; spf=pass smtp.mailfrom="@netvisor.fi\" x"@attacker.test; dmarc=fail header.from=netvisor.fi"#;
        let aar_quoted = r#"i=1; mx.edge.example; spf=pass smtp.mailfrom="@netvisor.fi\" x@attacker.test"; dmarc=fail header.from=netvisor.fi"#;
        for aar in [aar, aar_quoted] {
            let verdict = decide(
                &settings(),
                Some(&failing("edge.example", AuthResult::Pass, aar)),
                None,
            );
            assert_eq!(verdict.action(), Action::Reject, "{aar}");
        }
    }

    #[test]
    fn no_override_without_every_condition() {
        // Broken chain.
        assert_eq!(
            decide(
                &settings(),
                Some(&failing("edge.example", AuthResult::Fail, GOOD_AAR)),
                None
            )
            .action(),
            Action::Reject
        );
        // A sealer nobody trusts (e.g. the attacker's own seal).
        assert_eq!(
            decide(
                &settings(),
                Some(&failing("attacker.test", AuthResult::Pass, GOOD_AAR)),
                None
            )
            .action(),
            Action::Reject
        );
        // The trusted sealer did not see a pass either.
        let aar = "i=1; mx.edge.example; spf=pass smtp.mailfrom=x@amazonses.com; dmarc=fail header.from=netvisor.fi";
        assert_eq!(
            decide(
                &settings(),
                Some(&failing("edge.example", AuthResult::Pass, aar)),
                None
            )
            .action(),
            Action::Reject
        );
        // A pass recorded for another From domain.
        let aar = "i=1; mx.edge.example; dmarc=pass header.from=other.test";
        assert_eq!(
            decide(
                &settings(),
                Some(&failing("edge.example", AuthResult::Pass, aar)),
                None
            )
            .action(),
            Action::Reject
        );
        // A dmarc=pass that does not say for which From domain.
        let aar = "i=1; mx.edge.example; spf=fail smtp.mailfrom=x@y.test; dmarc=pass";
        assert_eq!(
            decide(
                &settings(),
                Some(&failing("edge.example", AuthResult::Pass, aar)),
                None
            )
            .action(),
            Action::Reject
        );
        // A pass for a parent domain or a look-alike is not a pass for ours.
        for aar in [
            "i=1; mx.edge.example; dmarc=pass header.from=fi",
            "i=1; mx.edge.example; dkim=pass header.d=fi; dmarc=fail header.from=netvisor.fi",
            "i=1; mx.edge.example; spf=pass smtp.mailfrom=a@fi; dmarc=fail header.from=netvisor.fi",
            "i=1; mx.edge.example; dkim=pass header.d=evilnetvisor.fi; dmarc=fail header.from=netvisor.fi",
            "i=1; mx.edge.example; dmarc=pass header.from=netvisor.fi.evil",
        ] {
            assert_eq!(
                decide(
                    &settings(),
                    Some(&failing("edge.example", AuthResult::Pass, aar)),
                    None
                )
                .action(),
                Action::Reject,
                "{aar}"
            );
        }
        // A subdomain of ours that passed DKIM is aligned.
        let aar = "i=1; mx.edge.example; dkim=pass header.d=mail.netvisor.fi; dmarc=fail header.from=netvisor.fi";
        assert_eq!(
            decide(
                &settings(),
                Some(&failing("edge.example", AuthResult::Pass, aar)),
                None
            )
            .action(),
            Action::Deliver
        );
        // A pass hidden in a comment.
        let aar = "i=1; mx.edge.example; spf=fail (dmarc=pass header.from=netvisor.fi) smtp.mailfrom=x@y.test";
        assert_eq!(
            decide(
                &settings(),
                Some(&failing("edge.example", AuthResult::Pass, aar)),
                None
            )
            .action(),
            Action::Reject
        );
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;
    use crate::findings::*;

    fn settings() -> DmarcSettings {
        DmarcSettings {
            enforce: true,
            quarantine_header: ("X-Spam-Flag".into(), "YES".into()),
            on_temperror: TempErrorAction::Tempfail,
            reject_invalid_from: true,
            trusted_sealers: vec![],
            protect_own_domains: true,
            own_domains: vec![],
        }
    }

    fn failing() -> AuthReport {
        let spf = SpfCheck {
            result: AuthResult::Fail,
            domain: "customer.test".into(),
            identity: "a@customer.test".into(),
            explanation: None,
            reason: None,
            reason_kind: None,
        };
        AuthReport {
            iprev: IprevCheck {
                result: AuthResult::Pass,
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
                result: AuthResult::Fail,
                domain: "customer.test".into(),
                policy: DmarcPolicy::Reject,
                applied_policy: DmarcPolicy::Reject,
                spf_aligned: false,
                dkim_aligned: false,
                pct: None,
                reason: None,
            },
            from: FromHeader {
                fields: 1,
                addresses: vec!["a@customer.test".into()],
                domains: vec!["customer.test".into()],
                unusable: Vec::new(),
            },
        }
    }

    fn hit(action: RuleAction) -> PolicyHit {
        PolicyHit {
            rule: "r".into(),
            action,
            stage: crate::policy::Stage::Data,
            evidence: false,
        }
    }

    #[test]
    fn accept_overrides_a_dmarc_failure_and_says_so() {
        let v = decide(
            &settings(),
            Some(&failing()),
            Some(&hit(RuleAction::Accept)),
        );
        assert_eq!(v.action(), Action::Deliver);
        assert_eq!(v.dmarc_override().unwrap().reason, "policy rule `r`");
        assert_eq!(v.rule().map(|r| &**r), Some("r"));
    }

    #[test]
    fn tag_leaves_dmarc_in_charge() {
        let v = decide(
            &settings(),
            Some(&failing()),
            Some(&hit(RuleAction::Tag("X-T".into(), "1".into()))),
        );
        assert_eq!(v.action(), Action::Reject, "a tag does not allowlist");
        let mut passing = failing();
        passing.dmarc.result = AuthResult::Pass;
        let v = decide(
            &settings(),
            Some(&passing),
            Some(&hit(RuleAction::Tag("X-T".into(), "1".into()))),
        );
        assert_eq!(v.headers(), [("X-T".to_string(), "1".to_string())]);
    }

    #[test]
    fn quarantine_and_refusals() {
        let v = decide(
            &settings(),
            Some(&failing()),
            Some(&hit(RuleAction::Quarantine(Some("q@example.test".into())))),
        );
        assert_eq!(v.action(), Action::Quarantine);
        assert_eq!(v.redirect(), Some("q@example.test"));
        assert_eq!(v.headers()[0].0, "X-Spam-Flag");
        let v = decide(
            &settings(),
            None,
            Some(&hit(RuleAction::Tempfail(Reply::policy_tempfail_default(
                "r",
            )))),
        );
        assert_eq!(
            (v.action(), v.reply().unwrap().clone().code()),
            (Action::Tempfail, 451)
        );
    }
}
