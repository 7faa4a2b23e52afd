//! `mxgate explain`: the whole evaluation of one message, offline, against the
//! configured DNS, printed check by check with the final verdict. It runs the same
//! functions as the SMTP path (`pipeline::assess`, `pipeline::verdict::decide`).

use crate::auth::results::AuthReport;
use crate::config;
use crate::pipeline::policy::{DataFacts, DnsFacts, PolicyHit, full_facts};
use crate::pipeline::verdict::{self, Action, Verdict};
use crate::pipeline::{EnvelopeChecks, assess};
use crate::rewrite::auth_results::{ResultsInput, results_value, unfolded};
use crate::smtp::data::BdatReader;
use crate::smtp::reply::Reply;
use crate::snapshot::{self, Mode, Snapshot};
use mail_auth::AuthenticatedMessage;
use serde::Serialize;
use std::net::IpAddr;
use std::path::PathBuf;

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
    envelope: Envelope<'a>,
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
    /// Recipients a rule refuses at RCPT; the verdict is about the others.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    refused_rcpts: Vec<RcptRefusal>,
    /// Every rule, in order, with each condition's result.
    policy_trace: Vec<RuleView>,
}

/// The check fields of a message whose checks did not run.
#[derive(Serialize)]
struct NotChecked {
    iprev: Unchecked,
    helo_spf: Unchecked,
    spf: Unchecked,
    dkim: [Unchecked; 0],
    arc: Unchecked,
    dmarc: Unchecked,
}

#[derive(Clone, Copy, Serialize)]
struct Unchecked {
    result: &'static str,
    reason: &'static str,
}

impl NotChecked {
    fn because(reason: &'static str) -> Self {
        let none = Unchecked {
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
}

/// Recipients a rule refuses at RCPT (reject or tempfail), with that rule: as live, they
/// are refused before the data and take no part in the rest of the evaluation.
fn rcpt_refusals(snapshot: &Snapshot, facts: &DataFacts, rcpts: &[String]) -> Vec<RcptRefusal> {
    rcpts
        .iter()
        .filter_map(|rcpt| {
            let evaluation =
                crate::policy::evaluate(snapshot.policy.disposition_rules(), &facts.at_rcpt(rcpt));
            let rule = evaluation.decision?;
            let (crate::policy::Action::Reject(reply) | crate::policy::Action::Tempfail(reply)) =
                &rule.action
            else {
                return None;
            };
            Some(RcptRefusal {
                rcpt: rcpt.clone(),
                rule: rule.name.to_string(),
                code: reply.code(),
                enhanced: reply.status().map(|s| s.to_string()).unwrap_or_default(),
                text: reply.text(),
                hit: crate::pipeline::policy::hit(rule, &rule.action, "rcpt"),
            })
        })
        .collect()
}

#[derive(Serialize)]
struct RcptRefusal {
    rcpt: String,
    rule: String,
    code: u16,
    enhanced: String,
    text: String,
    #[serde(skip)]
    hit: PolicyHit,
}

/// Evaluates every rule on complete facts: the decision and the trace.
fn policy_trace(snapshot: &Snapshot, facts: &DataFacts) -> (Option<PolicyHit>, Vec<RuleView>) {
    let facts = facts.facts();
    let evaluation = crate::policy::evaluate(snapshot.policy.disposition_rules(), &facts);
    let hit = evaluation
        .decision
        .map(|rule| crate::pipeline::policy::hit(rule, &rule.action, "data"));
    let trace = snapshot
        .policy
        .rules
        .iter()
        .map(|rule| {
            let conditions: Vec<ConditionView> = rule
                .conditions
                .iter()
                .map(|c| ConditionView {
                    condition: c.to_string(),
                    result: c.test_for(&facts, &rule.action).unwrap_or(false),
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
    (hit, trace)
}

#[derive(Serialize)]
struct Client<'a> {
    ip: String,
    helo: &'a str,
    trusted: bool,
}

#[derive(Serialize)]
struct Envelope<'a> {
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
        let reply = match &verdict.reply {
            Some(reply) => reply.clone(),
            None => Reply::policy(
                250,
                Some(crate::smtp::reply::Status(2, 0, 0)),
                &match verdict.action {
                    Action::Quarantine => format!(
                        "relayed to the mailbox server with {}: {}",
                        quarantine_header.0, quarantine_header.1
                    ),
                    _ => "relayed to the mailbox server".to_string(),
                },
            ),
        };
        VerdictView {
            action: verdict.action,
            code: reply.code(),
            enhanced: reply.status().map(|s| s.to_string()).unwrap_or_default(),
            text: reply.text(),
            reason: verdict.reason.clone(),
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
    let refused_rcpt = request
        .rcpts
        .iter()
        .find(|rcpt| !rcpt_domain_accepted(snapshot, rcpt));

    // The same reading of the header section, and the same cross-check with mail-auth's,
    // as the SMTP path (`pipeline::deliver`).
    let section = crate::rewrite::section::read_section(message, snapshot.limits.header_section);
    let parsed = AuthenticatedMessage::parse(message);
    let from = section
        .as_ref()
        .ok()
        .map(|section| crate::auth::reading::from_header(section, message));
    let read_alike = match (&section, &from) {
        (Ok(section), Some(from)) => {
            crate::auth::reading::reads_alike(section, message, parsed.as_ref(), from)
        }
        _ => true,
    };
    let mut report = None;
    let mut refused = Vec::new();
    let mut not_checked = None;
    let mut ar_value = None;
    let mut policy = None;
    let mut rules = Vec::new();
    let verdict = if let Some(rcpt) = refused_rcpt {
        not_checked = Some(NotChecked::because(
            "not checked: a recipient is refused first",
        ));
        let reply = Reply::relay_denied(rcpt);
        Verdict::refuse(
            Action::Reject,
            reply,
            format!("{rcpt} is not in server.domains"),
        )
    } else if let Err(err) = &section {
        not_checked = Some(NotChecked::because(
            "not checked: the header section is refused first",
        ));
        let reply = if err.is_limit() {
            Reply::header_section_too_large(&err.to_string())
        } else {
            Reply::header_section_malformed(&err.to_string())
        };
        Verdict::refuse(Action::Reject, reply, format!("header section: {err}"))
    } else if !read_alike && snapshot.auth.is_some() && !trusted {
        not_checked = Some(NotChecked::because(
            "not checked: the header section is refused first",
        ));
        let reply = Reply::header_section_malformed("it can be read in more than one way");
        Verdict::refuse(
            Action::Reject,
            reply,
            "header section: mail-auth reads it differently".to_string(),
        )
    } else if trusted {
        not_checked = Some(NotChecked::because("not checked: trusted network"));
        Verdict::deliver("trusted network: no sender checks")
    } else if let (Some(auth), Some(from)) = (&snapshot.auth, from) {
        let envelope = EnvelopeChecks::run(auth, ip, &request.helo, &request.mail_from).await;
        let (full, _verification) =
            assess(auth, parsed.as_ref(), from, envelope, snapshot.auth_budget).await;
        let mut dns = DnsFacts::default();
        let mut records = std::collections::HashMap::new();
        for record in &snapshot.policy.spf_records {
            let authorised = auth
                .spf_record_authorizes(ip, record, &request.helo, &request.mail_from)
                .await
                == crate::auth::results::AuthResult::Pass;
            records.insert(record.clone(), authorised);
        }
        dns.spf_records = Some(records);
        let facts_for = |rcpts: &[String]| {
            full_facts(
                ip,
                Some(&request.helo),
                request.tls.then_some("1.3"),
                &request.mail_from,
                rcpts,
                &dns,
                Some(&full),
                &snapshot.dmarc.own_domains,
            )
        };
        refused = rcpt_refusals(snapshot, &facts_for(&request.rcpts), &request.rcpts);
        let remaining: Vec<String> = request
            .rcpts
            .iter()
            .filter(|r| !refused.iter().any(|x| &x.rcpt == *r))
            .cloned()
            .collect();
        let facts = facts_for(&remaining);
        let (hit, trace) = policy_trace(snapshot, &facts);
        rules = trace;
        // Every recipient refused at RCPT: the message never gets to its data.
        let hit = match (remaining.is_empty(), refused.first()) {
            (true, Some(first)) => Some(first.hit.clone()),
            _ => hit,
        };
        policy = hit.as_ref().map(|h| PolicyView::new(h, snapshot));
        let verdict = verdict::decide(&snapshot.dmarc, Some(&full), hit.as_ref());
        if verdict.reply.is_none() {
            ar_value = Some(unfolded(&results_value(&ResultsInput {
                authserv_id: &snapshot.hostname,
                comments: snapshot.auth_comments,
                client_ip: ip,
                report: &full,
                dmarc_override: verdict.dmarc_override.as_ref(),
            })));
        }
        report = Some(full);
        verdict
    } else {
        let facts = full_facts(
            ip,
            Some(&request.helo),
            request.tls.then_some("1.3"),
            &request.mail_from,
            &request.rcpts,
            &DnsFacts::default(),
            None,
            &snapshot.dmarc.own_domains,
        );
        let (hit, trace) = policy_trace(snapshot, &facts);
        policy = hit.as_ref().map(|h| PolicyView::new(h, snapshot));
        rules = trace;
        not_checked = Some(NotChecked::because(
            "not checked: sender checks are disabled",
        ));
        let mut verdict = verdict::decide(&snapshot.dmarc, None, hit.as_ref());
        if verdict.rule.is_none() {
            verdict.reason = "sender checks are disabled (auth.enabled: false)".into();
        }
        verdict
    };

    let explanation = Explanation {
        client: Client {
            ip: ip.to_string(),
            helo: &request.helo,
            trusted,
        },
        envelope: Envelope {
            mail_from: &request.mail_from,
            rcpt: &request.rcpts,
        },
        report: report.as_ref(),
        not_checked,
        refused_rcpts: refused,
        verdict: VerdictView::new(&verdict, &snapshot.dmarc.quarantine_header),
        own_domain_guard: verdict.own_domain.clone(),
        authentication_results: ar_value,
        policy,
        policy_trace: rules,
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

fn rcpt_domain_accepted(snapshot: &Snapshot, rcpt: &str) -> bool {
    rcpt.rsplit_once('@')
        .and_then(|(_, domain)| idna::domain_to_ascii(domain.trim_end_matches('.')).ok())
        .is_some_and(|domain| snapshot.accepts_domain(&domain))
        || rcpt.eq_ignore_ascii_case("postmaster")
}

/// `: two v=spf1 records at example.com` for a permerror or temperror.
fn spf_reason(check: &crate::auth::results::SpfCheck) -> String {
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
                condition.result, condition.condition
            );
        }
    }
    for refusal in &e.refused_rcpts {
        println!(
            "rcpt        {} refused at RCPT by {} -> {} {} {}",
            refusal.rcpt, refusal.rule, refusal.code, refusal.enhanced, refusal.text
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
