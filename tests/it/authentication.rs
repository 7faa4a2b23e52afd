//! SPF, DKIM, DMARC, ARC and iprev over SMTP, with a real DNS server started by the
//! test serving the zones, and messages signed by mail-auth and by python3-dkim.

use mxgate_test_kit as support;

use support::client::{Reply, SmtpClient};
use support::dkim::DkimKey;
use support::dns::TestDns;
use support::gateway::{Gateway, TestConfig};
use support::mail::{self, sender_zone};

/// The sender's real outbound server (SPF-authorised, with forward-confirmed PTR).
const LEGIT_IP: &str = mail::SENDER_IP;
/// Some other host.
const OTHER_IP: &str = "127.0.0.66";

fn message(from: &str, subject: &str) -> String {
    mail::message(&format!("Alice <{from}>"), subject).text()
}

async fn gateway(dns: &TestDns, extra: &str) -> Gateway {
    Gateway::start(TestConfig {
        extra: format!("{}{extra}", dns.config()),
        ..Default::default()
    })
    .await
}

async fn send(gw: &Gateway, source: &str, helo: &str, from: &str, data: &str) -> Reply {
    assert!(
        support::net::source_address(source),
        "cannot send from {source}"
    );
    let (mut client, greeting) = SmtpClient::connect_from(gw.smtp, source).await;
    assert_eq!(greeting.code, 220);
    assert_eq!(client.cmd(&format!("EHLO {helo}")).await.code, 250);
    client.send_mail(from, &["bob@example.test"], data).await
}

fn results_header(message: &str) -> String {
    let start = message
        .find("Authentication-Results: mx.example.test;")
        .unwrap_or_else(|| panic!("no Authentication-Results in\n{message}"));
    let rest = &message[start..];
    let mut end = rest.find('\n').unwrap();
    while rest[end + 1..].starts_with(['\t', ' ']) {
        end += 1 + rest[end + 1..].find('\n').unwrap();
    }
    rest[..end].replace("\n\t", " ").replace("\n ", " ")
}

#[tokio::test(flavor = "multi_thread")]
async fn aligned_rsa_signature_passes_everything() {
    let dns = TestDns::start().await;
    let (rsa, _) = sender_zone(&dns, "v=DMARC1; p=reject");
    let gw = gateway(&dns, "").await;
    let signed = rsa.sign(&message("alice@sender.test", "rsa-pass"));
    let reply = send(
        &gw,
        LEGIT_IP,
        "mail.sender.test",
        "alice@sender.test",
        &signed,
    )
    .await;
    assert_eq!(reply.code, 250, "{reply}");
    let delivered = &gw.delivered()[0];
    let ar = results_header(delivered);
    for want in [
        "iprev=pass (mail.sender.test) policy.iprev=192.0.2.5",
        "spf=pass (domain of sender.test designates 192.0.2.5 as permitted sender) smtp.mailfrom=alice@sender.test",
        "spf=pass smtp.helo=mail.sender.test",
        "dkim=pass header.d=sender.test header.s=rsa2026 header.b=",
        "arc=none",
        "dmarc=pass (p=reject) header.from=sender.test policy.dmarc=reject",
    ] {
        assert!(ar.contains(want), "missing {want:?} in\n{ar}");
    }
    assert!(
        delivered.contains("Received: from mail.sender.test (mail.sender.test [192.0.2.5])"),
        "{delivered}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ed25519_signature_passes_from_any_ip() {
    let dns = TestDns::start().await;
    let (_, ed) = sender_zone(&dns, "v=DMARC1; p=reject");
    let gw = gateway(&dns, "").await;
    // SPF fails from this IP, but the aligned Ed25519 signature carries DMARC.
    let signed = ed.sign(&message("alice@sender.test", "ed-pass"));
    let reply = send(
        &gw,
        OTHER_IP,
        "relay.other.test",
        "alice@sender.test",
        &signed,
    )
    .await;
    assert_eq!(reply.code, 250, "{reply}");
    let ar = results_header(&gw.delivered()[0]);
    assert!(ar.contains("spf=fail"), "{ar}");
    assert!(
        ar.contains("dkim=pass header.d=sender.test header.s=ed2026"),
        "{ar}"
    );
    assert!(ar.contains("dmarc=pass"), "{ar}");
    assert!(
        ar.contains("iprev=permerror") || ar.contains("iprev=fail") || ar.contains("iprev=none"),
        "{ar}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn independently_signed_message_passes() {
    if std::process::Command::new("dkimsign")
        .arg("--help")
        .output()
        .is_err()
    {
        support::skip("python3-dkim's dkimsign is not installed (.ci/run installs it)");
        return;
    }
    let dns = TestDns::start().await;
    let (rsa, _) = sender_zone(&dns, "v=DMARC1; p=reject");
    let gw = gateway(&dns, "").await;
    let signed = rsa
        .sign_with_dkimpy(&message("alice@sender.test", "dkimpy"))
        .unwrap();
    assert!(signed.starts_with("DKIM-Signature:"), "{signed}");
    let reply = send(
        &gw,
        OTHER_IP,
        "relay.other.test",
        "alice@sender.test",
        &signed,
    )
    .await;
    assert_eq!(reply.code, 250, "{reply}");
    let ar = results_header(&gw.delivered()[0]);
    assert!(
        ar.contains("dkim=pass header.d=sender.test header.s=rsa2026"),
        "{ar}"
    );
    assert!(ar.contains("dmarc=pass"), "{ar}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_body_fails_and_p_reject_rejects() {
    let dns = TestDns::start().await;
    let (rsa, _) = sender_zone(&dns, "v=DMARC1; p=reject");
    let gw = gateway(&dns, "").await;
    let signed = rsa
        .sign(&message("alice@sender.test", "tampered"))
        .replace("invoice attached", "invoice attached, pay to IBAN XX00");
    let reply = send(
        &gw,
        OTHER_IP,
        "relay.other.test",
        "alice@sender.test",
        &signed,
    )
    .await;
    assert_eq!((reply.code, reply.status()), (550, "5.7.1"), "{reply}");
    assert!(
        reply.text().contains("sender.test"),
        "names the domain: {reply}"
    );
    assert!(reply.text().contains("DMARC"), "{reply}");
    assert!(gw.delivered().is_empty());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_body_with_spf_pass_is_delivered_with_dkim_fail() {
    let dns = TestDns::start().await;
    let (rsa, _) = sender_zone(&dns, "v=DMARC1; p=reject");
    let gw = gateway(&dns, "").await;
    let signed = rsa
        .sign(&message("alice@sender.test", "tampered-spf"))
        .replace("invoice attached", "invoice changed");
    let reply = send(
        &gw,
        LEGIT_IP,
        "mail.sender.test",
        "alice@sender.test",
        &signed,
    )
    .await;
    assert_eq!(reply.code, 250, "{reply}");
    let ar = results_header(&gw.delivered()[0]);
    assert!(
        ar.contains("dkim=fail (body hash did not verify) header.d=sender.test"),
        "{ar}"
    );
    assert!(ar.contains("dmarc=pass"), "{ar}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unaligned_signature_fails_dmarc_by_policy() {
    for (policy, code) in [("reject", 550), ("quarantine", 250), ("none", 250)] {
        let dns = TestDns::start().await;
        sender_zone(&dns, &format!("v=DMARC1; p={policy}"));
        // An email service signs with its own domain: valid but not aligned.
        let esp = DkimKey::rsa("esp.test", "s1", 2048);
        esp.publish(&dns);
        let gw = gateway(&dns, "").await;
        let signed = esp.sign(&message("alice@sender.test", policy));
        let reply = send(
            &gw,
            OTHER_IP,
            "esp-out.esp.test",
            "bounce@esp.test",
            &signed,
        )
        .await;
        assert_eq!(reply.code, code, "p={policy}: {reply}");
        if code == 250 {
            let delivered = &gw.delivered()[0];
            let ar = results_header(delivered);
            assert!(ar.contains("dkim=pass header.d=esp.test"), "{ar}");
            assert!(
                ar.contains(&format!("dmarc=fail (p={policy}) header.from=sender.test")),
                "{ar}"
            );
            assert_eq!(
                delivered.contains("\nX-Spam-Flag: YES\n"),
                policy == "quarantine",
                "quarantine header for p={policy}:\n{delivered}"
            );
        }
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pct_zero_applies_the_next_weaker_policy() {
    let dns = TestDns::start().await;
    sender_zone(&dns, "v=DMARC1; p=reject; pct=0");
    let gw = gateway(&dns, "").await;
    let reply = send(
        &gw,
        OTHER_IP,
        "x.other.test",
        "alice@sender.test",
        &message("alice@sender.test", "pct"),
    )
    .await;
    assert_eq!(
        reply.code, 250,
        "pct=0 means no message is sampled for reject: {reply}"
    );
    let delivered = &gw.delivered()[0];
    assert!(
        delivered.contains("X-Spam-Flag: YES"),
        "quarantined instead:\n{delivered}"
    );
    let ar = results_header(delivered);
    assert!(ar.contains("dmarc=fail (p=reject, pct=0, sampled out) header.from=sender.test policy.dmarc=quarantine"), "{ar}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn short_rsa_keys_are_not_accepted() {
    let dns = TestDns::start().await;
    sender_zone(&dns, "v=DMARC1; p=reject");
    if std::process::Command::new("dkimsign")
        .arg("--help")
        .output()
        .is_err()
    {
        support::skip("python3-dkim's dkimsign is not installed (.ci/run installs it)");
        return;
    }
    // ring refuses to sign with a 512-bit key, so another signer makes the signature.
    let weak = DkimKey::rsa("sender.test", "weak", 512);
    weak.publish(&dns);
    let gw = gateway(&dns, "").await;
    let signed = weak
        .sign_with_dkimpy(&message("alice@sender.test", "weak"))
        .unwrap();
    let reply = send(&gw, OTHER_IP, "x.other.test", "alice@sender.test", &signed).await;
    assert_eq!(
        reply.code, 550,
        "a 512-bit key must not make DMARC pass: {reply}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dns_failures_defer_the_message() {
    for trouble in ["timeout", "servfail"] {
        let dns = TestDns::start().await;
        sender_zone(&dns, "v=DMARC1; p=reject");
        dns.remove("_dmarc.sender.test");
        match trouble {
            "timeout" => dns.timeout("_dmarc.sender.test"),
            _ => dns.servfail("_dmarc.sender.test"),
        }
        let gw = gateway(&dns, "").await;
        let reply = send(
            &gw,
            OTHER_IP,
            "x.other.test",
            "alice@sender.test",
            &message("alice@sender.test", trouble),
        )
        .await;
        assert_eq!(
            (reply.code, reply.status()),
            (451, "4.7.5"),
            "{trouble}: {reply}"
        );
        assert!(gw.delivered().is_empty());
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dns_temperror_can_be_accepted_by_configuration() {
    let dns = TestDns::start().await;
    sender_zone(&dns, "v=DMARC1; p=reject");
    dns.remove("_dmarc.sender.test");
    dns.servfail("_dmarc.sender.test");
    let gw = gateway(&dns, "dmarc:\n  on_temperror: accept\n").await;
    let reply = send(
        &gw,
        OTHER_IP,
        "x.other.test",
        "alice@sender.test",
        &message("alice@sender.test", "accept"),
    )
    .await;
    assert_eq!(reply.code, 250, "{reply}");
    assert!(results_header(&gw.delivered()[0]).contains("dmarc=temperror"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_results_with_our_authserv_id_are_removed() {
    let dns = TestDns::start().await;
    let (rsa, _) = sender_zone(&dns, "v=DMARC1; p=none");
    let gw = gateway(&dns, "").await;
    let forged = format!(
        "Authentication-Results: mx.example.test; dmarc=pass header.from=bank.test\nAuthentication-Results: other.test; spf=pass\n{}",
        message("alice@sender.test", "forged")
    );
    let reply = send(
        &gw,
        OTHER_IP,
        "x.other.test",
        "alice@sender.test",
        &rsa.sign(&forged),
    )
    .await;
    assert_eq!(reply.code, 250, "{reply}");
    let delivered = &gw.delivered()[0];
    assert_eq!(
        delivered
            .matches("Authentication-Results: mx.example.test;")
            .count(),
        1,
        "{delivered}"
    );
    assert!(
        !delivered.contains("bank.test"),
        "the forged verdict survived:\n{delivered}"
    );
    assert!(
        delivered.contains("Authentication-Results: other.test; spf=pass"),
        "others' results are kept"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn outside_values_cannot_inject_headers() {
    let dns = TestDns::start().await;
    sender_zone(&dns, "v=DMARC1; p=none");
    let gw = gateway(&dns, "").await;
    let (mut client, _) = SmtpClient::connect_from(gw.smtp, OTHER_IP).await;
    assert_eq!(client.cmd("EHLO evil;dmarc=pass(x)").await.code, 250);
    let reply = client
        .send_mail(
            "\"a;dmarc=pass\"@sender.test",
            &["bob@example.test"],
            &message("alice@sender.test", "inject"),
        )
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    let ar = results_header(&gw.delivered()[0]);
    assert!(ar.contains("smtp.helo=\"evil;dmarc=pass(x)\""), "{ar}");
    assert!(
        ar.contains("smtp.mailfrom=\"a;dmarc=pass@sender.test\""),
        "{ar}"
    );
    assert_eq!(
        ar.matches("; dmarc=").count(),
        1,
        "one DMARC result, ours: {ar}"
    );
    assert_eq!(
        ar.matches('"').count(),
        4,
        "the outside values are quoted: {ar}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn several_from_fields_are_rejected() {
    let dns = TestDns::start().await;
    sender_zone(&dns, "v=DMARC1; p=none");
    let gw = gateway(&dns, "").await;
    let data = format!(
        "From: ceo@bank.test\n{}",
        message("alice@sender.test", "two-froms")
    );
    let reply = send(
        &gw,
        LEGIT_IP,
        "mail.sender.test",
        "alice@sender.test",
        &data,
    )
    .await;
    assert_eq!((reply.code, reply.status()), (550, "5.7.1"), "{reply}");
    assert!(
        reply.text().contains("several From header fields"),
        "{reply}"
    );
    let data =
        message("alice@sender.test", "no-from").replace("From: Alice <alice@sender.test>\n", "");
    let reply = send(
        &gw,
        LEGIT_IP,
        "mail.sender.test",
        "alice@sender.test",
        &data,
    )
    .await;
    assert_eq!(reply.code, 550, "no From: {reply}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn several_addresses_in_one_from_use_the_strictest_policy() {
    let dns = TestDns::start().await;
    sender_zone(&dns, "v=DMARC1; p=none");
    dns.txt("_dmarc.bank.test", "v=DMARC1; p=reject");
    let gw = gateway(&dns, "").await;
    let data = message("alice@sender.test", "multi").replace(
        "From: Alice <alice@sender.test>",
        "From: Alice <alice@sender.test>, CEO <ceo@bank.test>",
    );
    let reply = send(
        &gw,
        LEGIT_IP,
        "mail.sender.test",
        "alice@sender.test",
        &data,
    )
    .await;
    assert_eq!(reply.code, 550, "bank.test fails with p=reject: {reply}");
    assert!(reply.text().contains("bank.test"), "{reply}");
    gw.stop().await;
}

/// The author domain written another way (a trailing dot, obsolete whitespace, upper
/// case) is still bank.test, and its p=reject applies; before, mail-auth was handed the
/// address as written and looked up `_dmarc.bank.test.`, or, with two spellings in one
/// From, exempted the message. A From domain that is no domain at all is refused.
#[tokio::test(flavor = "multi_thread")]
async fn author_domains_written_another_way_still_get_their_policy() {
    let dns = TestDns::start().await;
    sender_zone(&dns, "v=DMARC1; p=none");
    dns.txt("_dmarc.bank.test", "v=DMARC1; p=reject");
    let gw = gateway(&dns, "").await;
    for (from, want) in [
        ("ceo@bank.test.", "DMARC"),
        ("CEO <ceo@BANK.test.>", "DMARC"),
        ("CEO <ceo@bank.test>, <ceo@bank.test.>", "DMARC"),
        ("ceo@bank . test", "DMARC"),
        ("<alice@sender.test>, <ceo@bank.test.>", "bank.test"),
        ("<ceo@bank..test>", "usable domain"),
        ("<alice@sender.test>, <ceo@bank..test>", "usable domain"),
    ] {
        let data = message("alice@sender.test", "spelled")
            .replace("From: Alice <alice@sender.test>", &format!("From: {from}"));
        let reply = send(
            &gw,
            LEGIT_IP,
            "mail.sender.test",
            "alice@sender.test",
            &data,
        )
        .await;
        assert_eq!(
            (reply.code, reply.status()),
            (550, "5.7.1"),
            "From: {from}: {reply}"
        );
        assert!(reply.text().contains(want), "From: {from}: {reply}");
    }
    assert!(gw.delivered().is_empty());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn results_without_comments_for_exchange_online() {
    let dns = TestDns::start().await;
    let (rsa, _) = sender_zone(&dns, "v=DMARC1; p=reject");
    let gw = gateway(&dns, "auth:\n  comments: false\n").await;
    let signed = rsa.sign(&message("alice@sender.test", "nocomment"));
    let reply = send(
        &gw,
        LEGIT_IP,
        "mail.sender.test",
        "alice@sender.test",
        &signed,
    )
    .await;
    assert_eq!(reply.code, 250);
    let ar = results_header(&gw.delivered()[0]);
    assert!(!ar.contains('('), "{ar}");
    assert!(
        ar.contains("dmarc=pass header.from=sender.test policy.dmarc=reject"),
        "{ar}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_networks_skip_the_checks() {
    let dns = TestDns::start().await;
    sender_zone(&dns, "v=DMARC1; p=reject");
    let gw = Gateway::start(TestConfig {
        trusted: vec!["127.0.0.66/32".into()],
        extra: dns.config(),
        ..Default::default()
    })
    .await;
    let before = dns.queries();
    let reply = send(
        &gw,
        OTHER_IP,
        "x.other.test",
        "alice@sender.test",
        &message("alice@sender.test", "trusted"),
    )
    .await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(dns.queries(), before, "no DNS look-ups for trusted clients");
    assert!(!gw.delivered()[0].contains("Authentication-Results: mx.example.test"));
    gw.stop().await;
}

/// RFC 7489 3.1 alignment (relaxed by default, strict with adkim=s / aspf=s) and the
/// subdomain policy `sp`, with the record found at the organisational domain.
#[tokio::test(flavor = "multi_thread")]
async fn alignment_modes_and_the_subdomain_policy() {
    struct Case {
        record: &'static str,
        source: &'static str,
        mail_from: &'static str,
        from: &'static str,
        /// Sign with sender.test's key (d=sender.test).
        signed: bool,
        code: u16,
        results: &'static str,
    }
    let cases = [
        // d=sender.test for From news.sender.test: relaxed alignment passes...
        Case {
            record: "v=DMARC1; p=reject",
            source: OTHER_IP,
            mail_from: "bounce@elsewhere.test",
            from: "alice@news.sender.test",
            signed: true,
            code: 250,
            results: "dmarc=pass (p=reject) header.from=news.sender.test",
        },
        // ...strict does not.
        Case {
            record: "v=DMARC1; p=reject; adkim=s",
            source: OTHER_IP,
            mail_from: "bounce@elsewhere.test",
            from: "alice@news.sender.test",
            signed: true,
            code: 550,
            results: "",
        },
        // SPF for mail.sender.test passes; From sender.test: aligned when relaxed...
        Case {
            record: "v=DMARC1; p=reject",
            source: LEGIT_IP,
            mail_from: "bounce@mail.sender.test",
            from: "alice@sender.test",
            signed: false,
            code: 250,
            results: "dmarc=pass (p=reject) header.from=sender.test",
        },
        // ...not when strict.
        Case {
            record: "v=DMARC1; p=reject; aspf=s",
            source: LEGIT_IP,
            mail_from: "bounce@mail.sender.test",
            from: "alice@sender.test",
            signed: false,
            code: 550,
            results: "",
        },
        // sp=reject applies to a subdomain's mail, p=none to the domain's own.
        Case {
            record: "v=DMARC1; p=none; sp=reject",
            source: OTHER_IP,
            mail_from: "bounce@elsewhere.test",
            from: "alice@news.sender.test",
            signed: false,
            code: 550,
            results: "",
        },
        Case {
            record: "v=DMARC1; p=none; sp=reject",
            source: OTHER_IP,
            mail_from: "bounce@elsewhere.test",
            from: "alice@sender.test",
            signed: false,
            code: 250,
            results: "dmarc=fail (p=none) header.from=sender.test",
        },
    ];
    for case in cases {
        let dns = TestDns::start().await;
        let (rsa, _) = sender_zone(&dns, case.record);
        dns.a("news.sender.test", "198.51.100.1");
        let gw = gateway(&dns, "").await;
        let mut data = message(case.from, "alignment");
        if case.signed {
            data = rsa.sign(&data);
        }
        let reply = send(&gw, case.source, "client.test", case.mail_from, &data).await;
        let what = format!("{} From {}: {reply}", case.record, case.from);
        assert_eq!(reply.code, case.code, "{what}");
        if case.code == 550 {
            assert_eq!(reply.status(), "5.7.1", "{what}");
            assert!(reply.text().contains("DMARC"), "{what}");
        } else {
            let ar = results_header(&gw.delivered()[0]);
            assert!(ar.contains(case.results), "{what}\n{ar}");
        }
        gw.stop().await;
    }
}
