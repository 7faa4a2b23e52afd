//! STARTTLS towards the backend: off, opportunistic, required; certificate verification
//! and the client certificate Exchange Online identifies gateways by.

use mxgate_test_kit as support;

use support::backend::{Behaviour, FakeBackend, tls_config};
use support::gateway::{Gateway, TestConfig};

fn config(backend: &FakeBackend, relay: &str) -> TestConfig {
    TestConfig {
        trusted: vec!["127.0.0.0/8".into()],
        backends: vec![backend.url()],
        extra: format!("relay:\n{relay}"),
        ..Default::default()
    }
}

async fn send(gw: &Gateway) -> support::client::Reply {
    let (mut client, _) = gw.ehlo().await;
    client
        .send_mail(
            "alice@sender.test",
            &["bob@example.test"],
            "Subject: tls\n\nx\n",
        )
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn opportunistic_uses_tls_when_offered_and_plaintext_otherwise() {
    let (server, _) = tls_config(None);
    let tls_backend = FakeBackend::start(Behaviour {
        tls: Some(server),
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(config(&tls_backend, "  tls: opportunistic\n")).await;
    assert_eq!(send(&gw).await.code, 250);
    // A pooled connection the gateway opened at the end (for the next probe) may still
    // be in its handshake: wait for it, a little.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let (tls, connections) = {
            let log = tls_backend.log.lock().unwrap();
            (log.tls_sessions.len(), log.connections)
        };
        if tls > 0 && tls == connections {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "every connection used STARTTLS: {tls} TLS sessions, {connections} connections"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(tls_backend.messages().len(), 1);
    gw.stop().await;

    let plain_backend = FakeBackend::start(Behaviour::default()).await;
    let gw = Gateway::start(config(&plain_backend, "  tls: opportunistic\n")).await;
    assert_eq!(
        send(&gw).await.code,
        250,
        "no STARTTLS offered: plaintext is fine"
    );
    gw.stop().await;
}

/// Opportunistic is Postfix's `may`: a backend that offers STARTTLS and then refuses
/// it still gets the mail, in plaintext; `required` defers instead.
#[tokio::test(flavor = "multi_thread")]
async fn opportunistic_falls_back_to_plaintext_when_starttls_fails() {
    let (server, _) = tls_config(None);
    let backend = FakeBackend::start(Behaviour {
        tls: Some(server),
        starttls_refusal: Some("454 4.7.0 TLS not available due to local problem".into()),
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(config(&backend, "  tls: opportunistic\n")).await;
    assert_eq!(send(&gw).await.code, 250);
    assert_eq!(backend.messages().len(), 1);
    assert!(backend.log.lock().unwrap().tls_sessions.is_empty());
    gw.stop().await;

    let gw = Gateway::start(config(&backend, "  tls: required\n")).await;
    let (mut client, _) = gw.ehlo().await;
    assert_eq!(client.cmd("MAIL FROM:<alice@sender.test>").await.code, 250);
    let reply = client.cmd("RCPT TO:<bob@example.test>").await;
    assert_eq!(reply.code, 451, "required never falls back: {reply}");
    assert_eq!(backend.messages().len(), 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn off_never_starts_tls() {
    let (server, _) = tls_config(None);
    let backend = FakeBackend::start(Behaviour {
        tls: Some(server),
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(config(&backend, "  tls: off\n")).await;
    assert_eq!(send(&gw).await.code, 250);
    assert!(backend.log.lock().unwrap().tls_sessions.is_empty());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn required_refuses_a_backend_without_tls() {
    let backend = FakeBackend::start(Behaviour::default()).await;
    let gw = Gateway::start(config(&backend, "  tls: required\n")).await;
    let (mut client, _) = gw.ehlo().await;
    assert_eq!(client.cmd("MAIL FROM:<alice@sender.test>").await.code, 250);
    let reply = client.cmd("RCPT TO:<bob@example.test>").await;
    assert_eq!((reply.code, reply.status()), (451, "4.4.1"), "{reply}");
    assert!(backend.messages().is_empty());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn required_with_verification_and_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    // mxgate's relay identity, as for an Exchange Online partner connector.
    let identity = rcgen::generate_simple_self_signed(vec!["mx.example.test".into()]).unwrap();
    std::fs::write(dir.path().join("relay-cert.pem"), identity.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("relay-key.pem"),
        identity.signing_key.serialize_pem(),
    )
    .unwrap();
    let (server, server_cert) = tls_config(Some(&identity.cert.pem()));
    std::fs::write(dir.path().join("backend-ca.pem"), &server_cert).unwrap();
    let backend = FakeBackend::start(Behaviour {
        tls: Some(server),
        ..Default::default()
    })
    .await;
    let relay = format!(
        "  tls: required\n  verify_certificate: true\n  ca_certificates: {0}/backend-ca.pem\n  server_name: backend.test\n  client_certificate: {0}/relay-cert.pem\n  client_key: {0}/relay-key.pem\n",
        dir.path().display()
    );
    let gw = Gateway::start(config(&backend, &relay)).await;
    assert_eq!(send(&gw).await.code, 250);
    let sessions = backend.log.lock().unwrap().tls_sessions.clone();
    assert_eq!(
        sessions.last().unwrap().as_deref(),
        Some(identity.cert.der().as_ref()),
        "the backend saw our client certificate"
    );
    gw.stop().await;

    // Verification against the wrong CA fails: no delivery, the sender retries.
    let other = rcgen::generate_simple_self_signed(vec!["backend.test".into()]).unwrap();
    std::fs::write(dir.path().join("backend-ca.pem"), other.cert.pem()).unwrap();
    let gw = Gateway::start(config(&backend, &relay)).await;
    let (mut client, _) = gw.ehlo().await;
    assert_eq!(client.cmd("MAIL FROM:<alice@sender.test>").await.code, 250);
    let reply = client.cmd("RCPT TO:<bob@example.test>").await;
    assert_eq!((reply.code, reply.status()), (451, "4.4.1"), "{reply}");
    gw.stop().await;
}
