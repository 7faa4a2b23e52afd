//! ARC sealing: seals that mail-auth and python3-dkim's arcverify accept, correct i= and
//! cv=, and the trusted-sealer override downstream.

use mxgate_test_kit as support;

use mxgate::keygen::{KeyAlgorithm, generate};
use support::backend::{Behaviour, FakeBackend};
use support::dkim::DkimKey;
use support::dns::TestDns;
use support::gateway::{Gateway, TestConfig};
use support::mail::{self, sealing_key, send_from};

const LEGIT_IP: &str = "192.0.2.5";

/// sender.test: SPF allows only LEGIT_IP; p=reject; mail is DKIM-signed by an email
/// service (esp.test), valid but not aligned: the netvisor.fi-through-Amazon-SES case.
fn zone(dns: &TestDns) -> DkimKey {
    dns.txt("sender.test", "v=spf1 ip4:192.0.2.5 -all");
    dns.txt("_dmarc.sender.test", "v=DMARC1; p=reject");
    let esp = DkimKey::rsa("esp.test", "s1", 2048);
    esp.publish(dns);
    esp
}

fn arc_yaml(
    domain: &str,
    selector: &str,
    key: &std::path::Path,
    trusted: &[&str],
    extra: &str,
) -> String {
    format!(
        "arc:\n  domain: {domain}\n  selector: {selector}\n  private_key: {}\n  trusted_sealers: [{}]\n{extra}",
        key.display(),
        trusted
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The edge: a gateway sealing as edge.test (selector arc2026, its key written to `dir`
/// and published) in front of a fake mailbox server.
async fn sealing_edge(
    dns: &TestDns,
    dir: &std::path::Path,
    algorithm: KeyAlgorithm,
) -> (Gateway, FakeBackend) {
    let key = sealing_key(dns, dir, "edge.test", "arc2026", algorithm, true);
    let backend = FakeBackend::start(Behaviour::default()).await;
    let gw = Gateway::start(TestConfig {
        backends: vec![backend.url()],
        extra: format!(
            "{}relay:\n  tls: off\n{}",
            dns.config(),
            arc_yaml("edge.test", "arc2026", &key, &[], "")
        ),
        ..Default::default()
    })
    .await;
    (gw, backend)
}

fn message(subject: &str) -> String {
    mail::message("Netvisor <noreply@sender.test>", subject)
        .body("Invoice 4711 is attached.\n")
        .text()
}

/// Validates the ARC chain of `message` with mxgate's (mail-auth's) validator.
async fn arc_result(dns: &TestDns, message: &[u8]) -> (String, u32, Option<String>) {
    let config = mxgate::config::DnsConfig {
        nameservers: Some(vec![dns.addr]),
        timeout: std::time::Duration::from_millis(500),
        attempts: std::num::NonZeroUsize::MIN,
        cache_entries: std::num::NonZeroU64::new(1000).expect("not 0"),
        ..Default::default()
    };
    let (auth, _) = mxgate::auth::Authenticator::new(&config, "verifier.test").unwrap();
    let parsed = mail_auth::AuthenticatedMessage::parse(message).unwrap();
    let spf = mxgate::auth::results::SpfCheck {
        result: mxgate::auth::results::AuthResult::None,
        domain: "x.test".into(),
        identity: "a@x.test".into(),
        explanation: None,
        reason: None,
        reason_kind: None,
    };
    let limits = mxgate::rewrite::section::SectionLimits {
        max_size: 256 * 1024,
        max_fields: 1000,
    };
    let section = mxgate::rewrite::section::read_section(message, limits).unwrap();
    let from = mxgate::auth::reading::from_header(&section, message);
    let budget = mxgate::auth::Budget::default();
    let verification = auth.verify_message(&parsed, from, &spf, budget).await;
    (
        verification.arc.result.as_str().to_string(),
        verification.arc.instances,
        verification.arc.sealer.clone(),
    )
}

fn header_value<'a>(message: &'a str, name: &str) -> Vec<&'a str> {
    message
        .split("\r\n")
        .filter_map(|l| l.strip_prefix(&format!("{name}: ")))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn first_seal_verifies_with_mail_auth_and_arcverify() {
    let dns = TestDns::start().await;
    let esp = zone(&dns);
    let dir = tempfile::tempdir().unwrap();
    let (gw, backend) = sealing_edge(&dns, dir.path(), KeyAlgorithm::Rsa).await;
    let reply = send_from(
        gw.smtp,
        LEGIT_IP,
        "bounce@sender.test",
        &esp.sign(&message("seal-1")),
    )
    .await;
    assert_eq!(reply.code, 250, "{reply}");
    let relayed = backend.messages()[0].content();
    let text = String::from_utf8_lossy(&relayed).into_owned();
    assert!(
        text.starts_with("ARC-Seal: i=1; a=rsa-sha256; s=arc2026; d=edge.test; cv=none;"),
        "{text}"
    );
    assert!(text.contains("ARC-Message-Signature: i=1;"), "{text}");
    assert!(
        text.contains("ARC-Authentication-Results: i=1; mx.example.test;"),
        "{text}"
    );
    assert!(text.contains("dmarc=pass"), "{text}");
    assert!(text.lines().all(|l| l.len() <= 998), "line too long");

    let (result, instances, sealer) = arc_result(&dns, &relayed).await;
    assert_eq!(
        (result.as_str(), instances, sealer.as_deref()),
        ("pass", 1, Some("edge.test"))
    );
    if let Some(out) = support::pyverify::run("arcverify", dns.addr, &relayed) {
        assert!(arcverify_passed(&out), "arcverify:\n{out}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ed25519_seal_verifies() {
    let dns = TestDns::start().await;
    let esp = zone(&dns);
    let dir = tempfile::tempdir().unwrap();
    let key = sealing_key(
        &dns,
        dir.path(),
        "edge.test",
        "ed2026",
        KeyAlgorithm::Ed25519,
        true,
    );
    let backend = FakeBackend::start(Behaviour::default()).await;
    let gw = Gateway::start(TestConfig {
        backends: vec![backend.url()],
        extra: format!(
            "{}relay:\n  tls: off\n{}",
            dns.config(),
            arc_yaml("edge.test", "ed2026", &key, &[], "")
        ),
        ..Default::default()
    })
    .await;
    let reply = send_from(
        gw.smtp,
        LEGIT_IP,
        "bounce@sender.test",
        &esp.sign(&message("seal-ed")),
    )
    .await;
    assert_eq!(reply.code, 250, "{reply}");
    let relayed = backend.messages()[0].content();
    assert!(String::from_utf8_lossy(&relayed).starts_with("ARC-Seal: i=1; a=ed25519-sha256;"));
    let (result, _, _) = arc_result(&dns, &relayed).await;
    assert_eq!(result, "pass");
    gw.stop().await;
}

/// Runs the message through an upstream sealer (python3-dkim's arcsign), then through
/// the gateway, which must continue the chain with i=2 and the right cv=.
#[tokio::test(flavor = "multi_thread")]
async fn existing_chains_are_continued_with_the_right_cv() {
    let dns = TestDns::start().await;
    let esp = zone(&dns);
    let dir = tempfile::tempdir().unwrap();
    let upstream_key = sealing_key(
        &dns,
        dir.path(),
        "upstream.test",
        "up",
        KeyAlgorithm::Rsa,
        true,
    );
    let Some(upstream) = upstream_seal(&dns, &upstream_key, &esp.sign(&message("chain"))) else {
        return;
    };
    let (gw, backend) = sealing_edge(&dns, dir.path(), KeyAlgorithm::Rsa).await;

    // A valid chain: i=2, cv=pass.
    let reply = send_from(gw.smtp, LEGIT_IP, "bounce@sender.test", &upstream).await;
    assert_eq!(reply.code, 250, "{reply}");
    let relayed = backend.messages()[0].content();
    let text = String::from_utf8_lossy(&relayed).into_owned();
    assert!(
        text.starts_with("ARC-Seal: i=2; a=rsa-sha256; s=arc2026; d=edge.test; cv=pass;"),
        "{text}"
    );
    let (result, instances, _) = arc_result(&dns, &relayed).await;
    assert_eq!((result.as_str(), instances), ("pass", 2));
    if let Some(out) = support::pyverify::run("arcverify", dns.addr, &relayed) {
        assert!(arcverify_passed(&out), "arcverify:\n{out}");
    }

    // A chain broken on the way (a signed header changed): i=2, cv=fail.
    let broken = upstream.replace("Subject: chain", "Subject: chain (edited)");
    let reply = send_from(gw.smtp, LEGIT_IP, "bounce@sender.test", &broken).await;
    assert_eq!(reply.code, 250, "{reply}");
    let relayed = backend.messages()[1].content();
    let text = String::from_utf8_lossy(&relayed).into_owned();
    assert!(
        text.starts_with("ARC-Seal: i=2; a=rsa-sha256; s=arc2026; d=edge.test; cv=fail;"),
        "{text}"
    );

    // A chain that already failed is not sealed again (RFC 8617 section 5.1).
    let reply = send_from(
        gw.smtp,
        LEGIT_IP,
        "bounce@sender.test",
        &String::from_utf8_lossy(&relayed),
    )
    .await;
    assert_eq!(reply.code, 250, "{reply}");
    let again = String::from_utf8_lossy(&backend.messages()[2].content()).into_owned();
    assert!(!again.contains("ARC-Seal: i=3"), "{again}");
    gw.stop().await;
}

/// python3-dkim's `arc_sign` as an upstream hop (e.g. Google) would seal.
fn upstream_seal(dns: &TestDns, key: &std::path::Path, message: &str) -> Option<String> {
    use std::io::Write;
    if !std::path::Path::new("/usr/bin/arcsign").exists() {
        support::skip("python3-dkim is not installed (.ci/run installs it)");
        return None;
    }
    let with_results = format!(
        "Authentication-Results: mx.upstream.test; dkim=pass header.d=esp.test; spf=pass smtp.mailfrom=bounce@sender.test; dmarc=pass header.from=sender.test\r\n{message}"
    );
    let script = format!(
        "import dns.resolver, sys, dkim\n\
r = dns.resolver.Resolver(configure=False)\n\
r.nameservers = ['{}']\n\
r.port = {}\n\
dns.resolver.default_resolver = r\n\
msg = sys.stdin.buffer.read()\n\
key = open('{}', 'rb').read()\n\
sig = dkim.arc_sign(msg, b'up', b'upstream.test', key, b'mx.upstream.test', include_headers=[b'from', b'to', b'subject', b'date', b'message-id'])\n\
sys.stdout.buffer.write(b''.join(sig) + msg)\n",
        dns.addr.ip(),
        dns.addr.port(),
        key.display()
    );
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(with_results.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "arc_sign: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sealed = String::from_utf8(out.stdout).unwrap();
    assert!(sealed.starts_with("ARC-Seal: i=1;"), "{sealed}");
    Some(sealed)
}

#[tokio::test(flavor = "multi_thread")]
async fn aar_has_no_comments_in_exchange_mode() {
    let dns = TestDns::start().await;
    let esp = zone(&dns);
    let dir = tempfile::tempdir().unwrap();
    let key = sealing_key(
        &dns,
        dir.path(),
        "edge.test",
        "arc2026",
        KeyAlgorithm::Rsa,
        true,
    );
    let backend = FakeBackend::start(Behaviour::default()).await;
    let gw = Gateway::start(TestConfig {
        backends: vec![backend.url()],
        extra: format!(
            "{}relay:\n  tls: off\nauth:\n  comments: false\n{}",
            dns.config(),
            arc_yaml("edge.test", "arc2026", &key, &[], "")
        ),
        ..Default::default()
    })
    .await;
    let reply = send_from(
        gw.smtp,
        LEGIT_IP,
        "bounce@sender.test",
        &esp.sign(&message("nocomments")),
    )
    .await;
    assert_eq!(reply.code, 250);
    let relayed = backend.messages()[0].content();
    let text = String::from_utf8_lossy(&relayed).replace("\r\n\t", " ");
    let aar = header_value(&text, "ARC-Authentication-Results")[0];
    assert!(!aar.contains('('), "{aar}");
    assert_eq!(arc_result(&dns, &relayed).await.0, "pass");
    gw.stop().await;
}

/// The relay scenario without Postfix: edge gateway A seals; the message then reaches
/// gateway B from another address (as after an internal relay), where SPF fails and
/// the DKIM signature is not aligned, so DMARC fails with p=reject.
#[tokio::test(flavor = "multi_thread")]
async fn downstream_honours_only_a_trusted_intact_seal() {
    let dns = TestDns::start().await;
    let esp = zone(&dns);
    let dir = tempfile::tempdir().unwrap();
    let key = sealing_key(
        &dns,
        dir.path(),
        "edge.test",
        "arc2026",
        KeyAlgorithm::Rsa,
        true,
    );
    let captured = FakeBackend::start(Behaviour::default()).await;
    let edge = Gateway::start(TestConfig {
        hostname: "mx-a.example.test".into(),
        backends: vec![captured.url()],
        extra: format!(
            "{}relay:\n  tls: off\n{}",
            dns.config(),
            arc_yaml("edge.test", "arc2026", &key, &[], "")
        ),
        ..Default::default()
    })
    .await;
    let reply = send_from(
        edge.smtp,
        LEGIT_IP,
        "bounce@sender.test",
        &esp.sign(&message("relay")),
    )
    .await;
    assert_eq!(reply.code, 250, "edge: {reply}");
    let sealed = captured.messages()[0].text();

    let downstream = |trusted: &'static [&'static str]| {
        let extra = format!(
            "{}relay:\n  tls: off\narc:\n  trusted_sealers: [{}]\n",
            dns.config(),
            trusted
                .iter()
                .map(|t| format!("\"{t}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Gateway::start(TestConfig {
            hostname: "mx-b.example.test".into(),
            extra,
            ..Default::default()
        })
    };

    // B trusts A: delivered, the override recorded.
    let b = downstream(&["edge.test"]).await;
    let reply = send_from(b.smtp, "127.0.0.77", "bounce@sender.test", &sealed).await;
    assert_eq!(reply.code, 250, "trusted: {reply}");
    let delivered = b.delivered()[0].replace("\n\t", " ");
    let ar = delivered
        .lines()
        .find(|l| l.starts_with("Authentication-Results: mx-b.example.test;"))
        .unwrap();
    assert!(ar.contains("arc=pass"), "{ar}");
    assert!(ar.contains("dmarc=fail (p=reject, overridden by local policy: trusted ARC sealer edge.test recorded dmarc=pass)"), "{ar}");
    assert!(
        ar.contains("policy.override=local_policy policy.arc-sealer=edge.test"),
        "{ar}"
    );
    b.stop().await;

    // B does not trust A: rejected.
    let b = downstream(&["google.com"]).await;
    let reply = send_from(b.smtp, "127.0.0.77", "bounce@sender.test", &sealed).await;
    assert_eq!(
        (reply.code, reply.status()),
        (550, "5.7.1"),
        "untrusted: {reply}"
    );
    // Tampering with a sealed header breaks the chain: rejected even when trusted.
    let b2 = downstream(&["edge.test"]).await;
    let tampered = sealed.replace("Subject: relay", "Subject: URGENT wire transfer");
    let reply = send_from(b2.smtp, "127.0.0.77", "bounce@sender.test", &tampered).await;
    assert_eq!(
        (reply.code, reply.status()),
        (550, "5.7.1"),
        "tampered: {reply}"
    );
    // Without A's seal (the message as it was before A): rejected.
    let unsealed = esp.sign(&message("relay"));
    let reply = send_from(b2.smtp, "127.0.0.77", "bounce@sender.test", &unsealed).await;
    assert_eq!(
        (reply.code, reply.status()),
        (550, "5.7.1"),
        "unsealed: {reply}"
    );
    b.stop().await;
    b2.stop().await;
    edge.stop().await;
}

/// A trusted sealer's chain that cannot be validated because its key does not answer
/// is DNS trouble, not a "no": the p=reject failure it would have spared is deferred
/// (`451 4.7.5`) and delivered once the key answers. A sealer we do not trust spares
/// nothing, so there the answer stays `550`.
#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_sealer_whose_key_does_not_answer_defers() {
    let dns = TestDns::start().await;
    let esp = zone(&dns);
    let dir = tempfile::tempdir().unwrap();
    let (edge, captured) = sealing_edge(&dns, dir.path(), KeyAlgorithm::Rsa).await;
    let reply = send_from(
        edge.smtp,
        LEGIT_IP,
        "bounce@sender.test",
        &esp.sign(&message("relay")),
    )
    .await;
    assert_eq!(reply.code, 250, "edge: {reply}");
    let sealed = captured.messages()[0].text();
    edge.stop().await;

    let seal_key = "arc2026._domainkey.edge.test";
    dns.timeout_type(seal_key, hickory_proto::rr::RecordType::TXT);
    let downstream = |trusted: &'static str| {
        Gateway::start(TestConfig {
            hostname: "mx-b.example.test".into(),
            extra: format!("{}arc:\n  trusted_sealers: [\"{trusted}\"]\n", dns.config()),
            ..Default::default()
        })
    };
    let b = downstream("edge.test").await;
    let reply = send_from(b.smtp, "127.0.0.77", "bounce@sender.test", &sealed).await;
    assert_eq!(
        (reply.code, reply.status()),
        (451, "4.7.5"),
        "trusted, key silent: {reply}"
    );
    assert!(
        dns.queries_for(seal_key) >= 1,
        "the sealer's key was not asked"
    );
    let untrusting = downstream("google.com").await;
    let reply = send_from(untrusting.smtp, "127.0.0.77", "bounce@sender.test", &sealed).await;
    assert_eq!(
        (reply.code, reply.status()),
        (550, "5.7.1"),
        "untrusted, key silent: {reply}"
    );
    untrusting.stop().await;

    // The key answers again: the retry is delivered, the override recorded.
    dns.answer_again(seal_key);
    let reply = send_from(b.smtp, "127.0.0.77", "bounce@sender.test", &sealed).await;
    assert_eq!(reply.code, 250, "trusted, key back: {reply}");
    assert!(
        b.delivered()[0].contains("policy.arc-sealer=edge.test"),
        "{}",
        b.delivered()[0]
    );
    b.stop().await;
}

/// An attacker seals with his own key but names a trusted sealer's domain nowhere it
/// counts: the newest seal's d= is his.
#[tokio::test(flavor = "multi_thread")]
async fn a_self_made_seal_does_not_help() {
    let dns = TestDns::start().await;
    zone(&dns);
    let dir = tempfile::tempdir().unwrap();
    let key = sealing_key(
        &dns,
        dir.path(),
        "attacker.test",
        "evil",
        KeyAlgorithm::Rsa,
        true,
    );
    let captured = FakeBackend::start(Behaviour::default()).await;
    // The attacker runs his own "edge" that seals and claims dmarc=pass in its results.
    let evil = Gateway::start(TestConfig {
        hostname: "mx.attacker.test".into(),
        trusted: vec!["127.0.0.0/8".into()],
        backends: vec![captured.url()],
        extra: format!(
            "{}relay:\n  tls: off\n{}",
            dns.config(),
            arc_yaml("attacker.test", "evil", &key, &[], "")
        ),
        ..Default::default()
    })
    .await;
    let forged = format!(
        "Authentication-Results: mx.attacker.test; dmarc=pass header.from=sender.test\n{}",
        message("evil")
    );
    send_from(evil.smtp, "127.0.0.88", "bounce@sender.test", &forged).await;
    let sealed = captured.messages()[0].text();
    let b = Gateway::start(TestConfig {
        extra: format!(
            "{}arc:\n  trusted_sealers: [\"edge.test\", \"google.com\"]\n",
            dns.config()
        ),
        ..Default::default()
    })
    .await;
    let reply = send_from(b.smtp, "127.0.0.77", "bounce@sender.test", &sealed).await;
    assert_eq!(reply.code, 550, "{reply}");
    b.stop().await;
    evil.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keygen_and_check() {
    let dns = TestDns::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("arc.pem");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mxgate"))
        .args([
            "keygen",
            "--algorithm",
            "rsa",
            "--domain",
            "edge.test",
            "--selector",
            "arc2026",
            "--out",
        ])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("arc2026._domainkey.edge.test. IN TXT ( \"v=DKIM1; k=rsa; p="),
        "{stdout}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_mxgate"))
        .args([
            "keygen",
            "--domain",
            "edge.test",
            "--selector",
            "x",
            "--out",
        ])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "must not overwrite a key without --force"
    );

    let config = dir.path().join("mxgate.yaml");
    let config_path = config.clone();
    std::fs::write(
        &config,
        format!(
            "server:\n  hostname: mx.example.test\n  listen: [\"127.0.0.1:0\"]\n  domains: [example.test]\nbackend: [\"maildir:./mail\"]\n{}arc:\n  domain: edge.test\n  selector: arc2026\n  private_key: arc.pem\n",
            dns.config()
        ),
    )
    .unwrap();
    let check = move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mxgate"))
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stderr) = tokio::task::spawn_blocking(check.clone()).await.unwrap();
    assert!(ok, "a missing record is a warning, not an error: {stderr}");
    assert!(
        stderr.contains("warning: no DKIM key is published at arc2026._domainkey.edge.test"),
        "{stderr}"
    );

    // Published, but another key.
    let other = generate(KeyAlgorithm::Rsa, 2048).unwrap();
    dns.txt("arc2026._domainkey.edge.test", &other.record);
    let (_, stderr) = tokio::task::spawn_blocking(check.clone()).await.unwrap();
    assert!(stderr.contains("does not match"), "{stderr}");

    // The right key.
    dns.remove("arc2026._domainkey.edge.test");
    let record = stdout
        .split("IN TXT ( ")
        .nth(1)
        .unwrap()
        .split(" )")
        .next()
        .unwrap()
        .split('"')
        .enumerate()
        .filter(|(n, _)| n % 2 == 1)
        .map(|(_, s)| s)
        .collect::<String>();
    dns.txt("arc2026._domainkey.edge.test", &record);
    let (ok, stderr) = tokio::task::spawn_blocking(check.clone()).await.unwrap();
    assert!(ok && !stderr.contains("_domainkey"), "{stderr}");

    // Rotation: the next key is listed in arc.keys before it is used, and check says
    // whether its record is out there yet.
    let next = generate(KeyAlgorithm::Ed25519, 2048).unwrap();
    std::fs::write(dir.path().join("arc2027.pem"), &next.private_pem).unwrap();
    let text = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        format!("{text}  keys:\n    - selector: arc2027\n      private_key: arc2027.pem\n"),
    )
    .unwrap();
    let (ok, stderr) = tokio::task::spawn_blocking(check.clone()).await.unwrap();
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("warning: no DKIM key is published at arc2027._domainkey.edge.test"),
        "{stderr}"
    );
    assert!(!stderr.contains("arc2026._domainkey"), "{stderr}");
    dns.txt("arc2027._domainkey.edge.test", &next.record);
    let (ok, stderr) = tokio::task::spawn_blocking(check.clone()).await.unwrap();
    assert!(ok && !stderr.contains("_domainkey"), "{stderr}");
}

/// arcverify prints `arc verification: cv=b'pass' ...` (Python bytes) or `cv=pass`.
fn arcverify_passed(output: &str) -> bool {
    output.contains("arc verification: cv=b'pass'") || output.contains("arc verification: cv=pass")
}

/// The relay scenario end to end, with a real internal relay: sender -> mxgate A (edge,
/// seals) -> Postfix (Debian's package), which re-sends from its own address 127.0.0.2
/// -> mxgate B (downstream) -> B's Maildir. At B, SPF for sender.test fails (only the
/// sender's IP is allowed) and the DKIM signature is not aligned, so DMARC fails with
/// p=reject; only A's seal can save the message.
struct RelayScenario {
    dns: TestDns,
    esp: DkimKey,
    a: Gateway,
    postfix: support::postfix::Postfix,
    b: Gateway,
    _dir: tempfile::TempDir,
}

#[derive(Clone, Copy)]
struct RelaySetup {
    /// A seals what it relays (`arc.seal`).
    a_seals: bool,
    /// B lists A's seal domain in `arc.trusted_sealers`.
    b_trusts_a: bool,
    /// Postfix rewrites the Subject header on the way (as a transport rule that tags
    /// external mail would), after A sealed it.
    postfix_tampers: bool,
}

impl RelayScenario {
    async fn start(setup: RelaySetup) -> Option<RelayScenario> {
        let dns = TestDns::start().await;
        let esp = zone(&dns);
        let dir = tempfile::tempdir().unwrap();
        let key = sealing_key(
            &dns,
            dir.path(),
            "edge.test",
            "arc2026",
            KeyAlgorithm::Rsa,
            true,
        );
        let trusted: &[&str] = if setup.b_trusts_a {
            &["edge.test"]
        } else {
            &["google.com"]
        };
        let b = Gateway::start(TestConfig {
            hostname: "mx-b.example.test".into(),
            extra: format!(
                "{}arc:\n  trusted_sealers: [{}]\n",
                dns.config(),
                trusted
                    .iter()
                    .map(|t| format!("\"{t}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            ..Default::default()
        })
        .await;
        let mut options = support::postfix::PostfixOptions::relay(
            &["example.test"],
            &b.smtp.to_string(),
            Some("127.0.0.2"),
        );
        if setup.postfix_tampers {
            let checks = dir.path().join("header_checks");
            std::fs::write(
                &checks,
                "/^Subject: / REPLACE Subject: [EXTERNAL] invoice\n",
            )
            .unwrap();
            options
                .main_cf
                .push(format!("header_checks = regexp:{}", checks.display()));
        }
        let Some(postfix) = support::postfix::start_or_skip(options) else {
            b.stop().await;
            return None;
        };
        let a = Gateway::start(TestConfig {
            hostname: "mx-a.example.test".into(),
            backends: vec![format!("smtp://127.0.0.1:{}", postfix.port())],
            extra: format!(
                "{}{}",
                dns.config(),
                arc_yaml(
                    "edge.test",
                    "arc2026",
                    &key,
                    &[],
                    &format!("  seal: {}\n", setup.a_seals)
                )
            ),
            ..Default::default()
        })
        .await;
        Some(RelayScenario {
            dns,
            esp,
            a,
            postfix,
            b,
            _dir: dir,
        })
    }

    /// The invoice, DKIM-signed by the email service, sent to A from the sender's IP.
    /// A's reply is Postfix's: A passes it through once Postfix queued the message.
    async fn send_invoice(&self) {
        let reply = send_from(
            self.a.smtp,
            LEGIT_IP,
            "bounce@sender.test",
            &self.esp.sign(&message("invoice")),
        )
        .await;
        assert_eq!(
            reply.code,
            250,
            "A: {reply}\nPostfix log:\n{}",
            self.postfix.log()
        );
        assert!(
            reply.text().contains("queued as"),
            "not Postfix's reply: {reply}"
        );
    }

    /// Waits until Postfix reports B's answer to its delivery attempt.
    async fn b_answered(&self, answer: &str) -> String {
        self.postfix
            .wait_for_log(&format!(
                "relay=127.0.0.1[127.0.0.1]:{}",
                self.b.smtp.port()
            ))
            .await;
        self.postfix.wait_for_log(answer).await
    }

    /// B refused the message at end of data with 550 5.7.1 (DMARC, p=reject); Postfix
    /// bounced it and B delivered nothing.
    async fn assert_b_rejected(&self) {
        let log = self.b_answered("status=bounced").await;
        assert!(
            log.contains("said: 550 5.7.1") && log.contains("DMARC"),
            "B did not reject with 550 5.7.1 for DMARC:\n{log}"
        );
        assert!(self.b.delivered().is_empty(), "{:#?}", self.b.delivered());
    }

    async fn stop(self) {
        self.a.stop().await;
        self.b.stop().await;
        drop(self.postfix);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn through_postfix_a_trusted_seal_overrides_dmarc_at_b() {
    let Some(scenario) = RelayScenario::start(RelaySetup {
        a_seals: true,
        b_trusts_a: true,
        postfix_tampers: false,
    })
    .await
    else {
        return;
    };
    scenario.send_invoice().await;
    scenario.b_answered("status=sent").await;
    let delivered = scenario.b.delivered();
    assert_eq!(delivered.len(), 1, "{delivered:#?}");
    let message = &delivered[0];
    let unfolded = message.replace("\n\t", " ").replace("\n ", " ");
    // Postfix really sat in between: its Received field, and B saw it connect from
    // its own address (so SPF failed there).
    let b_received = unfolded
        .lines()
        .find(|l| l.starts_with("Received:") && l.contains("by mx-b.example.test (mxgate)"))
        .unwrap_or_else(|| panic!("no Received from B:\n{message}"));
    assert!(b_received.contains("[127.0.0.2]"), "{b_received}");
    assert!(
        unfolded.contains("by relay.example.test (Postfix)"),
        "{message}"
    );
    let ar = unfolded
        .lines()
        .find(|l| l.starts_with("Authentication-Results: mx-b.example.test;"))
        .unwrap_or_else(|| panic!("no results from B:\n{message}"));
    assert!(ar.contains("spf=fail"), "{ar}");
    assert!(
        ar.contains("dkim=pass") && ar.contains("header.d=esp.test"),
        "{ar}"
    );
    assert!(ar.contains("arc=pass"), "{ar}");
    assert!(
        ar.contains("dmarc=fail (p=reject, overridden by local policy: trusted ARC sealer edge.test recorded dmarc=pass)"),
        "{ar}"
    );
    // A's seal survived Postfix for an independent verifier too.
    let crlf = support::crlf(message);
    if let Some(out) = support::pyverify::run("arcverify", scenario.dns.addr, crlf.as_bytes()) {
        assert!(arcverify_passed(&out), "arcverify:\n{out}\n{message}");
    }
    scenario.stop().await;
}

/// Runs the scenario once and checks that B refused the invoice; the scenario is
/// returned for more checks (`None`: Postfix is not available here, a skip).
async fn b_rejects_the_invoice(setup: RelaySetup) -> Option<RelayScenario> {
    let scenario = RelayScenario::start(setup).await?;
    scenario.send_invoice().await;
    scenario.assert_b_rejected().await;
    Some(scenario)
}

#[tokio::test(flavor = "multi_thread")]
async fn through_postfix_without_a_seal_b_rejects() {
    let setup = RelaySetup {
        a_seals: false,
        b_trusts_a: true,
        postfix_tampers: false,
    };
    if let Some(scenario) = b_rejects_the_invoice(setup).await {
        scenario.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn through_postfix_b_rejects_when_it_does_not_trust_a() {
    let setup = RelaySetup {
        a_seals: true,
        b_trusts_a: false,
        postfix_tampers: false,
    };
    if let Some(scenario) = b_rejects_the_invoice(setup).await {
        scenario.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn through_postfix_a_tampered_sealed_header_makes_b_reject() {
    let setup = RelaySetup {
        a_seals: true,
        b_trusts_a: true,
        postfix_tampers: true,
    };
    let Some(scenario) = b_rejects_the_invoice(setup).await else {
        return;
    };
    assert!(
        scenario
            .postfix
            .log()
            .contains("replace: header Subject: invoice"),
        "Postfix did not rewrite the Subject:\n{}",
        scenario.postfix.log()
    );
    scenario.stop().await;
}

/// RFC 8617 section 4.2.1: a chain holds at most 50 sets. A message that arrives with
/// 49 (valid) sets gets our seal as the 50th; one that arrives with 50 is relayed
/// unsealed rather than with an invalid 51st set, and is still delivered.
#[tokio::test(flavor = "multi_thread")]
async fn chains_stop_at_fifty_sets() {
    use mxgate::rewrite::arc::{Sealer, SigningKeyPair};
    let dns = TestDns::start().await;
    zone(&dns);
    let dir = tempfile::tempdir().unwrap();
    // Upstream hops seal with Ed25519 (fast); each set is valid and continues the chain.
    let upstream_key = sealing_key(
        &dns,
        dir.path(),
        "hop.test",
        "hop",
        KeyAlgorithm::Ed25519,
        true,
    );
    let upstream = Sealer::new(
        SigningKeyPair::load(&upstream_key).unwrap(),
        "hop.test",
        "hop",
    );
    let config = mxgate::config::DnsConfig {
        nameservers: Some(vec![dns.addr]),
        timeout: std::time::Duration::from_millis(500),
        attempts: std::num::NonZeroUsize::MIN,
        cache_entries: std::num::NonZeroU64::new(1000).expect("not 0"),
        ..Default::default()
    };
    let (resolver, _) = mxgate::auth::dns::resolver(&config).unwrap();
    let mut chain = support::crlf(&message("chain"));
    let mut with_49 = String::new();
    for n in 1..=50 {
        let sealed = {
            let parsed = mail_auth::AuthenticatedMessage::parse(chain.as_bytes()).unwrap();
            let incoming = resolver.verify_arc(&parsed).await;
            assert_eq!(incoming.sets().len(), n - 1);
            let set = upstream
                .seal(&parsed, &incoming, &format!("hop{n}.hop.test; arc=pass"))
                .unwrap_or_else(|e| panic!("upstream seal {n}: {e:?}"));
            String::from_utf8(set).unwrap()
        };
        chain = format!("{sealed}{chain}");
        if n == 49 {
            with_49 = chain.clone();
        }
    }

    let (gw, backend) = sealing_edge(&dns, dir.path(), KeyAlgorithm::Ed25519).await;
    for (incoming, sets) in [(&with_49, 49), (&chain, 50)] {
        let reply = send_from(gw.smtp, LEGIT_IP, "bounce@sender.test", incoming).await;
        assert_eq!(reply.code, 250, "{sets} sets: {reply}");
    }
    let relayed: Vec<String> = backend.messages().iter().map(|m| m.text()).collect();
    let seals = |text: &str| {
        text.matches("\r\nARC-Seal: ").count() + usize::from(text.starts_with("ARC-Seal: "))
    };
    assert_eq!(seals(&relayed[0]), 50, "49 + ours");
    assert!(
        relayed[0]
            .starts_with("ARC-Seal: i=50; a=ed25519-sha256; s=arc2026; d=edge.test; cv=pass;"),
        "{}",
        &relayed[0][..300]
    );
    let (result, instances, _) = arc_result(&dns, relayed[0].as_bytes()).await;
    assert_eq!((result.as_str(), instances), ("pass", 50));
    assert_eq!(seals(&relayed[1]), 50, "no 51st set");
    assert!(!relayed[1].contains("d=edge.test"), "sealed past the limit");
    gw.stop().await;
}

/// ARC header fields that do not parse (`cv=bogus`), or a set numbered 50 that a broken
/// chain starts with: our seal on top would be an invalid set (an `i=1` beside the
/// sender's `i=1`, or an `i=51`), so the message is relayed unsealed, with arc=fail.
#[tokio::test(flavor = "multi_thread")]
async fn broken_chains_are_not_sealed_over() {
    let dns = TestDns::start().await;
    let esp = zone(&dns);
    let dir = tempfile::tempdir().unwrap();
    let (gw, backend) = sealing_edge(&dns, dir.path(), KeyAlgorithm::Ed25519).await;
    let set = |i: u32, cv: &str| {
        format!(
            "ARC-Seal: i={i}; a=rsa-sha256; t=1700000000; cv={cv}; d=hop.test; s=s; b=AAAA\n\
             ARC-Message-Signature: i={i}; a=rsa-sha256; c=relaxed/relaxed; d=hop.test; s=s; t=1700000000; h=from:subject; bh=AAAA; b=AAAA\n\
             ARC-Authentication-Results: i={i}; hop.test; arc=none\n"
        )
    };
    let cases = [("bogus-cv", set(1, "bogus")), ("fifty", set(50, "pass"))];
    for (name, headers) in &cases {
        let data = format!("{headers}{}", esp.sign(&message(name)));
        let reply = send_from(gw.smtp, LEGIT_IP, "bounce@sender.test", &data).await;
        assert_eq!(reply.code, 250, "{name}: {reply}");
    }
    let relayed: Vec<String> = backend.messages().iter().map(|m| m.text()).collect();
    assert_eq!(relayed.len(), cases.len());
    for (text, (name, _)) in relayed.iter().zip(&cases) {
        assert!(
            !text.contains("d=edge.test"),
            "{name}: sealed over a broken chain:\n{text}"
        );
        assert!(
            text.contains("arc=fail"),
            "{name}: our results say fail:\n{text}"
        );
    }
    gw.stop().await;
}
