//! A real SMTP client library (mail-send) talks to the gateway over STARTTLS, verifying
//! the gateway's certificate.

use mxgate_test_kit as support;

use mail_send::SmtpClientBuilder;
use mail_send::smtp::message::Message;
use support::gateway::{Gateway, TestConfig};

#[tokio::test(flavor = "multi_thread")]
async fn mail_send_delivers_over_starttls() {
    let gw = Gateway::start(TestConfig {
        trusted: vec!["127.0.0.0/8".into()],
        ..Default::default()
    })
    .await;
    let connector = tokio_rustls::TlsConnector::from(support::client::client_config(&gw.cert()));
    let mut client =
        SmtpClientBuilder::new_with_tls_connector("localhost", gw.smtp.port(), connector)
            .implicit_tls(false)
            .helo_host("client.example.net")
            .connect()
            .await
            .expect("STARTTLS session with a verified certificate");
    for n in 0..3 {
        let body = format!(
            "From: alice@sender.test\r\nTo: bob@example.test\r\nSubject: mail-send {n}\r\n\r\nmessage {n}\r\n"
        );
        client
            .send(Message::new(
                "alice@sender.test",
                ["bob@example.test"],
                body.into_bytes(),
            ))
            .await
            .expect("message accepted");
    }
    client.quit().await.unwrap();
    let delivered = gw.delivered();
    assert_eq!(delivered.len(), 3);
    for (n, message) in delivered.iter().enumerate() {
        assert!(
            message.contains(&format!("Subject: mail-send {n}")),
            "{message}"
        );
        assert!(message.contains("(using TLSv1.3"), "{message}");
    }
    gw.stop().await;
}
