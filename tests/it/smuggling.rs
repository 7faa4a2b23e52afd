//! SMTP smuggling (CVE-2023-51764 family): only <CRLF>.<CRLF> ends DATA, and what
//! reaches the backend can only ever be read as the one message we saw.

use mxgate_test_kit as support;

use support::backend::{Behaviour, FakeBackend};
use support::gateway::{Gateway, TestConfig};

const SEQUENCES: &[&[u8]] = &[
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\n",
    b"\r.\r\n",
    b"\r\n.\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
    b"\n.\r",
    b"\r.\r",
];

fn config(backend: &FakeBackend, mode: &str) -> TestConfig {
    TestConfig {
        trusted: vec!["127.0.0.0/8".into()],
        backends: vec![backend.url()],
        server_extra: format!("  bare_line_endings: {mode}\n"),
        extra: "relay:\n  tls: off\n".into(),
        ..Default::default()
    }
}

/// A DATA body that smuggles a second transaction behind `sequence`.
fn smuggling_body(sequence: &[u8]) -> Vec<u8> {
    let mut body = b"From: alice@sender.test\r\nSubject: legit\r\n\r\nhello".to_vec();
    body.extend_from_slice(sequence);
    body.extend_from_slice(
        b"MAIL FROM:<ceo@example.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nFrom: ceo@example.test\r\nSubject: smuggled\r\n\r\npay now\r\n",
    );
    body.extend_from_slice(b"\r\n.\r\n");
    body
}

/// What any lenient backend could read as a message boundary: a bare CR or LF, or a
/// line that is a lone dot (after our stuffing, content dots come doubled).
fn assert_unambiguous(raw: &[u8]) {
    for (n, &b) in raw.iter().enumerate() {
        if b == b'\r' {
            assert_eq!(raw.get(n + 1), Some(&b'\n'), "bare CR at {n}");
        }
        if b == b'\n' {
            assert!(n > 0 && raw[n - 1] == b'\r', "bare LF at {n}");
        }
        assert_ne!(b, 0, "NUL at {n}");
    }
    for line in raw.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert_ne!(line, b".", "a lone dot line reached the backend");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn normalize_mode_relays_one_unambiguous_message() {
    for sequence in SEQUENCES {
        let backend = FakeBackend::start(Behaviour::default()).await;
        let gw = Gateway::start(config(&backend, "normalize")).await;
        let (mut client, _) = gw.ehlo().await;
        assert_eq!(client.cmd("MAIL FROM:<alice@sender.test>").await.code, 250);
        assert_eq!(client.cmd("RCPT TO:<bob@example.test>").await.code, 250);
        assert_eq!(client.cmd("DATA").await.code, 354);
        client.send(&smuggling_body(sequence)).await;
        let reply = client.read_reply().await;
        assert_eq!(reply.code, 250, "{sequence:?}: {reply}");
        // Nothing after the real end marker was left to be read as commands.
        assert!(client.pending().is_empty(), "{sequence:?}");
        assert_eq!(client.cmd("QUIT").await.code, 221);

        let messages = backend.messages();
        assert_eq!(
            messages.len(),
            1,
            "{sequence:?}: the backend saw a second message"
        );
        assert_eq!(messages[0].rcpts, vec!["bob@example.test"]);
        assert_unambiguous(&messages[0].raw);
        let text = messages[0].text();
        assert!(
            text.contains("MAIL FROM:<ceo@example.test>"),
            "the smuggled text stays content: {text}"
        );
        // One MAIL verifies bob (the probe), one relays the message; none is smuggled.
        let commands = backend.commands();
        let mail_commands: Vec<&String> =
            commands.iter().filter(|c| c.starts_with("MAIL")).collect();
        assert_eq!(
            mail_commands,
            vec!["MAIL FROM:<alice@sender.test>"; 2],
            "{sequence:?}"
        );
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reject_mode_refuses_bare_line_endings() {
    for sequence in SEQUENCES {
        let backend = FakeBackend::start(Behaviour::default()).await;
        let gw = Gateway::start(config(&backend, "reject")).await;
        let (mut client, _) = gw.ehlo().await;
        assert_eq!(client.cmd("MAIL FROM:<alice@sender.test>").await.code, 250);
        assert_eq!(client.cmd("RCPT TO:<bob@example.test>").await.code, 250);
        assert_eq!(client.cmd("DATA").await.code, 354);
        client.send(&smuggling_body(sequence)).await;
        let reply = client.read_reply().await;
        assert_eq!(
            (reply.code, reply.status()),
            (550, "5.5.2"),
            "{sequence:?}: {reply}"
        );
        assert!(backend.messages().is_empty());
        // The session continues with the next command after the real end marker.
        assert_eq!(client.cmd("NOOP").await.code, 250);
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn content_dots_are_stuffed_for_the_backend() {
    let backend = FakeBackend::start(Behaviour::default()).await;
    let gw = Gateway::start(config(&backend, "normalize")).await;
    let (mut client, _) = gw.ehlo().await;
    // On the wire (client side, stuffed): "..", "...two", "..x" mean ".", "..two", ".x".
    let reply = client
        .send_mail(
            "alice@sender.test",
            &["bob@example.test"],
            "Subject: dots\n\n..\n...two\n..x\n",
        )
        .await;
    assert_eq!(reply.code, 250);
    let message = &backend.messages()[0];
    assert!(
        message.raw.ends_with(b"\r\n..\r\n...two\r\n..x\r\n"),
        "{:?}",
        String::from_utf8_lossy(&message.raw)
    );
    assert!(message.text().ends_with("\r\n.\r\n..two\r\n.x\r\n"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bdat_with_bare_line_endings_is_normalised() {
    let backend = FakeBackend::start(Behaviour::default()).await;
    let gw = Gateway::start(config(&backend, "normalize")).await;
    let (mut client, _) = gw.ehlo().await;
    assert_eq!(client.cmd("MAIL FROM:<alice@sender.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<bob@example.test>").await.code, 250);
    let chunk = b"Subject: b\r\n\r\nx\n.\nMAIL FROM:<a@b>\r\n";
    client
        .send(format!("BDAT {} LAST\r\n", chunk.len()).as_bytes())
        .await;
    client.send(chunk).await;
    assert_eq!(client.read_reply().await.code, 250);
    let messages = backend.messages();
    assert_eq!(messages.len(), 1);
    assert_unambiguous(&messages[0].raw);
    gw.stop().await;
}
