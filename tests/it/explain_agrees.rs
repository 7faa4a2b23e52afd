//! `mxgate explain --json` and the SMTP path judge a message the same way: a corpus of
//! messages, each sent over SMTP to a running gateway (real sockets, the test DNS
//! server, an SMTP backend) and explained with the same configuration, must get the
//! same verdict, the same reply code and enhanced code (and, for a refusal, the same
//! text), and the same Authentication-Results.

use mxgate_test_kit as support;

use support::backend::{Behaviour, FakeBackend};
use support::client::{Reply, SmtpClient};
use support::dkim::DkimKey;
use support::dns::TestDns;
use support::gateway::{Gateway, TestConfig};
use support::mail;

/// sender.test's outbound server: SPF-authorised, forward-confirmed PTR.
const LEGIT_IP: &str = mail::SENDER_IP;
/// A host nobody authorised.
const OTHER_IP: &str = "192.0.2.66";
/// A host a policy rule accepts.
const PARTNER_IP: &str = "192.0.2.9";
/// A host a policy rule refuses at connect.
const BLOCKED_IP: &str = "192.0.2.99";
/// In `server.trusted_networks`.
const TRUSTED_IP: &str = "192.0.2.77";

/// Rules on recipients come before the one on header From: a rule that needs facts
/// not yet known holds back the rules after it, and these are to decide at RCPT.
const POLICY: &str = "rules:
  - name: partner-host
    match: { client_ip: 192.0.2.9 }
    action: accept
  - name: blocked-host
    match: { client_ip: 192.0.2.99 }
    action: reject
  - name: postmaster-quarantine
    match: { rcpt: postmaster@example.test }
    action: quarantine
  - name: ceo-protection
    match: { rcpt: ceo@example.test }
    action: reject
  - name: known-spammer
    match: { header_from: spam.test }
    action: reject
";
struct Case {
    name: &'static str,
    ip: &'static str,
    helo: &'static str,
    mail_from: &'static str,
    /// As sent in RCPT TO:<...> and given to `explain --rcpt`.
    rcpt: &'static str,
    message: String,
    /// What both must say; a check that the corpus covers what it claims to.
    action: &'static str,
}

fn message(from_lines: &str, subject: &str) -> String {
    support::crlf(&mail::message("", subject).from_lines(from_lines).text())
}

/// sender.test (kit's `sender_zone`, p=reject) and the other senders of the corpus.
fn zone(dns: &TestDns) -> (DkimKey, DkimKey) {
    let keys = mail::sender_zone(dns, "v=DMARC1; p=reject");
    dns.txt("_dmarc.quarantined.test", "v=DMARC1; p=quarantine");
    dns.txt("quarantined.test", "v=spf1 -all");
    dns.txt("spam.test", "v=spf1 +all");
    dns.txt("_dmarc.example.test", "v=DMARC1; p=none");
    dns.servfail("_dmarc.broken.test");
    keys
}

fn corpus(rsa: &DkimKey, ed: &DkimKey) -> Vec<Case> {
    let alice = "From: Alice <alice@sender.test>\n";
    let tampered = rsa
        .sign(&message(alice, "tampered"))
        .replace("the invoice", "the fake invoice");
    let case = |name, ip, helo, mail_from, message, action| Case {
        name,
        ip,
        helo,
        mail_from,
        rcpt: "bob@example.test",
        message,
        action,
    };
    vec![
        case(
            "spf and dkim pass",
            LEGIT_IP,
            "mail.sender.test",
            "alice@sender.test",
            rsa.sign(&message(alice, "pass")),
            "deliver",
        ),
        case(
            "spf fails, an aligned ed25519 signature passes",
            OTHER_IP,
            "relay.other.test",
            "alice@sender.test",
            ed.sign(&message(alice, "ed")),
            "deliver",
        ),
        case(
            "dkim fails (body changed), spf passes",
            LEGIT_IP,
            "mail.sender.test",
            "alice@sender.test",
            tampered,
            "deliver",
        ),
        case(
            "dmarc p=reject, nothing passes",
            OTHER_IP,
            "relay.other.test",
            "alice@sender.test",
            message(alice, "forged"),
            "reject",
        ),
        case(
            "dmarc p=quarantine fails",
            OTHER_IP,
            "relay.other.test",
            "news@quarantined.test",
            message("From: news@quarantined.test\n", "quarantine"),
            "quarantine",
        ),
        case(
            "dmarc temperror (SERVFAIL) defers",
            OTHER_IP,
            "relay.other.test",
            "news@broken.test",
            message("From: news@broken.test\n", "temperror"),
            "tempfail",
        ),
        case(
            "policy accept rule lifts a dmarc failure",
            PARTNER_IP,
            "partner.other.test",
            "alice@sender.test",
            message(alice, "partner"),
            "deliver",
        ),
        case(
            "policy reject rule on the client IP: refused in place of the greeting",
            BLOCKED_IP,
            "relay.blocked.test",
            "alice@sender.test",
            message(alice, "blocked"),
            "reject",
        ),
        case(
            "policy reject rule on header from",
            OTHER_IP,
            "relay.other.test",
            "offers@spam.test",
            message("From: offers@spam.test\n", "spam"),
            "reject",
        ),
        case(
            "own-domain guard refuses a spoof under p=none",
            OTHER_IP,
            "relay.other.test",
            "ceo@other.test",
            message("From: CEO <ceo@example.test>\n", "ceo"),
            "reject",
        ),
        case(
            "trusted sender is not checked",
            TRUSTED_IP,
            "app.internal.test",
            "alice@sender.test",
            message(alice, "trusted"),
            "deliver",
        ),
        case(
            "two From fields",
            LEGIT_IP,
            "mail.sender.test",
            "alice@sender.test",
            rsa.sign(&message(
                "From: alice@sender.test\nFrom: mallory@other.test\n",
                "two-from",
            )),
            "reject",
        ),
        case(
            "a malformed header section (space in a field name)",
            LEGIT_IP,
            "mail.sender.test",
            "alice@sender.test",
            message("From: alice@sender.test\nBad Name: x\n", "bad-name"),
            "reject",
        ),
        // `<postmaster>` without a domain is the postmaster of our first domain, to the
        // policy too (`explain` used to keep the bare word, and no rule matched it).
        Case {
            rcpt: "Postmaster",
            ..case(
                "postmaster without a domain (RFC 5321 4.5.1)",
                LEGIT_IP,
                "mail.sender.test",
                "alice@sender.test",
                rsa.sign(&message(alice, "postmaster")),
                "quarantine",
            )
        },
        // The null path is no recipient, though smtp-proto reports `<postmaster>` as an
        // empty address too.
        Case {
            rcpt: "",
            ..case(
                "the null path as a recipient",
                LEGIT_IP,
                "mail.sender.test",
                "alice@sender.test",
                rsa.sign(&message(alice, "null-rcpt")),
                "reject",
            )
        },
        Case {
            rcpt: "ceo@example.test",
            ..case(
                "a recipient a rule refuses at RCPT",
                LEGIT_IP,
                "mail.sender.test",
                "alice@sender.test",
                rsa.sign(&message(alice, "ceo-rcpt")),
                "reject",
            )
        },
        Case {
            rcpt: "bob@elsewhere.test",
            ..case(
                "a recipient in no domain of ours",
                LEGIT_IP,
                "mail.sender.test",
                "alice@sender.test",
                rsa.sign(&message(alice, "relay")),
                "reject",
            )
        },
    ]
}

/// What one side said about a message.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    accepted: bool,
    /// Relayed with the quarantine header (`dmarc.quarantine_header`, by default).
    quarantined: bool,
    code: u16,
    enhanced: String,
    /// The refusal's text; for a delivered message the reply is the backend's, which
    /// `explain` cannot know, so it is left out.
    text: Option<String>,
    authentication_results: Option<String>,
}

/// Runs the transaction over SMTP; the reply that ended it (a refusal at MAIL, RCPT or
/// end of data, or the backend's acceptance).
async fn over_smtp(gw: &Gateway, backend: &FakeBackend, case: &Case) -> Outcome {
    assert!(
        support::net::source_address(case.ip),
        "cannot send from {}",
        case.ip
    );
    let before = backend.messages().len();
    let (mut client, greeting) = SmtpClient::connect_from(gw.smtp, case.ip).await;
    let refused = |reply: Reply| {
        let status = reply.status().to_string();
        let text = reply
            .lines
            .iter()
            .map(|l| l.strip_prefix(&format!("{status} ")).unwrap_or(l))
            .collect::<Vec<_>>()
            .join(" ");
        Outcome {
            accepted: false,
            quarantined: false,
            code: reply.code,
            enhanced: status,
            text: Some(text),
            authentication_results: None,
        }
    };
    if greeting.code != 220 {
        return refused(greeting);
    }
    assert_eq!(client.cmd(&format!("EHLO {}", case.helo)).await.code, 250);
    let reply = client.cmd(&format!("MAIL FROM:<{}>", case.mail_from)).await;
    if reply.code != 250 {
        return refused(reply);
    }
    let reply = client.cmd(&format!("RCPT TO:<{}>", case.rcpt)).await;
    if reply.code != 250 {
        return refused(reply);
    }
    assert_eq!(client.cmd("DATA").await.code, 354);
    client
        .send(format!("{}.\r\n", case.message).as_bytes())
        .await;
    let reply = client.read_reply().await;
    client.cmd("QUIT").await;
    if reply.code != 250 {
        return refused(reply);
    }
    let messages = backend.messages();
    assert_eq!(messages.len(), before + 1, "{}: not relayed", case.name);
    let relayed = messages[before].text();
    Outcome {
        accepted: true,
        quarantined: relayed.contains("\r\nX-Spam-Flag: YES\r\n")
            || relayed.starts_with("X-Spam-Flag: YES\r\n"),
        code: reply.code,
        enhanced: reply.status().to_string(),
        text: None,
        authentication_results: results_header(&relayed),
    }
}

/// Our Authentication-Results field in a relayed message, unfolded as `explain`
/// prints it (`write_folded` folds only at the places `unfolded` turns into spaces).
fn results_header(message: &str) -> Option<String> {
    let start = message.find("Authentication-Results:")?;
    let rest = &message[start + "Authentication-Results:".len()..];
    let end = rest.find("\r\n").unwrap();
    let mut value = rest[..end].to_string();
    let mut rest = &rest[end + 2..];
    while let Some(continued) = rest.strip_prefix('\t') {
        let end = continued.find("\r\n").unwrap();
        value.push(' ');
        value.push_str(&continued[..end]);
        rest = &continued[end + 2..];
    }
    Some(value.trim_start().to_string())
}

/// `mxgate explain --json` for `case` with these recipients.
async fn explain_json(
    gw: &Gateway,
    dir: &std::path::Path,
    case: &Case,
    rcpts: &[&str],
) -> serde_json::Value {
    let path = dir.join(format!("{}.eml", case.name.replace(' ', "-")));
    std::fs::write(&path, &case.message).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mxgate"));
    command
        .args(["explain", "--json", "--config"])
        .arg(&gw.config_path)
        .args(["--ip", case.ip, "--helo", case.helo])
        .args(["--mail-from", case.mail_from]);
    for rcpt in rcpts {
        command.args(["--rcpt", rcpt]);
    }
    command.arg(&path);
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}: {out}\n{}",
        case.name,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{}: {e}: {out}", case.name))
}

async fn explained(gw: &Gateway, dir: &std::path::Path, case: &Case) -> Outcome {
    let v = explain_json(gw, dir, case, &[case.rcpt]).await;
    let verdict = &v["verdict"];
    let action = verdict["action"].as_str().unwrap();
    assert_eq!(action, case.action, "{}: {v:#}", case.name);
    let accepted = matches!(action, "deliver" | "quarantine");
    Outcome {
        accepted,
        quarantined: action == "quarantine",
        code: verdict["code"].as_u64().unwrap() as u16,
        enhanced: verdict["enhanced"].as_str().unwrap().to_string(),
        text: (!accepted).then(|| verdict["text"].as_str().unwrap().to_string()),
        authentication_results: v["authentication_results"].as_str().map(str::to_string),
    }
}

struct Setup {
    _dns: TestDns,
    backend: FakeBackend,
    dir: tempfile::TempDir,
    gw: Gateway,
    rsa: DkimKey,
    ed: DkimKey,
}

/// The sender zones, an SMTP backend, and a gateway with the policy.
async fn setup() -> Setup {
    let dns = TestDns::start().await;
    let (rsa, ed) = zone(&dns);
    let backend = FakeBackend::start(Behaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    let gw = Gateway::start(TestConfig {
        trusted: vec![format!("{TRUSTED_IP}/32")],
        backends: vec![backend.url()],
        extra: format!(
            "{}policy:\n  files: [\"{}\"]\n",
            dns.config(),
            dir.path().join("policy.yaml").display()
        ),
        ..Default::default()
    })
    .await;
    Setup {
        _dns: dns,
        backend,
        dir,
        gw,
        rsa,
        ed,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_and_smtp_agree_on_every_message_of_the_corpus() {
    let Setup {
        _dns,
        backend,
        dir,
        gw,
        rsa,
        ed,
    } = setup().await;
    for case in corpus(&rsa, &ed) {
        let smtp = over_smtp(&gw, &backend, &case).await;
        let explain = explained(&gw, dir.path(), &case).await;
        assert_eq!(smtp, explain, "{}: SMTP and explain disagree", case.name);
        // Checked mail carries the results; the trusted client's was not checked.
        assert_eq!(
            smtp.authentication_results.is_some(),
            smtp.accepted && case.ip != TRUSTED_IP,
            "{}: {smtp:?}",
            case.name
        );
    }
    gw.stop().await;
}

/// Recipients refused at RCPT (one in no domain of ours, one a rule refuses) leave
/// the message to the others: `explain` lists them with the replies RCPT gave, and its
/// verdict is about the rest (it used to refuse the whole message).
#[tokio::test(flavor = "multi_thread")]
async fn recipients_refused_at_rcpt_leave_the_message_to_the_others() {
    let Setup {
        _dns,
        backend,
        dir,
        gw,
        rsa,
        ..
    } = setup().await;
    let case = Case {
        name: "three recipients",
        ip: LEGIT_IP,
        helo: "mail.sender.test",
        mail_from: "alice@sender.test",
        rcpt: "",
        message: rsa.sign(&message("From: alice@sender.test\n", "three")),
        action: "deliver",
    };
    let rcpts = ["eve@elsewhere.test", "bob@example.test", "ceo@example.test"];
    assert!(support::net::source_address(case.ip));
    let (mut client, _) = SmtpClient::connect_from(gw.smtp, case.ip).await;
    assert_eq!(client.cmd(&format!("EHLO {}", case.helo)).await.code, 250);
    assert_eq!(client.cmd("MAIL FROM:<alice@sender.test>").await.code, 250);
    let mut refused_live = Vec::new();
    for rcpt in rcpts {
        let reply = client.cmd(&format!("RCPT TO:<{rcpt}>")).await;
        if reply.code != 250 {
            refused_live.push((rcpt.to_string(), reply.code, reply.status().to_string()));
        }
    }
    assert_eq!(client.cmd("DATA").await.code, 354);
    client
        .send(format!("{}.\r\n", case.message).as_bytes())
        .await;
    let reply = client.read_reply().await;
    assert_eq!(
        reply.code, 250,
        "{reply}; refused at RCPT: {refused_live:?}"
    );
    let relayed = backend.messages().pop().unwrap();
    assert_eq!(relayed.rcpts, ["bob@example.test"]);

    let v = explain_json(&gw, dir.path(), &case, &rcpts).await;
    let refused_explained: Vec<(String, u16, String)> = v["refused_rcpts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["rcpt"].as_str().unwrap().to_string(),
                r["code"].as_u64().unwrap() as u16,
                r["enhanced"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(refused_explained, refused_live, "{v:#}");
    assert_eq!(refused_live.len(), 2);
    assert_eq!(v["refused_rcpts"][1]["rule"], "ceo-protection", "{v:#}");
    assert!(v["refused_rcpts"][0].get("rule").is_none(), "{v:#}");
    assert_eq!(v["verdict"]["action"], "deliver", "{v:#}");
    assert_eq!(
        v["authentication_results"].as_str(),
        results_header(&relayed.text()).as_deref()
    );
    gw.stop().await;
}
