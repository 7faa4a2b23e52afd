//! RFC 8301 over SMTP: an `rsa-sha1` DKIM-Signature never passes, so it cannot carry
//! DMARC (mail-auth verified it and passed it). Signed by python3-dkim's `dkimsign`,
//! an independent signer, with a 2048-bit key; the same message signed `rsa-sha256`
//! by the same key is the control.

use mxgate_test_kit as support;

use support::client::SmtpClient;
use support::dkim::DkimKey;
use support::dns::TestDns;
use support::gateway::{Gateway, TestConfig};

/// `dkimsign --signalg ALG`; `None` when python3-dkim is not installed.
fn dkimsign(key: &DkimKey, algorithm: &str, message: &str) -> Option<String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("key.pem");
    std::fs::write(&key_path, key.private_pem()).unwrap();
    let mut child = Command::new("dkimsign")
        .args(["--signalg", algorithm, "s2026", "sender.test"])
        .arg(&key_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(support::crlf(message).as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "dkimsign failed");
    Some(support::crlf(&String::from_utf8(output.stdout).unwrap()))
}

#[tokio::test(flavor = "multi_thread")]
async fn rsa_sha1_signatures_do_not_pass_dmarc() {
    let dns = TestDns::start().await;
    // SPF fails for everyone: only an aligned DKIM pass can satisfy DMARC p=reject.
    dns.txt("sender.test", "v=spf1 -all");
    dns.txt("_dmarc.sender.test", "v=DMARC1; p=reject");
    let key = DkimKey::rsa("sender.test", "s2026", 2048);
    key.publish(&dns);
    let message = "From: alice@sender.test\nTo: bob@example.test\nSubject: sha1\nMessage-ID: <sha1@sender.test>\n\nhello\n";
    let Some(sha1) = dkimsign(&key, "rsa-sha1", message) else {
        support::skip("dkimsign (python3-dkim) is not installed");
        return;
    };
    let sha256 = dkimsign(&key, "rsa-sha256", message).unwrap();
    assert!(sha1.contains("a=rsa-sha1"), "{sha1}");

    let gw = Gateway::start(TestConfig {
        extra: dns.config(),
        ..Default::default()
    })
    .await;
    let send = |data: String| {
        let addr = gw.smtp;
        async move {
            let (mut client, _) = SmtpClient::connect(addr).await;
            client.cmd("EHLO client.test").await;
            client
                .send_mail("alice@sender.test", &["bob@example.test"], &data)
                .await
        }
    };
    let reply = send(sha256).await;
    assert_eq!(reply.code, 250, "the rsa-sha256 control must pass: {reply}");
    let reply = send(sha1).await;
    assert_eq!(reply.code, 550, "{reply}");
    assert!(reply.to_string().contains("5.7.1"), "{reply}");
    gw.stop().await;
}

/// An rsa-sha1 signature whose key cannot be looked up is no undecided evidence for an
/// `accept` rule: with the key in hand it would be refused anyway, so the message gets
/// DMARC's `550`, not a `451` that waits for DNS to come back.
#[tokio::test(flavor = "multi_thread")]
async fn an_rsa_sha1_signature_is_refused_even_when_its_key_fails() {
    let dns = TestDns::start().await;
    dns.txt("sender.test", "v=spf1 -all");
    dns.txt("_dmarc.sender.test", "v=DMARC1; p=reject");
    let key = DkimKey::rsa("sender.test", "s2026", 2048);
    let message = "From: alice@sender.test\nTo: bob@example.test\nSubject: sha1\nMessage-ID: <sha1-dns@sender.test>\n\nhello\n";
    let Some(sha1) = dkimsign(&key, "rsa-sha1", message) else {
        support::skip("dkimsign (python3-dkim) is not installed");
        return;
    };
    let sha256 = dkimsign(&key, "rsa-sha256", message).unwrap();
    dns.servfail("s2026._domainkey.sender.test");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/allow.yaml"),
        "rules:\n  - name: sender-signed\n    match: { header_from: sender.test, dkim_domain: sender.test }\n    action: accept\n",
    )
    .unwrap();
    let config = TestConfig {
        extra: format!("{}policy:\n  files: [\"policies/*.yaml\"]\n", dns.config()),
        ..Default::default()
    };
    let yaml = config.yaml(dir.path());
    let gw = Gateway::start_yaml(dir, &yaml).await;
    let send = |data: String| {
        let addr = gw.smtp;
        async move {
            let (mut client, _) = SmtpClient::connect(addr).await;
            client.cmd("EHLO client.test").await;
            client
                .send_mail("alice@sender.test", &["bob@example.test"], &data)
                .await
        }
    };
    // The control: an rsa-sha256 signature whose key fails could be the rule's evidence.
    let reply = send(sha256).await;
    assert_eq!((reply.code, reply.status()), (451, "4.7.5"), "{reply}");
    let reply = send(sha1).await;
    assert_eq!((reply.code, reply.status()), (550, "5.7.1"), "{reply}");
    gw.stop().await;
}
