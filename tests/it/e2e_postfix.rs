//! End to end with a real Postfix (Debian's package) as the mailbox server behind
//! mxgate, and as a relay in front of it: real clients (swaks, the raw client), real
//! replies from Postfix passed through, real Maildir delivery.

use mxgate_test_kit as support;

use std::time::{Duration, Instant};
use support::client::Reply;
use support::gateway::{Gateway, TestConfig};
use support::postfix::{Postfix, PostfixOptions, start_or_skip};

/// mxgate relaying in-line to `postfix`; trusts 127.0.0.0/8 so no sender
/// authentication (and no DNS) is involved.
fn in_front_of(postfix: &Postfix) -> TestConfig {
    TestConfig {
        backends: vec![format!("smtp://127.0.0.1:{}", postfix.port())],
        trusted: vec!["127.0.0.0/8".into()],
        ..Default::default()
    }
}

/// The header section with folded lines joined, one field per entry.
fn header_fields(message: &str) -> Vec<String> {
    let head = message.split("\n\n").next().unwrap_or("");
    let mut fields: Vec<String> = Vec::new();
    for line in head.lines() {
        let line = line.trim_end_matches('\r');
        match fields.last_mut() {
            Some(last) if line.starts_with([' ', '\t']) => {
                last.push(' ');
                last.push_str(line.trim_start());
            }
            _ => fields.push(line.to_string()),
        }
    }
    fields
}

#[tokio::test(flavor = "multi_thread")]
async fn swaks_over_starttls_through_mxgate_into_postfix() {
    let Some(postfix) = start_or_skip(PostfixOptions::mailbox(&["example.test"])) else {
        return;
    };
    let gw = Gateway::start(in_front_of(&postfix)).await;
    let Some(swaks) = support::swaks::send_tls(
        gw.smtp,
        &[
            "--to",
            "bob@example.test",
            "--from",
            "alice@sender.test",
            "--header",
            "Subject: e2e",
            "--body",
            "hello from swaks",
        ],
    )
    .await
    else {
        return;
    };
    swaks.assert_delivered_over_tls(&format!("Postfix log:\n{}", postfix.log()));
    let transcript = &swaks.text;
    // swaks marks lines sent over TLS `~>` and replies `<~`. The reply right after the
    // data's final dot is Postfix's own ("Ok: queued as ..." after DATA, "Ok: <n> bytes
    // queued as ..." when mxgate relays with BDAT), passed through by mxgate, whose own
    // wording would be "OK: queued as".
    let lines: Vec<&str> = transcript.lines().collect();
    let dot = lines
        .iter()
        .position(|l| l.trim() == "~> .")
        .unwrap_or_else(|| panic!("no end of data in transcript:\n{transcript}"));
    let after_data = lines.get(dot + 1).copied().unwrap_or("");
    assert!(
        after_data.starts_with("<~  250 2.0.0 Ok: ") && after_data.contains("queued as"),
        "reply after the data: {after_data:?}\n{transcript}"
    );

    let messages = postfix.delivered().await;
    assert_eq!(messages.len(), 1, "{messages:#?}");
    let message = &messages[0];
    let fields = header_fields(message);
    let ours = fields
        .iter()
        .find(|f| f.starts_with("Received:") && f.contains("(mxgate)"))
        .unwrap_or_else(|| panic!("no Received field from mxgate:\n{message}"));
    assert!(ours.contains("by mx.example.test (mxgate)"), "{ours}");
    assert!(ours.contains("(using TLSv1.3"), "TLS not recorded: {ours}");
    assert!(ours.contains("with ESMTPS"), "{ours}");
    // Postfix's Received field sits above ours: it got the message from mxgate.
    let postfix_received = fields
        .iter()
        .position(|f| f.starts_with("Received:") && f.contains("(Postfix)"))
        .unwrap_or_else(|| panic!("no Received field from Postfix:\n{message}"));
    let ours_at = fields.iter().position(|f| f == ours).unwrap();
    assert!(postfix_received < ours_at, "{message}");
    assert!(fields.iter().any(|f| f == "Subject: e2e"), "{message}");
    assert!(
        message.split("\n\n").nth(1).unwrap_or("").trim_end() == "hello from swaks",
        "{message}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_rejection_passes_through() {
    let options = PostfixOptions::mailbox(&["example.test"]).only_recipients(&["bob@example.test"]);
    let Some(postfix) = start_or_skip(options) else {
        return;
    };
    let gw = Gateway::start(in_front_of(&postfix)).await;
    let (mut client, _) = gw.ehlo().await;
    let context = |reply: &Reply| format!("{reply}\nPostfix log:\n{}", postfix.log());

    let reply = client.cmd("MAIL FROM:<alice@sender.test>").await;
    assert_eq!(reply.code, 250, "{}", context(&reply));
    let reply = client.cmd("RCPT TO:<bob@example.test>").await;
    assert_eq!(reply.code, 250, "{}", context(&reply));
    let reply = client.cmd("RCPT TO:<nobody@example.test>").await;
    assert_eq!(
        (reply.code, reply.status()),
        (550, "5.1.1"),
        "{}",
        context(&reply)
    );
    // Postfix's own wording, not a reply mxgate made up.
    assert_eq!(
        reply.text(),
        "5.1.1 <nobody@example.test>: Recipient address rejected: User unknown in virtual mailbox table",
        "{}",
        context(&reply)
    );
    postfix
        .wait_for_log("reject: RCPT from unknown[127.0.0.1]: 550 5.1.1 <nobody@example.test>")
        .await;

    // The rejected recipient does not spoil the transaction for the accepted one.
    let reply = client.cmd("DATA").await;
    assert_eq!(reply.code, 354, "{}", context(&reply));
    client
        .send(b"Subject: partly\r\n\r\nfor bob only\r\n.\r\n")
        .await;
    let reply = client.read_reply().await;
    assert_eq!(reply.code, 250, "{}", context(&reply));
    let messages = postfix.delivered().await;
    assert_eq!(messages.len(), 1, "{messages:#?}");
    assert!(
        messages[0].contains("Delivered-To: bob@example.test\n"),
        "{}",
        messages[0]
    );
    assert!(
        messages[0].ends_with("\n\nfor bob only\n"),
        "{}",
        messages[0]
    );
    gw.stop().await;
}

/// Issue 11 case 6 against a real Postfix whose smtpd drops a client idle for a second
/// (`smtpd_timeout`; Postfix lowers it to 10 s under stress): a client that takes three
/// seconds to upload its data still gets Postfix's 250 and the message is delivered,
/// because the backend connection is taken only at end of data (before, it idled from
/// RCPT on, and Postfix's `421 4.4.2 Error: timeout exceeded` reached the client).
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_upload_outlives_postfix_smtpd_timeout() {
    let mut options = PostfixOptions::mailbox(&["example.test"]);
    options.main_cf.push("smtpd_timeout = 1s".into());
    let Some(postfix) = start_or_skip(options) else {
        return;
    };
    let gw = Gateway::start(in_front_of(&postfix)).await;
    let (mut client, _) = gw.ehlo().await;
    let context = |reply: &Reply| format!("{reply}\nPostfix log:\n{}", postfix.log());
    let reply = client.cmd("MAIL FROM:<alice@sender.test>").await;
    assert_eq!(reply.code, 250, "{}", context(&reply));
    let reply = client.cmd("RCPT TO:<bob@example.test>").await;
    assert_eq!(reply.code, 250, "{}", context(&reply));
    let reply = client.cmd("DATA").await;
    assert_eq!(reply.code, 354, "{}", context(&reply));
    client.send(b"Subject: slow link\r\n\r\n").await;
    for n in 0..6 {
        client.send(format!("part {n}\r\n").as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    client.send(b".\r\n").await;
    let reply = client.read_reply().await;
    assert_eq!(reply.code, 250, "{}", context(&reply));
    assert!(reply.text().contains("queued as"), "{}", context(&reply));
    let messages = postfix.wait_for_messages(1).await;
    assert!(
        messages[0].ends_with("\n\npart 0\npart 1\npart 2\npart 3\npart 4\npart 5\n"),
        "{}",
        messages[0]
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postfix_down_means_451() {
    let Some(mut postfix) = start_or_skip(PostfixOptions::mailbox(&["example.test"])) else {
        return;
    };
    postfix.stop();
    let gw = Gateway::start(in_front_of(&postfix)).await;
    let (mut client, _) = gw.ehlo().await;
    let reply = client.cmd("MAIL FROM:<alice@sender.test>").await;
    assert_eq!(reply.code, 250, "{reply}");
    let reply = client.cmd("RCPT TO:<bob@example.test>").await;
    assert_eq!(
        (reply.code, reply.status()),
        (451, "4.4.1"),
        "{reply}\nPostfix log:\n{}",
        postfix.log()
    );
    gw.stop().await;
}

/// Relay mode, as used to put Postfix between two gateways: Postfix relays to mxgate
/// from 127.0.0.2 (its `smtp_bind_address`), over STARTTLS, and mxgate records both.
#[tokio::test(flavor = "multi_thread")]
async fn postfix_relays_from_its_source_address_to_mxgate() {
    let gw = Gateway::start(TestConfig {
        trusted: vec!["127.0.0.0/8".into()],
        ..Default::default()
    })
    .await;
    let options = PostfixOptions::relay(&["example.test"], &gw.smtp.to_string(), Some("127.0.0.2"));
    let Some(postfix) = start_or_skip(options) else {
        gw.stop().await;
        return;
    };
    let (mut client, greeting) = support::client::SmtpClient::connect(postfix.addr).await;
    assert_eq!(greeting.code, 220, "{greeting}");
    assert_eq!(client.cmd("EHLO client.example.net").await.code, 250);
    let reply = client
        .send_mail(
            "alice@sender.test",
            &["bob@example.test"],
            "Subject: via postfix\n\nrelayed\n",
        )
        .await;
    assert_eq!(reply.code, 250, "{reply}\nPostfix log:\n{}", postfix.log());
    // Postfix refuses what it was not configured for (no open relay).
    let reply = client.cmd("MAIL FROM:<alice@sender.test>").await;
    assert_eq!(reply.code, 250);
    let reply = client.cmd("RCPT TO:<victim@elsewhere.test>").await;
    assert_eq!(reply.code, 554, "{reply}");

    let deadline = Instant::now() + Duration::from_secs(20);
    let messages = loop {
        let messages = gw.delivered();
        if !messages.is_empty() {
            break messages;
        }
        assert!(
            Instant::now() < deadline,
            "mxgate got nothing from Postfix; Postfix log:\n{}",
            postfix.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(messages.len(), 1, "{messages:#?}");
    let fields = header_fields(&messages[0]);
    let ours = &fields
        .iter()
        .find(|f| f.starts_with("Received:") && f.contains("(mxgate)"))
        .unwrap_or_else(|| panic!("no Received field from mxgate:\n{}", messages[0]));
    assert!(
        ours.starts_with("Received: from relay.example.test (unknown [127.0.0.2])"),
        "Postfix did not connect from 127.0.0.2: {ours}"
    );
    assert!(
        ours.contains("(using TLSv1.3"),
        "Postfix did not use STARTTLS: {ours}"
    );
    assert!(
        fields
            .iter()
            .any(|f| f.starts_with("Received:") && f.contains("by relay.example.test (Postfix)")),
        "{}",
        messages[0]
    );
    assert!(messages[0].ends_with("\n\nrelayed\n"), "{}", messages[0]);
    postfix
        .wait_for_log(&format!("relay=127.0.0.1[127.0.0.1]:{}", gw.smtp.port()))
        .await;
    gw.stop().await;
}
