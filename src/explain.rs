//! `mxgate explain`: the whole evaluation of one message, offline, against the
//! configured DNS, printed check by check with the final verdict. It runs the same
//! functions as the SMTP path (`pipeline::assess`, `pipeline::verdict::decide`).

use crate::auth::results::AuthReport;
use crate::config;
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
}

#[derive(Serialize)]
struct Explanation<'a> {
    client: Client<'a>,
    envelope: Envelope<'a>,
    #[serde(flatten)]
    report: Option<&'a AuthReport>,
    verdict: VerdictView,
    #[serde(skip_serializing_if = "Option::is_none")]
    authentication_results: Option<String>,
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

    let mut report = None;
    let mut ar_value = None;
    let verdict = if let Some(rcpt) = refused_rcpt {
        let reply = Reply::relay_denied(rcpt);
        Verdict {
            action: Action::Reject,
            reply: Some(reply),
            headers: Vec::new(),
            reason: format!("{rcpt} is not in server.domains"),
            dmarc_override: None,
        }
    } else if trusted {
        Verdict::deliver("trusted network: no sender checks")
    } else if let Some(auth) = &snapshot.auth {
        let envelope = EnvelopeChecks::run(auth, ip, &request.helo, &request.mail_from).await;
        let parsed = AuthenticatedMessage::parse(message);
        let (full, _verification) = assess(auth, parsed.as_ref(), envelope).await;
        let verdict = verdict::decide(&snapshot.dmarc, &full);
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
        Verdict::deliver("sender checks are disabled (auth.enabled: false)")
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
        verdict: VerdictView::new(&verdict, &snapshot.dmarc.quarantine_header),
        authentication_results: ar_value,
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
        println!("spf (helo)  {:<9} {}", r.helo_spf.result, r.helo_spf.domain);
        println!(
            "spf         {:<9} {} ({})",
            r.spf.result, r.spf.domain, r.spf.identity
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
