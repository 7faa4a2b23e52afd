//! The evaluation of one received message: the header-section gates, the sender checks,
//! the policy at end of data, the verdict and the Authentication-Results value. The one
//! function both the SMTP path (`deliver`) and `mxgate explain` call, so the two judge a
//! message the same way.
//!
//! What differs between them comes in through [`Sources`]: the SMTP path started the
//! envelope checks while the client talked and its policy decided stage by stage
//! (counting metrics); `explain` runs the checks now and traces every rule. What comes
//! after the verdict (seal, rewrite, relay, records) is the caller's.

use super::assess::{EnvelopeChecks, assess};
use super::rules::PolicyDecision;
use super::verdict::{self, Verdict};
use crate::auth::reading;
use crate::auth::{Authenticator, MessageVerification};
use crate::findings::AuthReport;
use crate::rewrite::auth_results::{ResultsInput, results_value};
use crate::rewrite::section::{HeaderSection, SectionError};
use crate::smtp::reply::Reply;
use crate::snapshot::Snapshot;
use mail_auth::AuthenticatedMessage;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

/// The message as received, read once.
pub struct Input<'m> {
    pub raw: &'m [u8],
    /// Our one reading of the header section (`rewrite::section`), or why it failed.
    pub section: Result<&'m HeaderSection<'m>, &'m SectionError>,
    /// mail-auth's parse of `raw`: made here, at most once and only when the checks run;
    /// held by the caller, which may seal with it afterwards.
    pub parsed: &'m OnceLock<Option<AuthenticatedMessage<'m>>>,
}

/// What the caller supplies that the SMTP path and `explain` get differently.
pub trait Sources {
    /// The results of the envelope checks (iprev, HELO and MAIL FROM SPF).
    fn envelope_checks(
        &mut self,
        auth: &Arc<Authenticator>,
    ) -> impl Future<Output = EnvelopeChecks> + Send;

    /// The policy's decision at end of data on every fact (a decision made at an
    /// earlier stage stands); `report` is `None` when sender checks are disabled.
    fn policy_at_data(&mut self, report: Option<&AuthReport>) -> PolicyDecision;
}

/// Why the sender checks did not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unchecked {
    /// The client is in `server.trusted_networks`.
    Trusted,
    /// `auth.enabled: false`.
    Disabled,
    /// The header section was refused before anything else (`rewrite::section`).
    HeaderSection,
    /// mail-auth reads the header section differently from us: refused, never guessed.
    ReadDifferently,
}

pub struct Evaluation<'m> {
    pub verdict: Verdict,
    /// The checks' results; `None` when they did not run (`unchecked` says why).
    pub report: Option<AuthReport>,
    pub unchecked: Option<Unchecked>,
    /// mail-auth's verification, for the ARC seal.
    pub verification: Option<MessageVerification<'m>>,
    /// The Authentication-Results value (with `\0` fold marks) of a message to deliver
    /// whose checks ran.
    pub results: Option<String>,
}

impl Evaluation<'_> {
    fn unchecked(why: Unchecked, verdict: Verdict) -> Self {
        Evaluation {
            verdict,
            report: None,
            unchecked: Some(why),
            verification: None,
            results: None,
        }
    }
}

/// Evaluates one message from `client_ip` (trusted or not) for the recipients the
/// `sources` know.
pub async fn evaluate<'m>(
    snapshot: &'m Snapshot,
    client_ip: IpAddr,
    trusted: bool,
    input: Input<'m>,
    sources: &mut impl Sources,
) -> Evaluation<'m> {
    let section = match input.section {
        Ok(section) => section,
        Err(err) => {
            return Evaluation::unchecked(Unchecked::HeaderSection, header_section_refused(err));
        }
    };
    if trusted {
        return Evaluation::unchecked(
            Unchecked::Trusted,
            Verdict::deliver("trusted network: no sender checks"),
        );
    }
    let Some(auth) = &snapshot.auth else {
        let decision = sources.policy_at_data(None);
        let mut verdict = verdict::decide_policy(&snapshot.dmarc, None, &decision);
        if verdict.rule().is_none() {
            verdict.why_mut().reason = "sender checks are disabled (auth.enabled: false)".into();
        }
        return Evaluation::unchecked(Unchecked::Disabled, verdict);
    };
    let parsed = input
        .parsed
        .get_or_init(|| AuthenticatedMessage::parse(input.raw))
        .as_ref();
    let froms = reading::written_froms(section, input.raw);
    if !reading::reads_alike(section, input.raw, parsed, &froms) {
        return Evaluation::unchecked(
            Unchecked::ReadDifferently,
            Verdict::refuse(
                Reply::header_section_malformed("it can be read in more than one way"),
                "header section: mail-auth reads it differently",
            ),
        );
    }
    let from = froms.header();
    let envelope = sources.envelope_checks(auth).await;
    let (report, verification) = assess(auth, parsed, from, envelope, snapshot.auth_budget).await;
    let decision = sources.policy_at_data(Some(&report));
    let verdict = verdict::decide_policy(&snapshot.dmarc, Some(&report), &decision);
    let results = matches!(verdict, Verdict::Deliver { .. }).then(|| {
        results_value(&ResultsInput {
            authserv_id: &snapshot.hostname,
            comments: snapshot.auth_comments,
            client_ip,
            report: &report,
            dmarc_override: verdict.dmarc_override(),
        })
    });
    Evaluation {
        verdict,
        report: Some(report),
        unchecked: None,
        verification,
        results,
    }
}

/// A header section we do not read: `550 5.6.0` when it is ambiguous, `552 5.3.4`
/// over a limit.
fn header_section_refused(err: &SectionError) -> Verdict {
    let reply = if err.is_limit() {
        Reply::header_section_too_large(&err.to_string())
    } else {
        Reply::header_section_malformed(&err.to_string())
    };
    Verdict::refuse(reply, format!("header section: {err}"))
}
