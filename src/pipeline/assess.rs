//! Putting the checks together: the envelope checks that ran while the client talked,
//! then the message checks, into one [`AuthReport`]. Shared by the SMTP path and
//! `mxgate explain`, so both judge a message the same way.

use super::{Connection, Transaction};
use crate::auth::{Authenticator, Budget, MessageVerification};
use crate::findings::{
    ArcCheck, AuthReport, AuthResult, DmarcCheck, DmarcPolicy, FromHeader, IprevCheck, SpfCheck,
};
use mail_auth::AuthenticatedMessage;

/// Results of the checks made before the message arrived.
#[derive(Clone, Debug)]
pub struct EnvelopeChecks {
    pub iprev: IprevCheck,
    pub helo_spf: SpfCheck,
    pub spf: SpfCheck,
}

impl EnvelopeChecks {
    /// Runs the envelope checks one after another (for `explain`; the SMTP path starts
    /// them as early as the protocol allows). `trusted_hosts`: the policy's
    /// (`Policy::trusted_hosts`).
    pub async fn run(
        auth: &Authenticator,
        ip: std::net::IpAddr,
        helo: &str,
        mail_from: &str,
        trusted_hosts: &[String],
    ) -> Self {
        let (iprev, helo_spf, spf) = tokio::join!(
            auth.iprev(ip, trusted_hosts),
            auth.spf_helo(ip, helo),
            auth.spf_mail_from(ip, helo, mail_from)
        );
        EnvelopeChecks {
            iprev,
            helo_spf,
            spf,
        }
    }
}

impl Connection {
    /// Waits for the checks started at connect, HELO and MAIL. A check that died is a
    /// temperror: nothing certain can be said.
    pub(super) async fn envelope_checks(&mut self, tx: &mut Transaction) -> EnvelopeChecks {
        let helo = self.helo.clone().unwrap_or_default();
        let iprev = match &mut self.iprev {
            Some(pending) => pending.get().await.cloned(),
            None => None,
        }
        .unwrap_or_else(|| IprevCheck {
            result: AuthResult::TempError,
            ptr: Vec::new(),
            confirmed: Vec::new(),
            unsure: Vec::new(),
        });
        let helo_spf = match &mut self.helo_spf {
            Some(pending) => pending.get().await.cloned(),
            None => None,
        }
        .unwrap_or_else(|| lost_spf(&helo, format!("postmaster@{helo}")));
        let spf = match &mut tx.spf {
            Some(pending) => pending.get().await.cloned(),
            None => None,
        }
        .unwrap_or_else(|| {
            let domain = tx
                .mail_from
                .rsplit_once('@')
                .map_or(helo.clone(), |(_, d)| d.to_string());
            lost_spf(&domain, tx.mail_from.clone())
        });
        EnvelopeChecks {
            iprev,
            helo_spf,
            spf,
        }
    }
}

fn lost_spf(domain: &str, identity: String) -> SpfCheck {
    SpfCheck {
        result: AuthResult::TempError,
        domain: domain.to_string(),
        identity,
        explanation: None,
        reason: None,
        reason_kind: None,
    }
}

/// Runs the message checks and assembles the report. `parsed` is `None` for a message
/// without a header section, which has no From field and so cannot pass DMARC. `from`
/// is our reading of the From fields (`auth::reading::WrittenFroms::header`).
pub async fn assess<'m>(
    auth: &'m Authenticator,
    parsed: Option<&'m AuthenticatedMessage<'m>>,
    from: FromHeader,
    envelope: EnvelopeChecks,
    budget: Budget,
) -> (AuthReport, Option<MessageVerification<'m>>) {
    let verification = match parsed {
        Some(message) => Some(
            auth.verify_message(message, from, &envelope.spf, budget)
                .await,
        ),
        None => None,
    };
    let report = match &verification {
        Some(v) => AuthReport {
            iprev: envelope.iprev,
            helo_spf: envelope.helo_spf,
            spf: envelope.spf,
            dkim: v.dkim.clone(),
            arc: v.arc.clone(),
            dmarc: v.dmarc.clone(),
            from: v.from.clone(),
        },
        None => AuthReport {
            iprev: envelope.iprev,
            helo_spf: envelope.helo_spf,
            spf: envelope.spf,
            dkim: Vec::new(),
            arc: ArcCheck {
                result: AuthResult::None,
                instances: 0,
                sealer: None,
                sealer_results: None,
                signer: None,
                reason: None,
            },
            dmarc: DmarcCheck {
                result: AuthResult::None,
                domain: String::new(),
                policy: DmarcPolicy::None,
                applied_policy: DmarcPolicy::None,
                spf_aligned: false,
                dkim_aligned: false,
                pct: None,
                reason: None,
            },
            from: FromHeader {
                fields: 0,
                addresses: Vec::new(),
                domains: Vec::new(),
                unusable: Vec::new(),
            },
        },
    };
    (report, verification)
}
