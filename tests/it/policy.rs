//! The sender policy over SMTP, with a real DNS server: allowlists that need evidence,
//! actions, TLS rules, shadow mode, validation and hot reload.

use mxgate_test_kit as support;

use std::time::Duration;
use support::backend::{Behaviour, FakeBackend};
use support::client::{Reply, SmtpClient};
use support::dkim::DkimKey;
use support::dns::TestDns;
use support::gateway::{Gateway, TestConfig};
use support::mail;

/// customer.test publishes p=reject and SPF for its own servers only: mail from the
/// SaaS senders below fails DMARC unless the policy lets it in.
fn zone(dns: &TestDns) {
    dns.txt("customer.test", "v=spf1 ip4:198.51.100.1 -all");
    dns.txt("_dmarc.customer.test", "v=DMARC1; p=reject");
    dns.txt("netvisor.fi", "v=spf1 ip4:198.51.100.2 -all");
    dns.txt("_dmarc.netvisor.fi", "v=DMARC1; p=reject");
    // Visma's ERP host, forward-confirmed.
    dns.ptr("192.0.2.20", "smtp.od.visma.fi");
    dns.a("smtp.od.visma.fi", "192.0.2.20");
    // A host that claims to be Visma's in its PTR, but the name does not lead back.
    dns.ptr("192.0.2.21", "smtp.od.visma.fi");
    // Netigate's SPF record with an include.
    dns.txt(
        "_spf.netigate.se",
        "v=spf1 ip4:192.0.2.30 include:_spf2.netigate.se -all",
    );
    dns.txt("_spf2.netigate.se", "v=spf1 ip4:192.0.2.31 -all");
    // The German service's record works with exists: and macros: the client IP (%{i})
    // listed under _ip, or the sender (%{l}, %{o}) at the HELO name (%{h}).
    dns.txt(
        "_spf.ntgt.de",
        "v=spf1 exists:%{i}._ip.ntgt.de exists:%{l}.%{o}.%{h}._helo.ntgt.de -all",
    );
    dns.a("192.0.2.40._ip.ntgt.de", "127.0.0.2");
    dns.a("survey.ntgt.de.sender.host.test._helo.ntgt.de", "127.0.0.2");
}

const POLICY: &str = r#"rules:
  - name: netvisor-invoices
    match:
      header_from: noreply@netvisor.fi
      dkim_domain: [netvisor.fi, amazonses.com]
    action: accept
  - name: visma-erp
    match:
      client_host: smtp.od.visma.fi
    action: accept
  - name: netigate-surveys
    match:
      spf_record: [_spf.netigate.se, _spf.ntgt.de]
      envelope_from: [survey@netigate.se, survey@ntgt.de]
    action: accept
"#;

async fn gateway(dns: &TestDns, policy: &str, extra: &str) -> (Gateway, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let policy_path = dir.path().join("policies/allowlist.yaml");
    std::fs::write(&policy_path, policy).unwrap();
    let config = TestConfig {
        extra: format!(
            "{}policy:\n  files: [\"policies/*.yaml\"]\n  reload_interval: 200ms\n{extra}",
            dns.config()
        ),
        ..Default::default()
    };
    let yaml = config.yaml(dir.path());
    (Gateway::start_yaml(dir, &yaml).await, policy_path)
}

async fn send(gw: &Gateway, source: &str, mail_from: &str, data: &str) -> Reply {
    assert!(support::net::source_address(source), "need {source}");
    let (mut client, _) = SmtpClient::connect_from(gw.smtp, source).await;
    assert_eq!(client.cmd("EHLO sender.host.test").await.code, 250);
    client
        .send_mail(mail_from, &["bob@example.test"], data)
        .await
}

fn message(from: &str, subject: &str) -> String {
    mail::message(from, subject)
        .id_domain("x.test")
        .body("hello\n")
        .text()
}

fn results(gw: &Gateway, n: usize) -> String {
    let delivered = gw.delivered()[n].replace("\n\t", " ");
    delivered
        .lines()
        .find(|l| l.starts_with("Authentication-Results: mx.example.test;"))
        .unwrap_or_else(|| panic!("no results:\n{delivered}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn forward_confirmed_host_is_allowlisted_and_a_lying_ptr_is_not() {
    let dns = TestDns::start().await;
    zone(&dns);
    let (gw, _) = gateway(&dns, POLICY, "").await;
    // The ERP sends as the user's own address; customer.test's DMARC fails.
    let reply = send(
        &gw,
        "192.0.2.20",
        "jane.doe@customer.test",
        &message("jane.doe@customer.test", "erp"),
    )
    .await;
    assert_eq!(reply.code, 250, "{reply}");
    let ar = results(&gw, 0);
    assert!(
        ar.contains("dmarc=fail (p=reject, overridden by local policy: policy rule `visma-erp`)"),
        "{ar}"
    );
    assert!(ar.contains("iprev=pass (smtp.od.visma.fi)"), "{ar}");
    // Same claim in PTR, but not forward-confirmed: the rule does not match.
    let reply = send(
        &gw,
        "192.0.2.21",
        "jane.doe@customer.test",
        &message("jane.doe@customer.test", "fake-erp"),
    )
    .await;
    assert_eq!((reply.code, reply.status()), (550, "5.7.1"), "{reply}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn spf_record_authorises_the_survey_service() {
    let dns = TestDns::start().await;
    zone(&dns);
    let (gw, _) = gateway(&dns, POLICY, "").await;
    for ip in ["192.0.2.30", "192.0.2.31"] {
        let reply = send(
            &gw,
            ip,
            "survey@netigate.se",
            &message("first.last@customer.test", ip),
        )
        .await;
        assert_eq!(reply.code, 250, "{ip} (via include:): {reply}");
    }
    // exists: with macros: %{i} matches for 192.0.2.40; for 192.0.2.41, %{l}.%{o}.%{h}
    // matches because the record sees the real sender and HELO name.
    for ip in ["192.0.2.40", "192.0.2.41"] {
        let reply = send(
            &gw,
            ip,
            "survey@ntgt.de",
            &message("first.last@customer.test", ip),
        )
        .await;
        assert_eq!(reply.code, 250, "{ip} (via exists:): {reply}");
    }
    // Not in Netigate's records.
    let reply = send(
        &gw,
        "192.0.2.32",
        "survey@netigate.se",
        &message("first.last@customer.test", "other"),
    )
    .await;
    assert_eq!(reply.code, 550, "{reply}");
    // In the records, but another envelope sender.
    let reply = send(
        &gw,
        "192.0.2.30",
        "someone@netigate.se",
        &message("first.last@customer.test", "env"),
    )
    .await;
    assert_eq!(reply.code, 550, "{reply}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_allowlisted_from_address_needs_its_dkim_evidence() {
    let dns = TestDns::start().await;
    zone(&dns);
    let ses = DkimKey::rsa("amazonses.com", "ug7nbtf4", 2048);
    ses.publish(&dns);
    let (gw, _) = gateway(&dns, POLICY, "").await;
    // Through Amazon SES: DKIM by amazonses.com, not aligned with netvisor.fi.
    let signed = ses.sign(&message("noreply@netvisor.fi", "invoice"));
    let reply = send(&gw, "192.0.2.40", "0100018f@amazonses.com", &signed).await;
    assert_eq!(reply.code, 250, "{reply}");
    assert!(results(&gw, 0).contains("policy rule `netvisor-invoices`"));
    // The same From address from an unlisted IP without the signature: a spoof.
    let reply = send(
        &gw,
        "192.0.2.41",
        "noreply@netvisor.fi",
        &message("noreply@netvisor.fi", "spoof"),
    )
    .await;
    assert_eq!((reply.code, reply.status()), (550, "5.7.1"), "{reply}");
    assert!(reply.text().contains("netvisor.fi"), "{reply}");
    // The signature, but a second From address riding along, also one whose domain
    // is no domain (left out of DMARC's view, never out of the rule's).
    for from in [
        "noreply@netvisor.fi, ceo@customer.test",
        "noreply@netvisor.fi, ceo@-customer.test",
    ] {
        let signed = ses.sign(&message(from, "ride"));
        let reply = send(&gw, "192.0.2.40", "0100018f@amazonses.com", &signed).await;
        assert_eq!(reply.code, 550, "From: {from}: {reply}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn actions_reject_tempfail_tag_quarantine() {
    let dns = TestDns::start().await;
    zone(&dns);
    dns.txt("partner.test", "v=spf1 ip4:192.0.2.50 -all");
    let policy = r#"rules:
  - name: block-spammer
    match: { client_ip: 192.0.2.66 }
    action: reject
    reply: { code: 554, status: "5.7.1", text: "Your network is blocked; contact postmaster@example.test" }
  - name: slow-down
    match: { helo: "*.slow.test" }
    action: tempfail
    reply: { code: 450, status: "4.7.1", text: "Try again later" }
  - name: ceo-protection
    match: { rcpt: ceo@example.test }
    action: reject
  - name: tag-partner
    match: { envelope_from: partner.test, spf: pass }
    action: tag
    header: "X-Partner: yes"
  - name: hold-suspicious
    match: { dmarc: fail, header_from: "*.lookalike.test" }
    action: quarantine
"#;
    let (gw, _) = gateway(&dns, policy, "").await;

    assert!(support::net::source_address("192.0.2.66"));
    let (mut client, greeting) = SmtpClient::connect_from(gw.smtp, "192.0.2.66").await;
    assert_eq!(
        (greeting.code, greeting.status()),
        (554, "5.7.1"),
        "refused at connect: {greeting}"
    );
    assert!(greeting.text().contains("Your network is blocked"));
    assert!(client.is_closed().await);

    assert!(support::net::source_address("192.0.2.50"));
    let (mut client, _) = SmtpClient::connect_from(gw.smtp, "192.0.2.50").await;
    assert_eq!(client.cmd("EHLO a.slow.test").await.code, 250);
    let reply = client.cmd("MAIL FROM:<x@partner.test>").await;
    assert_eq!((reply.code, reply.status()), (450, "4.7.1"), "{reply}");
    assert_eq!(client.cmd("EHLO mail.partner.test").await.code, 250);
    assert_eq!(client.cmd("MAIL FROM:<x@partner.test>").await.code, 250);
    let reply = client.cmd("RCPT TO:<ceo@example.test>").await;
    assert_eq!(
        (reply.code, reply.status()),
        (550, "5.7.1"),
        "per-recipient refusal: {reply}"
    );
    assert_eq!(client.cmd("RCPT TO:<bob@example.test>").await.code, 250);
    assert_eq!(client.cmd("DATA").await.code, 354);
    client
        .send(support::crlf(&format!("{}.\n", message("x@partner.test", "tagged"))).as_bytes())
        .await;
    assert_eq!(client.read_reply().await.code, 250);
    assert!(
        gw.delivered()[0].contains("\nX-Partner: yes\n"),
        "{}",
        gw.delivered()[0]
    );

    dns.txt("_dmarc.lookalike.test", "v=DMARC1; p=none");
    let reply = send(
        &gw,
        "192.0.2.51",
        "a@b.lookalike.test",
        &message("boss@b.lookalike.test", "lookalike"),
    )
    .await;
    assert_eq!(reply.code, 250, "{reply}");
    assert!(
        gw.delivered()[1].contains("\nX-Spam-Flag: YES\n"),
        "quarantined with the header"
    );
    gw.stop().await;
}

/// Rules on recipients decide per recipient: a refusal refuses that recipient whatever
/// came before it, and an `accept` for one mailbox (abuse@ takes everything) applies
/// only when every recipient of the message is that mailbox.
#[tokio::test(flavor = "multi_thread")]
async fn recipient_rules_decide_per_recipient() {
    let dns = TestDns::start().await;
    zone(&dns);
    let policy = r#"rules:
  - name: abuse-takes-everything
    match: { rcpt: abuse@example.test }
    action: accept
  - name: ceo-protection
    match: { rcpt: ceo@example.test }
    action: reject
  - name: cfo-review
    match: { rcpt: cfo@example.test }
    action: quarantine
"#;
    let (gw, _) = gateway(&dns, policy, "").await;
    // customer.test is p=reject and 192.0.2.60 is not its server: a spoof.
    let spoof = support::crlf(&format!("{}.\n", message("boss@customer.test", "spoof")));
    assert!(support::net::source_address("192.0.2.60"));
    let (mut client, _) = SmtpClient::connect_from(gw.smtp, "192.0.2.60").await;
    assert_eq!(client.cmd("EHLO sender.host.test").await.code, 250);

    // abuse@ first, then the others: the CEO is still refused, and the message as a
    // whole is judged by DMARC, which rejects it.
    assert_eq!(client.cmd("MAIL FROM:<boss@customer.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<abuse@example.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<bob@example.test>").await.code, 250);
    let reply = client.cmd("RCPT TO:<ceo@example.test>").await;
    assert_eq!((reply.code, reply.status()), (550, "5.7.1"), "{reply}");
    assert_eq!(client.cmd("DATA").await.code, 354);
    client.send(spoof.as_bytes()).await;
    let reply = client.read_reply().await;
    assert_eq!((reply.code, reply.status()), (550, "5.7.1"), "{reply}");
    assert!(reply.text().contains("DMARC"), "{reply}");
    assert!(gw.delivered().is_empty());

    // To abuse@ alone, the same spoof is delivered: that mailbox takes everything.
    assert_eq!(client.cmd("MAIL FROM:<boss@customer.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<abuse@example.test>").await.code, 250);
    assert_eq!(client.cmd("DATA").await.code, 354);
    client.send(spoof.as_bytes()).await;
    let reply = client.read_reply().await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(gw.delivered().len(), 1);
    assert!(gw.delivered()[0].contains("Delivered-To: abuse@example.test\n"));

    // A restriction on one recipient cannot be dodged by adding another: mail for the
    // CFO and bob (from a sender without DMARC) is quarantined for both.
    assert_eq!(client.cmd("MAIL FROM:<x@nodmarc.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<cfo@example.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<bob@example.test>").await.code, 250);
    assert_eq!(client.cmd("DATA").await.code, 354);
    let plain = support::crlf(&format!("{}.\n", message("x@nodmarc.test", "review")));
    client.send(plain.as_bytes()).await;
    let reply = client.read_reply().await;
    assert_eq!(reply.code, 250, "{reply}");
    let delivered = &gw.delivered()[1];
    assert!(delivered.contains("\nX-Spam-Flag: YES\n"), "{delivered}");
    assert!(
        delivered.contains("Delivered-To: bob@example.test\n"),
        "{delivered}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn quarantine_to_an_address() {
    let dns = TestDns::start().await;
    zone(&dns);
    let backend = FakeBackend::start(Behaviour::default()).await;
    let policy = "rules:\n  - name: to-quarantine\n    match: { dmarc: fail }\n    action: quarantine\n    quarantine_to: quarantine@example.test\n";
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/q.yaml"), policy).unwrap();
    let config = TestConfig {
        backends: vec![backend.url()],
        extra: format!(
            "{}relay:\n  tls: off\npolicy:\n  files: [\"policies/*.yaml\"]\n",
            dns.config()
        ),
        ..Default::default()
    };
    let yaml = config.yaml(dir.path());
    let gw = Gateway::start_yaml(dir, &yaml).await;
    let reply = send(
        &gw,
        "192.0.2.60",
        "x@customer.test",
        &message("x@customer.test", "q"),
    )
    .await;
    assert_eq!(reply.code, 250, "{reply}");
    let messages = backend.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].rcpts, vec!["quarantine@example.test"]);
    assert!(
        messages[0]
            .text()
            .contains("X-Mxgate-Quarantined-For: bob@example.test")
    );
    // A backend that refuses the quarantine address (a typo in the config, a mailbox
    // removed) must not turn kept mail into a bounce: 451, the sender retries.
    backend.set(|b| {
        b.rcpt_replies.insert(
            "quarantine@example.test".into(),
            "550 5.1.1 no such user".into(),
        );
    });
    let reply = send(
        &gw,
        "192.0.2.60",
        "x@customer.test",
        &message("x@customer.test", "q2"),
    )
    .await;
    assert_eq!((reply.code, reply.status()), (451, "4.3.0"), "{reply}");
    assert!(reply.text().contains("quarantine unavailable"), "{reply}");
    assert_eq!(backend.messages().len(), 1, "nothing more delivered");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_rules_per_sender() {
    let dns = TestDns::start().await;
    zone(&dns);
    let policy = r#"rules:
  - name: bank-needs-tls
    match: { envelope_from: bank.test }
    action: require_tls
  - name: old-scanner
    match: { client_ip: 192.0.2.70 }
    action: allow_plaintext
"#;
    let (gw, _) = gateway(&dns, policy, "").await;
    let (mut client, _) = SmtpClient::connect_from(gw.smtp, "127.0.0.9").await;
    assert_eq!(client.cmd("EHLO x.test").await.code, 250);
    let reply = client.cmd("MAIL FROM:<pay@bank.test>").await;
    assert_eq!((reply.code, reply.status()), (530, "5.7.0"), "{reply}");
    assert_eq!(
        client.cmd("MAIL FROM:<someone@other.test>").await.code,
        250,
        "others may send in plaintext"
    );
    gw.stop().await;

    // With tls.require on, the scanner is exempt.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/tls.yaml"), policy).unwrap();
    let yaml = TestConfig {
        require_tls: true,
        extra: format!("{}policy:\n  files: [\"policies/*.yaml\"]\n", dns.config()),
        ..Default::default()
    }
    .yaml(dir.path());
    let gw = Gateway::start_yaml(dir, &yaml).await;
    assert!(support::net::source_address("192.0.2.70"));
    let (mut client, _) = SmtpClient::connect_from(gw.smtp, "192.0.2.70").await;
    assert_eq!(client.cmd("EHLO scanner.test").await.code, 250);
    assert_eq!(client.cmd("MAIL FROM:<scan@customer.test>").await.code, 250);
    let (mut client, _) = SmtpClient::connect_from(gw.smtp, "127.0.0.9").await;
    assert_eq!(client.cmd("EHLO x.test").await.code, 250);
    assert_eq!(client.cmd("MAIL FROM:<a@other.test>").await.code, 530);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shadow_rules_are_counted_not_applied() {
    let dns = TestDns::start().await;
    zone(&dns);
    let policy = "rules:\n  - name: would-block\n    mode: shadow\n    match: { client_ip: 127.0.0.0/8 }\n    action: reject\n";
    let (gw, _) = gateway(&dns, policy, "metrics:\n  listen: 127.0.0.1:0\n").await;
    let (mut client, _) = SmtpClient::connect_from(gw.smtp, "127.0.0.9").await;
    assert_eq!(client.cmd("EHLO x.test").await.code, 250);
    assert_eq!(
        client.cmd("MAIL FROM:<a@other.test>").await.code,
        250,
        "a shadow reject does not reject"
    );
    let metrics = mxgate::metrics::render();
    assert!(
        metrics.contains(
            "mxgate_policy_rule_hits_total{action=\"reject\",mode=\"shadow\",rule=\"would-block\"}"
        ),
        "{metrics}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_applies_good_policies_and_keeps_the_old_one_on_errors() {
    let dns = TestDns::start().await;
    zone(&dns);
    let (gw, policy_path) = gateway(&dns, "rules: []\n", "").await;
    let running = gw.running.as_ref().unwrap();
    let spoof = message("jane.doe@customer.test", "reload");
    assert_eq!(
        send(&gw, "192.0.2.20", "jane@customer.test", &spoof)
            .await
            .code,
        550
    );

    std::fs::write(&policy_path, POLICY).unwrap();
    let generation = running.reload().expect("good policy reloads");
    assert_eq!(generation, 2);
    assert_eq!(
        send(&gw, "192.0.2.20", "jane@customer.test", &spoof)
            .await
            .code,
        250,
        "new rules apply"
    );

    // A broken file: the reload fails with positions, the running policy stays.
    std::fs::write(
        &policy_path,
        "rules:\n  - name: broken\n    match: { clinet_ip: 1.2.3.4 }\n    action: accept\n",
    )
    .unwrap();
    let errors = running.reload().unwrap_err();
    assert!(errors[0].to_string().contains("allowlist.yaml:3:14: rule `broken`: rules[0].match.clinet_ip: unknown field `clinet_ip`"), "{}", errors[0]);
    assert_eq!(running.snapshots.load().generation, 2);
    assert_eq!(
        send(&gw, "192.0.2.20", "jane@customer.test", &spoof)
            .await
            .code,
        250,
        "old rules still apply"
    );

    // The file watcher notices a fixed file by itself.
    std::fs::write(&policy_path, "rules: []\n").unwrap();
    let mut generation = 2;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        generation = running.snapshots.load().generation;
        if generation > 2 {
            break;
        }
    }
    assert_eq!(generation, 3, "the file change was not picked up");
    assert_eq!(
        send(&gw, "192.0.2.20", "jane@customer.test", &spoof)
            .await
            .code,
        550
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn transactions_in_flight_keep_their_policy_during_reloads() {
    let dns = TestDns::start().await;
    zone(&dns);
    let (gw, policy_path) = gateway(&dns, POLICY, "").await;
    let running = gw.running.as_ref().unwrap();
    assert!(support::net::source_address("192.0.2.20"));
    // A transaction starts under the allowlist...
    let (mut slow, _) = SmtpClient::connect_from(gw.smtp, "192.0.2.20").await;
    assert_eq!(slow.cmd("EHLO erp.test").await.code, 250);
    assert_eq!(slow.cmd("MAIL FROM:<jane@customer.test>").await.code, 250);
    // ...traffic goes on while the policy is rewritten again and again...
    let addr = gw.smtp;
    let traffic = tokio::spawn(async move {
        let mut codes = Vec::new();
        for n in 0..20 {
            let (mut client, _) = SmtpClient::connect_from(addr, "192.0.2.20").await;
            client.cmd("EHLO erp.test").await;
            let reply = client
                .send_mail(
                    "jane@customer.test",
                    &["bob@example.test"],
                    &message("jane@customer.test", &format!("t{n}")),
                )
                .await;
            codes.push(reply.code);
        }
        codes
    });
    for n in 0..10 {
        let text = if n % 2 == 0 { "rules: []\n" } else { POLICY };
        std::fs::write(&policy_path, text).unwrap();
        running.reload().unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(&policy_path, "rules: []\n").unwrap();
    running.reload().unwrap();
    let codes = traffic.await.unwrap();
    assert!(
        codes.iter().all(|c| *c == 250 || *c == 550),
        "only definite answers: {codes:?}"
    );
    // ...and the old transaction finishes under the policy it started with.
    assert_eq!(slow.cmd("RCPT TO:<bob@example.test>").await.code, 250);
    assert_eq!(slow.cmd("DATA").await.code, 354);
    slow.send(
        support::crlf(&format!("{}.\n", message("jane.doe@customer.test", "old"))).as_bytes(),
    )
    .await;
    assert_eq!(
        slow.read_reply().await.code,
        250,
        "the allowlist still applies to this connection"
    );
    gw.stop().await;
}

/// SIGHUP (not the file poll, which is set to an hour here) reloads the policy, the log
/// says what changed, and a broken file afterwards leaves the running policy in place.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_and_logs_what_changed() {
    use support::gateway::GatewayProcess;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let policy_path = dir.path().join("policies/rules.yaml");
    std::fs::write(
        &policy_path,
        "rules:\n  - name: old-rule\n    match: { client_ip: 198.51.100.99 }\n    action: reject\n",
    )
    .unwrap();
    let config = TestConfig {
        extra: "policy:\n  files: [\"policies/*.yaml\"]\n  reload_interval: 1h\n".into(),
        ..Default::default()
    };
    let config_path = dir.path().join("mxgate.yaml");
    std::fs::write(&config_path, config.yaml(dir.path())).unwrap();
    let gateway = GatewayProcess::spawn(&config_path);
    assert!(support::net::source_address("192.0.2.70"));
    let greeting = |gateway: &GatewayProcess| {
        let smtp = gateway.smtp;
        async move { SmtpClient::connect_from(smtp, "192.0.2.70").await.1 }
    };
    assert_eq!(greeting(&gateway).await.code, 220);

    std::fs::write(
        &policy_path,
        "rules:\n  - name: block-test-net\n    match: { client_ip: 192.0.2.70 }\n    action: reject\n",
    )
    .unwrap();
    gateway.signal(libc::SIGHUP);
    let log = wait_for_log(&gateway, "configuration reloaded").await;
    let line = log
        .lines()
        .find(|l| l.contains("configuration reloaded"))
        .unwrap();
    for part in [
        "SIGHUP",
        "rules added: block-test-net",
        "rules removed: old-rule",
    ] {
        assert!(line.contains(part), "{part:?} not in {line:?}");
    }
    assert_eq!(greeting(&gateway).await.code, 554, "new policy applies");

    std::fs::write(
        &policy_path,
        "rules:\n  - name: broken\n    match: { nonsense: 1 }\n",
    )
    .unwrap();
    gateway.signal(libc::SIGHUP);
    let log = wait_for_log(&gateway, "configuration reload failed").await;
    assert!(
        log.contains("rules.yaml:3:"),
        "the error names file and line:\n{log}"
    );
    assert_eq!(
        greeting(&gateway).await.code,
        554,
        "the running policy stays"
    );
}

/// The limits store is opened once, at start-up: a reload that changes its settings
/// says that the store stays as it was until a restart (and one that does not, does not).
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_changes_the_limits_store_says_it_needs_a_restart() {
    use support::gateway::GatewayProcess;
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("mxgate.yaml");
    let write = |prefix: &str| {
        let config = TestConfig {
            extra: format!("limits:\n  store_key_prefix: \"{prefix}\"\n"),
            ..Default::default()
        };
        std::fs::write(&config_path, config.yaml(dir.path())).unwrap();
    };
    write("first:");
    let gateway = GatewayProcess::spawn(&config_path);
    write("first:");
    gateway.signal(libc::SIGHUP);
    let log = wait_for_log(&gateway, "configuration reloaded").await;
    assert!(!log.contains("changes only on restart"), "{log}");
    write("second:");
    gateway.signal(libc::SIGHUP);
    wait_for_log(&gateway, "the limits store changes only on restart").await;
}

async fn wait_for_log(gateway: &support::gateway::GatewayProcess, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = gateway.log();
        if log.contains(needle) {
            return log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{needle:?} not logged:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A rule on the iprev result decides at MAIL, as soon as the check started at connect
/// has its answer, not only at the end of data.
#[tokio::test(flavor = "multi_thread")]
async fn iprev_rules_decide_at_mail() {
    let dns = TestDns::start().await;
    zone(&dns);
    let policy = r#"rules:
  - name: need-reverse-dns
    match: { iprev: [fail, permerror] }
    action: tempfail
    reply: { code: 450, status: "4.7.25", text: "Reverse DNS of your address does not match" }
"#;
    let (gw, _) = gateway(&dns, policy, "").await;
    for (source, code) in [("192.0.2.21", 450), ("192.0.2.20", 250)] {
        assert!(support::net::source_address(source));
        let (mut client, _) = SmtpClient::connect_from(gw.smtp, source).await;
        assert_eq!(client.cmd("EHLO sender.host.test").await.code, 250);
        let reply = client.cmd("MAIL FROM:<x@customer.test>").await;
        assert_eq!(reply.code, code, "{source}: {reply}");
        if code == 450 {
            assert_eq!(reply.status(), "4.7.25");
        }
    }
    gw.stop().await;
}

/// An accept decides whether the sender may be believed, not whether From can be read:
/// a From naming more than 10 domains, or two From fields, is refused after it too.
#[tokio::test(flavor = "multi_thread")]
async fn an_accepted_sender_still_needs_a_readable_from() {
    let dns = TestDns::start().await;
    zone(&dns);
    let (gw, _) = gateway(&dns, POLICY, "").await;
    let many: Vec<String> = (0..11).map(|n| format!("a@d{n}.customer.test")).collect();
    let eleven = mail::message("x@customer.test", "many")
        .from_lines(&format!("From: {}\n", many.join(", ")))
        .id_domain("x.test")
        .text();
    let reply = send(&gw, "192.0.2.20", "jane.doe@customer.test", &eleven).await;
    assert_eq!((reply.code, reply.status()), (550, "5.7.1"), "{reply}");
    let two = mail::message("x@customer.test", "two")
        .from_lines("From: jane.doe@customer.test\nFrom: ceo@customer.test\n")
        .id_domain("x.test")
        .text();
    let reply = send(&gw, "192.0.2.20", "jane.doe@customer.test", &two).await;
    assert_eq!((reply.code, reply.status()), (550, "5.7.1"), "{reply}");
    assert!(gw.delivered().is_empty());
    gw.stop().await;
}

/// A p=reject failure a rule quarantines is delivered: Authentication-Results says the
/// policy was overridden, as for an accept.
#[tokio::test(flavor = "multi_thread")]
async fn a_quarantined_reject_failure_is_recorded_as_overridden() {
    let dns = TestDns::start().await;
    zone(&dns);
    let policy = r#"rules:
  - name: visma-quarantine
    match:
      client_host: smtp.od.visma.fi
    action: quarantine
"#;
    let (gw, _) = gateway(&dns, policy, "").await;
    let reply = send(
        &gw,
        "192.0.2.20",
        "jane.doe@customer.test",
        &message("jane.doe@customer.test", "q"),
    )
    .await;
    assert_eq!(reply.code, 250, "{reply}");
    let ar = results(&gw, 0);
    assert!(
        ar.contains("overridden by local policy: policy rule `visma-quarantine`")
            && ar.contains("policy.override=local_policy"),
        "{ar}"
    );
    gw.stop().await;
}
