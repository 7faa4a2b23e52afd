//! The decision for a message, from the checks' results and the configuration: deliver,
//! quarantine, reject or tempfail. Pure: no I/O, no clock.

use crate::auth::results::{AuthReport, AuthResult, DmarcPolicy};
use crate::config::TempErrorAction;
use crate::rewrite::auth_results::OverrideNote;
use crate::smtp::reply::Reply;
use serde::Serialize;

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

#[derive(Clone, Debug)]
pub struct Verdict {
    pub action: Action,
    /// The reply for `Reject` and `Tempfail`; delivered mail gets the backend's reply.
    pub reply: Option<Reply>,
    /// Header fields to add (quarantine marker, policy tags).
    pub headers: Vec<(String, String)>,
    /// One line for logs and `explain`.
    pub reason: String,
    /// Set when a DMARC failure was not enforced.
    pub dmarc_override: Option<OverrideNote>,
}

impl Verdict {
    pub fn deliver(reason: impl Into<String>) -> Self {
        Verdict {
            action: Action::Deliver,
            reply: None,
            headers: Vec::new(),
            reason: reason.into(),
            dmarc_override: None,
        }
    }

    fn refuse(action: Action, reply: Reply, reason: impl Into<String>) -> Self {
        Verdict {
            action,
            reply: Some(reply),
            headers: Vec::new(),
            reason: reason.into(),
            dmarc_override: None,
        }
    }
}

/// DMARC enforcement settings (`dmarc:` in the config).
#[derive(Clone, Debug)]
pub struct DmarcSettings {
    pub enforce: bool,
    pub quarantine_header: (String, String),
    pub on_temperror: TempErrorAction,
    pub reject_invalid_from: bool,
}

/// Decides what happens to a message whose checks produced `report`.
pub fn decide(settings: &DmarcSettings, report: &AuthReport) -> Verdict {
    if settings.reject_invalid_from
        && let Some(problem) = report.from.problem()
    {
        return Verdict::refuse(
            Action::Reject,
            Reply::from_header_invalid(problem),
            format!("From header field: {problem}"),
        );
    }
    let dmarc = &report.dmarc;
    match dmarc.result {
        AuthResult::TempError => match settings.on_temperror {
            TempErrorAction::Tempfail => Verdict::refuse(
                Action::Tempfail,
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
            match dmarc.applied_policy {
                DmarcPolicy::Reject => Verdict::refuse(
                    Action::Reject,
                    Reply::dmarc_reject(&dmarc.domain, failure),
                    format!("DMARC p=reject failed for {} ({failure})", dmarc.domain),
                ),
                DmarcPolicy::Quarantine => {
                    let mut verdict = Verdict::deliver(format!(
                        "DMARC p=quarantine failed for {} ({failure})",
                        dmarc.domain
                    ));
                    verdict.action = Action::Quarantine;
                    verdict.headers.push(settings.quarantine_header.clone());
                    verdict
                }
                DmarcPolicy::None => Verdict::deliver(format!(
                    "DMARC failed for {} ({failure}); policy is none",
                    dmarc.domain
                )),
            }
        }
        result => Verdict::deliver(format!("DMARC {result}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::results::*;

    fn settings() -> DmarcSettings {
        DmarcSettings {
            enforce: true,
            quarantine_header: ("X-Spam-Flag".into(), "YES".into()),
            on_temperror: TempErrorAction::Tempfail,
            reject_invalid_from: true,
        }
    }

    fn report(result: AuthResult, policy: DmarcPolicy) -> AuthReport {
        let spf = SpfCheck {
            result: AuthResult::None,
            domain: "x.test".into(),
            identity: "a@x.test".into(),
            explanation: None,
        };
        AuthReport {
            iprev: IprevCheck {
                result: AuthResult::None,
                ptr: vec![],
                confirmed: vec![],
            },
            helo_spf: spf.clone(),
            spf,
            dkim: vec![],
            arc: ArcCheck {
                result: AuthResult::None,
                instances: 0,
                sealer: None,
                sealer_results: None,
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
            },
        }
    }

    #[test]
    fn dmarc_policies_are_enforced() {
        let v = decide(&settings(), &report(AuthResult::Fail, DmarcPolicy::Reject));
        assert_eq!(v.action, Action::Reject);
        let reply = v.reply.unwrap();
        assert_eq!(
            (reply.code(), reply.status().unwrap().to_string()),
            (550, "5.7.1".into())
        );
        assert!(reply.text().contains("sender.test"), "{reply}");
        let v = decide(
            &settings(),
            &report(AuthResult::Fail, DmarcPolicy::Quarantine),
        );
        assert_eq!(v.action, Action::Quarantine);
        assert_eq!(
            v.headers,
            vec![("X-Spam-Flag".to_string(), "YES".to_string())]
        );
        let v = decide(&settings(), &report(AuthResult::Fail, DmarcPolicy::None));
        assert_eq!(v.action, Action::Deliver);
        let v = decide(&settings(), &report(AuthResult::Pass, DmarcPolicy::Reject));
        assert_eq!(v.action, Action::Deliver);
    }

    #[test]
    fn temperror_defers_unless_configured() {
        let v = decide(
            &settings(),
            &report(AuthResult::TempError, DmarcPolicy::None),
        );
        assert_eq!(v.action, Action::Tempfail);
        assert_eq!(v.reply.unwrap().code(), 451);
        let mut accepting = settings();
        accepting.on_temperror = TempErrorAction::Accept;
        assert_eq!(
            decide(
                &accepting,
                &report(AuthResult::TempError, DmarcPolicy::None)
            )
            .action,
            Action::Deliver
        );
    }

    #[test]
    fn enforcement_can_be_off() {
        let mut off = settings();
        off.enforce = false;
        assert_eq!(
            decide(&off, &report(AuthResult::Fail, DmarcPolicy::Reject)).action,
            Action::Deliver
        );
    }

    #[test]
    fn invalid_from_is_rejected() {
        let mut r = report(AuthResult::None, DmarcPolicy::None);
        r.from.fields = 2;
        let v = decide(&settings(), &r);
        assert_eq!(v.action, Action::Reject);
        r.from.fields = 0;
        assert_eq!(decide(&settings(), &r).action, Action::Reject);
        r.from.fields = 1;
        r.from.domains.clear();
        assert_eq!(decide(&settings(), &r).action, Action::Reject);
    }
}
