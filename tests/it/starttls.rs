//! STARTTLS (RFC 3207) with real certificates: upgrade, injection, forgetting the
//! plaintext session, `tls.require`, certificate reload.

use mxgate_test_kit as support;

use std::time::Duration;
use support::gateway::{Gateway, TestConfig};

fn config() -> TestConfig {
    TestConfig {
        trusted: vec!["127.0.0.0/8".into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrade_verifies_and_is_recorded_in_received() {
    let gw = Gateway::start(config()).await;
    let (mut client, _) = gw.ehlo().await;
    let reply = client.cmd("STARTTLS").await;
    assert_eq!((reply.code, reply.status()), (220, "2.0.0"));
    let (mut client, tls) = client.starttls(&gw.cert(), "mx.example.test").await;
    assert_eq!(tls.version, "TLSv1_3");
    let ehlo = client.cmd("EHLO client.example.net").await;
    assert_eq!(ehlo.code, 250);
    assert!(
        !ehlo.lines.iter().any(|l| l == "STARTTLS"),
        "STARTTLS offered again: {ehlo}"
    );
    let reply = client.cmd("STARTTLS").await;
    assert_eq!(reply.code, 503, "{reply}");
    let reply = client
        .send_mail(
            "alice@sender.test",
            &["bob@example.test"],
            "Subject: tls\n\nsecret\n",
        )
        .await;
    assert_eq!(reply.code, 250);
    let message = &gw.delivered()[0];
    assert!(
        message.contains("(using TLSv1.3 with cipher TLS13_"),
        "{message}"
    );
    assert!(message.contains("with ESMTPS"), "{message}");
    gw.stop().await;
}

/// STARTTLS takes no parameters (RFC 3207 4), and the error limit is per connection:
/// a client cannot start counting again by switching to TLS.
#[tokio::test(flavor = "multi_thread")]
async fn starttls_parameters_are_refused_and_errors_count_across_it() {
    let gw = Gateway::start(TestConfig {
        server_extra: "  max_errors: 3\n".into(),
        ..config()
    })
    .await;
    let (mut client, _) = gw.ehlo().await;
    let reply = client.cmd("STARTTLS now").await;
    assert_eq!((reply.code, reply.status()), (501, "5.5.4"), "{reply}");
    assert_eq!(client.cmd("XYZZY").await.code, 500);
    let reply = client.cmd("STARTTLS  ").await;
    assert_eq!(
        reply.code, 220,
        "trailing white space is no parameter: {reply}"
    );
    let (mut client, _) = client.starttls(&gw.cert(), "mx.example.test").await;
    assert_eq!(client.cmd("EHLO client.example.net").await.code, 250);
    assert_eq!(client.cmd("XYZZY").await.code, 500);
    let reply = client.read_reply().await;
    assert_eq!(
        (reply.code, reply.status()),
        (421, "4.7.0"),
        "third error of the connection: {reply}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_pipelined_behind_starttls_is_discarded() {
    let gw = Gateway::start(config()).await;
    let (mut client, _) = gw.ehlo().await;
    // CVE-2011-0411: commands injected after STARTTLS in the same packet.
    client
        .send(b"STARTTLS\r\nMAIL FROM:<attacker@evil.test>\r\nRCPT TO:<bob@example.test>\r\n")
        .await;
    let reply = client.read_reply().await;
    assert_eq!(reply.code, 220);
    // No reply to the injected commands arrived in plaintext (starttls() checks that no
    // bytes are pending), and inside TLS they were never executed.
    let (mut client, _) = client.starttls(&gw.cert(), "mx.example.test").await;
    assert_eq!(client.cmd("EHLO client.example.net").await.code, 250);
    let reply = client.cmd("RCPT TO:<bob@example.test>").await;
    assert_eq!(
        (reply.code, reply.status()),
        (503, "5.5.1"),
        "injected MAIL was executed: {reply}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn session_forgets_ehlo_after_tls() {
    let gw = Gateway::start(config()).await;
    let (mut client, _) = gw.ehlo().await;
    assert_eq!(client.cmd("STARTTLS").await.code, 220);
    let (mut client, _) = client.starttls(&gw.cert(), "mx.example.test").await;
    let reply = client.cmd("MAIL FROM:<alice@sender.test>").await;
    assert_eq!((reply.code, reply.status()), (503, "5.5.1"), "{reply}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn starttls_needs_ehlo_and_no_transaction() {
    let gw = Gateway::start(config()).await;
    let mut client = gw.connect().await;
    assert_eq!(client.cmd("STARTTLS").await.code, 503);
    assert_eq!(client.cmd("EHLO c.test").await.code, 250);
    assert_eq!(client.cmd("MAIL FROM:<a@b.test>").await.code, 250);
    assert_eq!(client.cmd("STARTTLS").await.code, 503);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn require_tls_refuses_plaintext_mail() {
    let gw = Gateway::start(TestConfig {
        require_tls: true,
        ..config()
    })
    .await;
    let (mut client, _) = gw.ehlo().await;
    let reply = client.cmd("MAIL FROM:<alice@sender.test>").await;
    assert_eq!((reply.code, reply.status()), (530, "5.7.0"), "{reply}");
    assert_eq!(client.cmd("STARTTLS").await.code, 220);
    let (mut client, _) = client.starttls(&gw.cert(), "mx.example.test").await;
    assert_eq!(client.cmd("EHLO c.test").await.code, 250);
    assert_eq!(client.cmd("MAIL FROM:<alice@sender.test>").await.code, 250);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_starttls_without_a_certificate() {
    let gw = Gateway::start(TestConfig {
        tls: false,
        ..config()
    })
    .await;
    let (mut client, ehlo) = gw.ehlo().await;
    assert!(!ehlo.lines.iter().any(|l| l == "STARTTLS"));
    let reply = client.cmd("STARTTLS").await;
    assert_eq!((reply.code, reply.status()), (454, "4.7.0"), "{reply}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_is_reloaded_when_the_files_change() {
    let gw = Gateway::start(config()).await;
    let first = {
        let (mut client, _) = gw.ehlo().await;
        client.cmd("STARTTLS").await;
        client
            .starttls(&gw.cert(), "mx.example.test")
            .await
            .1
            .peer_certificate
    };
    // An operator renews the certificate: new key, new certificate, same names. The
    // test client trusts both, since it cannot know when the gateway switches.
    let old_pem = std::fs::read_to_string(gw.cert()).unwrap();
    let renewed =
        rcgen::generate_simple_self_signed(vec!["mx.example.test".into(), "localhost".into()])
            .unwrap();
    let both = gw.dir.path().join("both.pem");
    std::fs::write(&both, format!("{old_pem}{}", renewed.cert.pem())).unwrap();
    std::fs::write(
        gw.dir.path().join("key.pem"),
        renewed.signing_key.serialize_pem(),
    )
    .unwrap();
    std::fs::write(gw.cert(), renewed.cert.pem()).unwrap();

    let mut second = first.clone();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (mut client, _) = gw.ehlo().await;
        client.cmd("STARTTLS").await;
        second = client
            .starttls(&both, "mx.example.test")
            .await
            .1
            .peer_certificate;
        if second != first {
            break;
        }
    }
    assert_ne!(first, second, "the new certificate was not picked up");
    assert_eq!(second, renewed.cert.der().to_vec());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_certificate_keeps_the_old_one() {
    let gw = Gateway::start(config()).await;
    std::fs::write(gw.cert(), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let generation = gw.running.as_ref().unwrap().snapshots.load().generation;
    assert_eq!(
        generation, 1,
        "a broken reload must not replace the running snapshot"
    );
    let (mut client, _) = gw.ehlo().await;
    assert_eq!(
        client.cmd("STARTTLS").await.code,
        220,
        "TLS still works with the old certificate"
    );
    gw.stop().await;
}

/// TLS 1.2 works (plenty of senders still use it) and is recorded; anything older is
/// refused in the handshake (checked with openssl, since rustls cannot speak it).
#[tokio::test(flavor = "multi_thread")]
async fn tls12_is_accepted_and_older_versions_are_not() {
    let gw = Gateway::start(config()).await;
    let (mut client, _) = gw.ehlo().await;
    assert_eq!(client.cmd("STARTTLS").await.code, 220);
    let tls12 = support::client::client_config_versions(&gw.cert(), &[&rustls::version::TLS12]);
    let (mut client, tls) = client.starttls_with(tls12, "mx.example.test").await;
    assert_eq!(tls.version, "TLSv1_2");
    assert_eq!(client.cmd("EHLO client.example.net").await.code, 250);
    let reply = client
        .send_mail(
            "alice@sender.test",
            &["bob@example.test"],
            "Subject: 1.2\n\nx\n",
        )
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    let received = gw.delivered()[0].replace("\n\t", " ");
    assert!(
        received.contains("(using TLSv1.2 with cipher TLS_ECDHE_"),
        "{received}"
    );

    // openssl at security level 0 offers the old versions; with -tls1_2, the same
    // command succeeds, so a refusal below is about the version.
    for (flag, accepted) in [("-tls1_2", true), ("-tls1_1", false), ("-tls1", false)] {
        let addr = gw.smtp.to_string();
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new("openssl")
                .args(["s_client", "-starttls", "smtp", "-connect", &addr, flag])
                .args(["-cipher", "DEFAULT@SECLEVEL=0"])
                .stdin(std::process::Stdio::null())
                .output()
        })
        .await
        .unwrap();
        let Ok(output) = output else {
            support::skip("openssl is not installed");
            return;
        };
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if accepted {
            assert!(
                text.contains("New, TLSv1.2, Cipher is ECDHE-"),
                "{flag}:\n{text}"
            );
        } else {
            assert!(
                text.contains("alert handshake failure") && text.contains("New, (NONE)"),
                "{flag} not refused:\n{text}"
            );
        }
    }
    gw.stop().await;
}
