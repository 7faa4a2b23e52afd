//! `mxgate explain`: the whole evaluation of one message, offline, against the
//! configured DNS, printed check by check with the final verdict. It runs the very
//! evaluation the SMTP path runs (`pipeline::evaluate`), with the envelope checks run
//! now instead of while a client talks, and every policy rule traced.

use crate::auth::Authenticator;
use crate::config;
use crate::findings::AuthReport;
use crate::pipeline::evaluate::{Input, Sources, Unchecked, evaluate};
use crate::pipeline::rules::{
    DataFacts, DnsFacts, PolicyDecision, PolicyHit, full_facts, spf_record_results,
};
use crate::pipeline::verdict::{Action, Verdict};
use crate::pipeline::{EnvelopeChecks, Evaluation};
use crate::policy::{RuleAction, Truth};
use crate::rewrite::auth_results::unfolded;
use crate::smtp::data::BdatReader;
use crate::smtp::reply::Reply;
use crate::snapshot::{self, Mode, NotLocal, Snapshot};
use serde::Serialize;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

pub struct Request {
    pub config: PathBuf,
    pub ip: IpAddr,
    pub helo: String,
    pub mail_from: String,
    pub rcpts: Vec<String>,
    pub message: PathBuf,
    pub json: bool,
    /// The client used TLS (1.3), for rules that match on it.
    pub tls: bool,
}

#[derive(Serialize)]
struct Explanation<'a> {
    client: Client<'a>,
    envelope: EnvelopeView<'a>,
    /// The checks' results; when none ran, the same fields say `none` and why, so
    /// scripts can read `spf`, `dkim`, `dmarc`, ... whatever the client was.
    #[serde(flatten)]
    report: Option<&'a AuthReport>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    not_checked: Option<NotChecked>,
    verdict: VerdictView,
    /// The own-domain guard's decision, when From is one of our domains.
    #[serde(skip_serializing_if = "Option::is_none")]
    own_domain_guard: Option<crate::pipeline::own_domain::GuardNote>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authentication_results: Option<String>,
    /// The rule that decided (null when none matched).
    policy: Option<PolicyView>,
    /// Recipients refused at RCPT (not ours, or by a rule); the verdict is about the
    /// others.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    refused_rcpts: Vec<RcptRefusal>,
    /// Every rule, in order, with each condition's result.
    policy_trace: Vec<RuleView>,
}

/// The check fields of a message whose checks did not run.
#[derive(Serialize)]
struct NotChecked {
    iprev: NotRun,
    helo_spf: NotRun,
    spf: NotRun,
    dkim: [NotRun; 0],
    arc: NotRun,
    dmarc: NotRun,
}

#[derive(Clone, Copy, Serialize)]
struct NotRun {
    result: &'static str,
    reason: &'static str,
}

impl NotChecked {
    fn because(reason: &'static str) -> Self {
        let none = NotRun {
            result: "none",
            reason,
        };
        NotChecked {
            iprev: none,
            helo_spf: none,
            spf: none,
            dkim: [],
            arc: none,
            dmarc: none,
        }
    }
}

#[derive(Serialize)]
struct PolicyView {
    rule: String,
    action: &'static str,
    mode: &'static str,
}

impl PolicyView {
    fn new(hit: &PolicyHit, snapshot: &Snapshot) -> Self {
        let shadow = snapshot
            .policy
            .rules
            .iter()
            .any(|r| r.name == hit.rule && r.shadow);
        PolicyView {
            rule: hit.rule.to_string(),
            action: hit.action.name(),
            mode: if shadow { "shadow" } else { "enforce" },
        }
    }
}

#[derive(Serialize)]
struct RuleView {
    rule: String,
    origin: String,
    action: &'static str,
    mode: &'static str,
    matched: bool,
    conditions: Vec<ConditionView>,
}

#[derive(Serialize)]
struct ConditionView {
    condition: String,
    result: bool,
    /// The condition could hold, but DNS trouble kept it from being decided.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    temperror: bool,
}

/// Recipients a rule refuses at RCPT (reject or tempfail), with that rule: as live, they
/// are refused before the data and take no part in the rest of the evaluation.
fn rcpt_refusals(snapshot: &Snapshot, facts: &DataFacts, rcpts: &[String]) -> Vec<RcptRefusal> {
    rcpts
        .iter()
        .filter_map(|rcpt| {
            let evaluation =
                crate::policy::evaluate(snapshot.policy.disposition_rules(), &facts.at_rcpt(rcpt));
            // As live: a rule DNS trouble left undecided holds the decision back to the
            // end of data.
            if !evaluation.temperror.is_empty() {
                return None;
            }
            let rule = evaluation.decision?;
            let (RuleAction::Reject(reply) | RuleAction::Tempfail(reply)) = &rule.action else {
                return None;
            };
            let mut refusal = RcptRefusal::new(rcpt, reply, format!("policy rule `{}`", rule.name));
            refusal.rule = Some(rule.name.to_string());
            refusal.hit = Some(crate::pipeline::rules::hit(
                rule,
                &rule.action,
                crate::policy::Stage::Rcpt,
            ));
            Some(refusal)
        })
        .collect()
}

#[derive(Serialize)]
struct RcptRefusal {
    rcpt: String,
    /// The policy rule that refuses it; absent for a recipient not in our domains.
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<String>,
    code: u16,
    enhanced: String,
    text: String,
    /// Why, in words: the rule, or `not in server.domains`.
    reason: String,
    #[serde(skip)]
    hit: Option<PolicyHit>,
    #[serde(skip)]
    reply: Reply,
}

impl RcptRefusal {
    fn new(rcpt: &str, reply: &Reply, reason: String) -> Self {
        RcptRefusal {
            rcpt: rcpt.to_string(),
            rule: None,
            code: reply.code(),
            enhanced: reply.status().map(|s| s.to_string()).unwrap_or_default(),
            text: reply.text(),
            reason,
            hit: None,
            reply: reply.clone(),
        }
    }
}

/// Evaluates every rule on complete facts: the decision and the trace.
fn policy_trace(snapshot: &Snapshot, facts: &DataFacts) -> (PolicyDecision, Vec<RuleView>) {
    let facts = facts.facts();
    let evaluation = crate::policy::evaluate(snapshot.policy.disposition_rules(), &facts);
    let decision = crate::pipeline::rules::at_data(&evaluation);
    let trace = snapshot
        .policy
        .rules
        .iter()
        .map(|rule| {
            let conditions: Vec<ConditionView> = rule
                .conditions
                .iter()
                .map(|c| {
                    let truth = c.test_for(&facts, &rule.action);
                    ConditionView {
                        condition: c.to_string(),
                        result: truth == Some(Truth::True),
                        temperror: truth == Some(Truth::Temperror),
                    }
                })
                .collect();
            RuleView {
                rule: rule.name.to_string(),
                origin: rule.origin.clone(),
                action: rule.action.name(),
                mode: if rule.shadow { "shadow" } else { "enforce" },
                matched: conditions.iter().all(|c| c.result),
                conditions,
            }
        })
        .collect();
    (decision, trace)
}

#[derive(Serialize)]
struct Client<'a> {
    ip: String,
    helo: &'a str,
    trusted: bool,
}

#[derive(Serialize)]
struct EnvelopeView<'a> {
    mail_from: &'a str,
    rcpt: &'a [String],
}

#[derive(Serialize)]
struct VerdictView {
    action: Action,
    code: u16,
    enhanced: String,
    text: String,
    reason: String,
}

impl VerdictView {
    fn new(verdict: &Verdict, quarantine_header: &(String, String)) -> Self {
        let reply = match verdict.reply() {
            Some(reply) => reply.clone(),
            None => Reply::policy(
                250,
                Some(crate::smtp::reply::Status(2, 0, 0)),
                &match verdict.action() {
                    Action::Quarantine => format!(
                        "relayed to the mailbox server with {}: {}",
                        quarantine_header.0, quarantine_header.1
                    ),
                    _ => "relayed to the mailbox server".to_string(),
                },
            ),
        };
        VerdictView {
            action: verdict.action(),
            code: reply.code(),
            enhanced: reply.status().map(|s| s.to_string()).unwrap_or_default(),
            text: reply.text(),
            reason: verdict.reason().to_string(),
        }
    }
}

/// Runs `explain`. Returns the exit code.
pub fn run(request: Request) -> i32 {
    let (loaded, _) = match config::load(&request.config) {
        Ok(ok) => ok,
        Err(errors) => {
            for error in errors {
                eprintln!("{error}");
            }
            return 1;
        }
    };
    let raw = match std::fs::read(&request.message) {
        Ok(raw) => raw,
        Err(err) => {
            eprintln!("{}: cannot read: {err}", request.message.display());
            return 1;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return 1;
        }
    };
    runtime.block_on(async move {
        let snapshot = match snapshot::compile(loaded, 1, Mode::Check, None) {
            Ok((snapshot, _)) => snapshot,
            Err(errors) => {
                for error in errors {
                    eprintln!("{error}");
                }
                return 1;
            }
        };
        explain(&snapshot, &request, &canonical(&raw)).await;
        0
    })
}

/// The message in the form the SMTP path would hold it: CRLF line endings only.
fn canonical(raw: &[u8]) -> Vec<u8> {
    let mut reader = BdatReader::new();
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 40);
    reader.feed(raw, &mut out);
    reader.finish(&mut out);
    out
}

async fn explain(snapshot: &Snapshot, request: &Request, message: &[u8]) {
    let ip = crate::config::canonical_ip(request.ip);
    let trusted = snapshot.is_trusted(&ip);
    // RCPT's recipient-domain rule, whoever the client: the others are refused there.
    let mut local = Vec::new();
    let mut refused = Vec::new();
    for rcpt in &request.rcpts {
        // `--rcpt ""` is `RCPT TO:<>`, which the session refuses as syntax; the empty
        // address `local_recipient` takes as the postmaster is smtp-proto's `<postmaster>`.
        if rcpt.is_empty() {
            refused.push(RcptRefusal::new(
                rcpt,
                &Reply::bad_recipient_syntax(),
                "the null path <> is not a recipient".into(),
            ));
            continue;
        }
        match snapshot.local_recipient(rcpt) {
            Ok(address) => local.push(address),
            Err(not_local) => refused.push(RcptRefusal::new(
                rcpt,
                &not_local.reply(rcpt),
                match not_local {
                    NotLocal::Domain => "not in server.domains",
                    NotLocal::RoutedLocalPart => "% ! or @ in the local part routes elsewhere",
                }
                .into(),
            )),
        }
    }
    let mut offline = Offline {
        snapshot,
        ip,
        request,
        rcpts: local,
        dns: DnsFacts::default(),
        refused: Vec::new(),
        trace: Vec::new(),
        hit: None,
    };
    let section = crate::rewrite::section::read_section(message, snapshot.limits.header_section);
    let parsed = OnceLock::new();
    let (verdict, report, not_checked, results) = if offline.rcpts.is_empty() {
        // No recipient left: the message never gets to its data.
        let verdict = match refused.first() {
            Some(first) => Verdict::refuse(
                first.reply.clone(),
                format!("<{}> is refused at RCPT: {}", first.rcpt, first.reason),
            ),
            None => Verdict::refuse(Reply::no_valid_recipients(), "no recipients"),
        };
        let why = NotChecked::because("not checked: a recipient is refused first");
        (verdict, None, Some(why), None)
    } else {
        let input = Input {
            raw: message,
            section: section.as_ref(),
            parsed: &parsed,
        };
        let Evaluation {
            verdict,
            report,
            unchecked,
            results,
            ..
        } = evaluate(snapshot, ip, trusted, input, &mut offline).await;
        let why = unchecked.map(|why| {
            NotChecked::because(match why {
                Unchecked::Trusted => "not checked: trusted network",
                Unchecked::Disabled => "not checked: sender checks are disabled",
                Unchecked::HeaderSection | Unchecked::ReadDifferently => {
                    "not checked: the header section is refused first"
                }
            })
        });
        (verdict, report, why, results)
    };
    refused.append(&mut offline.refused);

    let explanation = Explanation {
        client: Client {
            ip: ip.to_string(),
            helo: &request.helo,
            trusted,
        },
        envelope: EnvelopeView {
            mail_from: &request.mail_from,
            rcpt: &request.rcpts,
        },
        report: report.as_ref(),
        not_checked,
        refused_rcpts: refused,
        verdict: VerdictView::new(&verdict, &snapshot.dmarc.quarantine_header),
        own_domain_guard: verdict.own_domain().cloned(),
        authentication_results: results.as_deref().map(unfolded),
        policy: offline.hit.as_ref().map(|h| PolicyView::new(h, snapshot)),
        policy_trace: offline.trace,
    };
    if request.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&explanation).unwrap_or_default()
        );
    } else {
        print_text(&explanation);
    }
}

/// `explain`'s sources for [`evaluate`]: the envelope checks run now, and every rule
/// evaluated on complete facts, traced, with the refusals RCPT would have made.
struct Offline<'a> {
    snapshot: &'a Snapshot,
    ip: IpAddr,
    request: &'a Request,
    /// The recipients in our domains, in the form RCPT accepts them.
    rcpts: Vec<String>,
    dns: DnsFacts,
    refused: Vec<RcptRefusal>,
    trace: Vec<RuleView>,
    hit: Option<PolicyHit>,
}

impl Sources for Offline<'_> {
    fn envelope_checks(
        &mut self,
        auth: &Arc<Authenticator>,
    ) -> impl Future<Output = EnvelopeChecks> + Send {
        let auth = auth.clone();
        async move {
            let request = self.request;
            let (envelope, records) = tokio::join!(
                EnvelopeChecks::run(
                    &auth,
                    self.ip,
                    &request.helo,
                    &request.mail_from,
                    &self.snapshot.policy.trusted_hosts
                ),
                spf_record_results(
                    &auth,
                    self.ip,
                    &self.snapshot.policy.spf_records,
                    &request.helo,
                    &request.mail_from,
                )
            );
            self.dns.spf_records = Some(records);
            envelope
        }
    }

    fn policy_at_data(&mut self, report: Option<&AuthReport>) -> PolicyDecision {
        let request = self.request;
        let facts_for = |rcpts: &[String]| {
            full_facts(
                self.ip,
                Some(&request.helo),
                request.tls.then_some("1.3"),
                &request.mail_from,
                rcpts,
                &self.dns,
                report,
                &self.snapshot.dmarc.own_domains,
            )
        };
        let refused = rcpt_refusals(self.snapshot, &facts_for(&self.rcpts), &self.rcpts);
        let remaining: Vec<String> = self
            .rcpts
            .iter()
            .filter(|r| !refused.iter().any(|x| &x.rcpt == *r))
            .cloned()
            .collect();
        let (mut decision, trace) = policy_trace(self.snapshot, &facts_for(&remaining));
        // Every recipient refused at RCPT: the message never gets to its data.
        if let (true, Some(first)) = (remaining.is_empty(), refused.first()) {
            decision = PolicyDecision::decided(first.hit.clone());
        }
        decision.hit = decision
            .hit
            .map(|hit| at_connect(self.snapshot, self.ip, hit));
        self.trace = trace;
        self.refused = refused;
        self.hit = decision.hit.clone();
        decision
    }
}

/// A refusal the rule already decides at connect, on the client IP alone, is given as
/// live: in place of the greeting (`policy_at_connect`), where only 554 and 421 may
/// stand (RFC 5321 section 3.1).
fn at_connect(snapshot: &Snapshot, ip: IpAddr, hit: PolicyHit) -> PolicyHit {
    let facts = crate::pipeline::rules::connect_facts(ip);
    let decided = crate::policy::evaluate(snapshot.policy.disposition_rules(), &facts).decision;
    if decided.is_none_or(|rule| rule.name != hit.rule) {
        return hit;
    }
    let action = match &hit.action {
        RuleAction::Reject(reply) => RuleAction::Reject(reply.as_greeting()),
        RuleAction::Tempfail(reply) => RuleAction::Tempfail(reply.as_greeting()),
        _ => return hit,
    };
    PolicyHit {
        action,
        stage: crate::policy::Stage::Connect,
        ..hit
    }
}

/// `: two v=spf1 records at example.com` for a permerror or temperror.
fn spf_reason(check: &crate::findings::SpfCheck) -> String {
    check
        .reason
        .as_deref()
        .map_or_else(String::new, |reason| format!(": {reason}"))
}

fn print_text(e: &Explanation<'_>) {
    println!(
        "client      {} (HELO {}){}",
        e.client.ip,
        e.client.helo,
        if e.client.trusted {
            ", trusted network"
        } else {
            ""
        }
    );
    println!(
        "envelope    MAIL FROM:<{}> RCPT TO:<{}>",
        e.envelope.mail_from,
        e.envelope.rcpt.join(">, <")
    );
    if let Some(r) = e.report {
        let ptr = if r.iprev.confirmed.is_empty() {
            r.iprev.ptr.join(", ")
        } else {
            format!("{} (forward-confirmed)", r.iprev.confirmed.join(", "))
        };
        println!("iprev       {:<9} {ptr}", r.iprev.result);
        println!(
            "spf (helo)  {:<9} {}{}",
            r.helo_spf.result,
            r.helo_spf.domain,
            spf_reason(&r.helo_spf)
        );
        println!(
            "spf         {:<9} {} ({}){}",
            r.spf.result,
            r.spf.domain,
            r.spf.identity,
            spf_reason(&r.spf)
        );
        if r.dkim.is_empty() {
            println!("dkim        none      no signature");
        }
        for d in &r.dkim {
            println!(
                "dkim        {:<9} d={} s={} a={}{}",
                d.result,
                d.domain,
                d.selector,
                d.algorithm,
                d.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            );
        }
        println!(
            "arc         {:<9} {} set(s){}{}",
            r.arc.result,
            r.arc.instances,
            r.arc
                .sealer
                .as_deref()
                .map(|s| format!(", last sealed by {s}"))
                .unwrap_or_default(),
            r.arc
                .reason
                .as_deref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default()
        );
        println!(
            "dmarc       {:<9} header.from={} p={}{}{}{}",
            r.dmarc.result,
            r.dmarc.domain,
            r.dmarc.policy.as_str(),
            r.dmarc.pct.map(|p| format!(" pct={p}")).unwrap_or_default(),
            if r.dmarc.applied_policy != r.dmarc.policy {
                format!(" (applied: {})", r.dmarc.applied_policy.as_str())
            } else {
                String::new()
            },
            r.dmarc
                .reason
                .as_deref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default()
        );
    }
    for rule in &e.policy_trace {
        println!(
            "rule        {} {} ({}, {}{}) at {}",
            if rule.matched { "MATCH" } else { "no   " },
            rule.rule,
            rule.action,
            rule.mode,
            if e.policy.as_ref().is_some_and(|p| p.rule == rule.rule) {
                ", decides"
            } else {
                ""
            },
            rule.origin
        );
        for condition in &rule.conditions {
            println!(
                "              {:<5} {}",
                if condition.temperror {
                    "temperror"
                } else if condition.result {
                    "true"
                } else {
                    "false"
                },
                condition.condition
            );
        }
    }
    for refusal in &e.refused_rcpts {
        println!(
            "rcpt        {} refused at RCPT ({}) -> {} {} {}",
            refusal.rcpt, refusal.reason, refusal.code, refusal.enhanced, refusal.text
        );
    }
    if let Some(guard) = &e.own_domain_guard {
        println!(
            "own domain  {:<9} header.from={} ({})",
            guard.decision, guard.domain, guard.reason
        );
    }
    println!(
        "verdict     {} -> {} {} {}",
        e.verdict.action.as_str(),
        e.verdict.code,
        e.verdict.enhanced,
        e.verdict.text
    );
    println!("reason      {}", e.verdict.reason);
    if let Some(ar) = &e.authentication_results {
        println!("header      Authentication-Results: {ar}");
    }
}
