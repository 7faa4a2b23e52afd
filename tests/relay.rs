//! In-line relay: the client's reply is the backend's reply; anything uncertain is 4xx.

mod support;

use std::time::Duration;
use support::backend::{Behaviour, FakeBackend, dead_address};
use support::client::SmtpClient;
use support::gateway::{Gateway, TestConfig};

fn config(backends: Vec<String>) -> TestConfig {
    TestConfig {
        trusted: vec!["127.0.0.0/8".into()],
        backends,
        extra:
            "relay:\n  tls: off\n  pool_wait: 2s\n  timeouts:\n    data_done: 2s\n    rcpt: 2s\n"
                .into(),
        ..Default::default()
    }
}

async fn transaction(client: &mut SmtpClient, rcpts: &[&str]) -> Vec<support::client::Reply> {
    let mut replies = vec![client.cmd("MAIL FROM:<alice@sender.test>").await];
    for rcpt in rcpts {
        replies.push(client.cmd(&format!("RCPT TO:<{rcpt}>")).await);
    }
    replies
}

#[tokio::test(flavor = "multi_thread")]
async fn accepted_only_after_the_backend_accepted() {
    let backend = FakeBackend::start(Behaviour::default()).await;
    let gw = Gateway::start(config(vec![backend.url()])).await;
    let (mut client, _) = gw.ehlo().await;
    let reply = client
        .send_mail(
            "alice@sender.test",
            &["bob@example.test"],
            "Subject: relay\n\nhello\n",
        )
        .await;
    assert_eq!(reply.code, 250);
    assert_eq!(
        reply.text(),
        "2.0.0 Ok: queued as BACKEND1",
        "backend reply passes through"
    );
    let messages = backend.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].mail_from, "alice@sender.test");
    assert_eq!(messages[0].rcpts, vec!["bob@example.test"]);
    let text = messages[0].text();
    assert!(
        text.starts_with("Received: from client.example.net (unknown [127.0.0.1])"),
        "{text}"
    );
    assert!(text.ends_with("Subject: relay\r\n\r\nhello\r\n"), "{text}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn per_recipient_rejections_pass_through() {
    let mut behaviour = Behaviour::default();
    behaviour.rcpt_replies.insert(
        "nobody@example.test".into(),
        "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown".into(),
    );
    behaviour
        .rcpt_replies
        .insert("full@example.test".into(), "452 4.2.2 Mailbox full".into());
    let backend = FakeBackend::start(behaviour).await;
    let gw = Gateway::start(config(vec![backend.url()])).await;
    let (mut client, _) = gw.ehlo().await;
    let replies = transaction(
        &mut client,
        &[
            "bob@example.test",
            "nobody@example.test",
            "full@example.test",
        ],
    )
    .await;
    assert_eq!(replies[1].code, 250);
    assert_eq!(replies[2].code, 550);
    assert_eq!(
        replies[2].text(),
        "5.1.1 <nobody@example.test>: Recipient address rejected: User unknown"
    );
    assert_eq!((replies[3].code, replies[3].status()), (452, "4.2.2"));
    assert_eq!(client.cmd("DATA").await.code, 354);
    client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n").await;
    assert_eq!(client.read_reply().await.code, 250);
    assert_eq!(backend.messages()[0].rcpts, vec!["bob@example.test"]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_refusing_the_sender_is_passed_through() {
    let backend = FakeBackend::start(Behaviour {
        mail_reply: "553 5.7.1 <alice@sender.test>: Sender address rejected".into(),
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(config(vec![backend.url()])).await;
    let (mut client, _) = gw.ehlo().await;
    let replies = transaction(&mut client, &["bob@example.test"]).await;
    assert_eq!(replies[0].code, 250, "MAIL is ours to answer");
    assert_eq!(
        (replies[1].code, replies[1].status()),
        (553, "5.7.1"),
        "{}",
        replies[1]
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_down_means_451_4_4_1() {
    let dead = dead_address().await;
    let gw = Gateway::start(config(vec![format!("smtp://{dead}")])).await;
    let (mut client, _) = gw.ehlo().await;
    let replies = transaction(&mut client, &["bob@example.test"]).await;
    assert_eq!(
        (replies[1].code, replies[1].status()),
        (451, "4.4.1"),
        "{}",
        replies[1]
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fails_over_to_the_next_backend() {
    let dead = dead_address().await;
    let busy = FakeBackend::start(Behaviour {
        greeting: "421 4.3.2 busy, try later".into(),
        ..Default::default()
    })
    .await;
    let good = FakeBackend::start(Behaviour::default()).await;
    let gw = Gateway::start(config(vec![
        format!("smtp://{dead}"),
        busy.url(),
        good.url(),
    ]))
    .await;
    let (mut client, _) = gw.ehlo().await;
    let reply = client
        .send_mail(
            "alice@sender.test",
            &["bob@example.test"],
            "Subject: failover\n\nx\n",
        )
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(busy.messages().len(), 0);
    assert_eq!(good.messages().len(), 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_timeout_means_451_4_4_2() {
    let backend = FakeBackend::start(Behaviour {
        data_delay: Some(Duration::from_secs(10)),
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(config(vec![backend.url()])).await;
    let (mut client, _) = gw.ehlo().await;
    let reply = client
        .send_mail(
            "alice@sender.test",
            &["bob@example.test"],
            "Subject: slow\n\nx\n",
        )
        .await;
    assert_eq!((reply.code, reply.status()), (451, "4.4.2"), "{reply}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_dropping_the_connection_means_451() {
    for behaviour in [
        Behaviour {
            drop_after_data: true,
            ..Default::default()
        },
        Behaviour {
            drop_mid_data: Some(10),
            ..Default::default()
        },
    ] {
        let backend = FakeBackend::start(behaviour).await;
        let gw = Gateway::start(config(vec![backend.url()])).await;
        let (mut client, _) = gw.ehlo().await;
        let body = format!("Subject: drop\n\n{}\n", "line of text\n".repeat(2000));
        let reply = client
            .send_mail("alice@sender.test", &["bob@example.test"], &body)
            .await;
        assert_eq!((reply.code, reply.status()), (451, "4.4.2"), "{reply}");
        // The session goes on, and the next message gets a fresh backend connection.
        backend.set(|b| {
            b.drop_after_data = false;
            b.drop_mid_data = None;
        });
        let reply = client
            .send_mail(
                "alice@sender.test",
                &["bob@example.test"],
                "Subject: again\n\nx\n",
            )
            .await;
        assert_eq!(reply.code, 250, "{reply}");
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_final_rejection_passes_through() {
    let backend = FakeBackend::start(Behaviour {
        data_reply: "554 5.7.1 Message rejected as spam by backend".into(),
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(config(vec![backend.url()])).await;
    let (mut client, _) = gw.ehlo().await;
    let reply = client
        .send_mail(
            "alice@sender.test",
            &["bob@example.test"],
            "Subject: spam\n\nx\n",
        )
        .await;
    assert_eq!((reply.code, reply.status()), (554, "5.7.1"));
    assert_eq!(reply.text(), "5.7.1 Message rejected as spam by backend");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lmtp_replies_per_recipient() {
    let mut behaviour = Behaviour {
        lmtp: true,
        ..Default::default()
    };
    behaviour
        .lmtp_replies
        .insert("full@example.test".into(), "452 4.2.2 Mailbox full".into());
    behaviour.lmtp_replies.insert(
        "gone@example.test".into(),
        "550 5.2.1 Mailbox disabled".into(),
    );
    let backend = FakeBackend::start(behaviour).await;
    let gw = Gateway::start(config(vec![backend.url()])).await;

    let (mut client, _) = gw.ehlo().await;
    let reply = client
        .send_mail(
            "alice@sender.test",
            &["a@example.test", "b@example.test"],
            "Subject: lmtp\n\nx\n",
        )
        .await;
    assert_eq!(reply.code, 250, "all delivered: {reply}");

    let reply = client
        .send_mail(
            "alice@sender.test",
            &["a@example.test", "full@example.test"],
            "Subject: lmtp\n\nx\n",
        )
        .await;
    assert_eq!(
        (reply.code, reply.status()),
        (451, "4.3.0"),
        "a temporary failure means retry: {reply}"
    );
    assert!(reply.text().contains("<full@example.test>"), "{reply}");

    let reply = client
        .send_mail(
            "alice@sender.test",
            &["a@example.test", "gone@example.test"],
            "Subject: lmtp\n\nx\n",
        )
        .await;
    assert_eq!(
        reply.code, 550,
        "a permanent failure is not hidden: {reply}"
    );
    assert!(
        reply
            .text()
            .contains("failed for <gone@example.test>; delivered to <a@example.test>"),
        "{reply}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_are_pooled_between_messages() {
    let backend = FakeBackend::start(Behaviour::default()).await;
    let gw = Gateway::start(config(vec![backend.url()])).await;
    let (mut client, _) = gw.ehlo().await;
    for n in 0..5 {
        let reply = client
            .send_mail(
                "alice@sender.test",
                &["bob@example.test"],
                &format!("Subject: {n}\n\nx\n"),
            )
            .await;
        assert_eq!(reply.code, 250);
    }
    assert_eq!(backend.messages().len(), 5);
    // The pool may hold one more connection from the readiness probe.
    assert!(
        backend.connections() <= 2,
        "connections: {}",
        backend.connections()
    );
    let commands = backend.commands();
    assert!(
        commands.iter().filter(|c| c.starts_with("EHLO")).count() <= 2,
        "{commands:?}"
    );
    gw.stop().await;
}

/// A pooled connection whose backend timed out while it idled (Postfix says 421 and
/// closes) is replaced by a fresh one, with or without PIPELINING; the client never
/// sees the stale 421.
#[tokio::test(flavor = "multi_thread")]
async fn a_pooled_connection_the_backend_timed_out_is_replaced() {
    for pipelining in [false, true] {
        let backend = FakeBackend::start(Behaviour {
            pipelining,
            idle_421: Some(Duration::from_millis(500)),
            ..Default::default()
        })
        .await;
        let gw = Gateway::start(config(vec![backend.url()])).await;
        let (mut client, _) = gw.ehlo().await;
        for n in 0..2 {
            if n > 0 {
                tokio::time::sleep(Duration::from_millis(1000)).await;
            }
            let reply = client
                .send_mail(
                    "alice@sender.test",
                    &["bob@example.test"],
                    &format!("Subject: {n}\n\nx\n"),
                )
                .await;
            assert_eq!(
                reply.code, 250,
                "pipelining {pipelining}, message {n}: {reply}"
            );
        }
        assert_eq!(backend.messages().len(), 2, "pipelining {pipelining}");
        gw.stop().await;
    }
}

/// We offer ENHANCEDSTATUSCODES, so a backend reply without one gets its class's code.
#[tokio::test(flavor = "multi_thread")]
async fn backend_replies_without_enhanced_codes_get_one() {
    let mut behaviour = Behaviour {
        data_reply: "451 try later".into(),
        ..Default::default()
    };
    behaviour
        .rcpt_replies
        .insert("nobody@example.test".into(), "550 no such user here".into());
    let backend = FakeBackend::start(behaviour).await;
    let gw = Gateway::start(config(vec![backend.url()])).await;
    let (mut client, _) = gw.ehlo().await;
    let replies = transaction(&mut client, &["nobody@example.test", "bob@example.test"]).await;
    assert_eq!(replies[1].to_string(), "550 5.0.0 no such user here");
    assert_eq!(replies[2].code, 250);
    assert_eq!(client.cmd("DATA").await.code, 354);
    client.send(b"Subject: x\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(client.read_reply().await.to_string(), "451 4.0.0 try later");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn aborted_transaction_resets_the_backend() {
    let backend = FakeBackend::start(Behaviour::default()).await;
    let gw = Gateway::start(config(vec![backend.url()])).await;
    let (mut client, _) = gw.ehlo().await;
    transaction(&mut client, &["bob@example.test"]).await;
    assert_eq!(client.cmd("RSET").await.code, 250);
    let reply = client
        .send_mail(
            "carol@sender.test",
            &["bob@example.test"],
            "Subject: after rset\n\nx\n",
        )
        .await;
    assert_eq!(reply.code, 250);
    let messages = backend.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].mail_from, "carol@sender.test");
    assert!(backend.commands().contains(&"RSET".to_string()));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_disconnect_mid_data_delivers_nothing() {
    let backend = FakeBackend::start(Behaviour::default()).await;
    let gw = Gateway::start(config(vec![backend.url()])).await;
    let (mut client, _) = gw.ehlo().await;
    transaction(&mut client, &["bob@example.test"]).await;
    assert_eq!(client.cmd("DATA").await.code, 354);
    client.send(b"Subject: cut\r\n\r\npartial").await;
    drop(client);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(backend.messages().is_empty());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chunking_backends_get_one_bdat_chunk() {
    for lmtp in [false, true] {
        let mut behaviour = Behaviour {
            chunking: true,
            lmtp,
            ..Default::default()
        };
        behaviour
            .lmtp_replies
            .insert("full@example.test".into(), "452 4.2.2 Mailbox full".into());
        let backend = FakeBackend::start(behaviour).await;
        let gw = Gateway::start(config(vec![backend.url()])).await;
        let (mut client, _) = gw.ehlo().await;
        let body = "Subject: chunked\n\n..leading dot\n";
        let reply = client
            .send_mail("alice@sender.test", &["bob@example.test"], body)
            .await;
        assert_eq!(reply.code, 250, "{reply}");
        let message = &backend.messages()[0];
        assert!(message.chunked, "sent with BDAT");
        assert!(
            message
                .text()
                .ends_with("Subject: chunked\r\n\r\n.leading dot\r\n"),
            "{}",
            message.text()
        );
        assert!(
            backend
                .commands()
                .iter()
                .any(|c| c.starts_with("BDAT ") && c.ends_with(" LAST"))
        );
        assert!(!backend.commands().iter().any(|c| c == "DATA"));
        if lmtp {
            let reply = client
                .send_mail(
                    "alice@sender.test",
                    &["a@example.test", "full@example.test"],
                    "Subject: x\n\nx\n",
                )
                .await;
            assert_eq!(reply.code, 451, "per-recipient replies after BDAT: {reply}");
        }
        gw.stop().await;
    }
}

/// Unknown recipients, as the mailbox server reports them, count towards the error
/// limit: a client cannot harvest the directory on one connection.
#[tokio::test(flavor = "multi_thread")]
async fn recipients_unknown_to_the_backend_count_as_errors() {
    let mut behaviour = Behaviour::default();
    for n in 0..3 {
        behaviour.rcpt_replies.insert(
            format!("guess{n}@example.test"),
            "550 5.1.1 User unknown".into(),
        );
    }
    let backend = FakeBackend::start(behaviour).await;
    let mut config = config(vec![backend.url()]);
    config.server_extra = "  max_errors: 3\n".into();
    let gw = Gateway::start(config).await;
    let (mut client, _) = gw.ehlo().await;
    assert_eq!(client.cmd("MAIL FROM:<alice@sender.test>").await.code, 250);
    for n in 0..2 {
        let reply = client
            .cmd(&format!("RCPT TO:<guess{n}@example.test>"))
            .await;
        assert_eq!(reply.code, 550, "{reply}");
    }
    client.send(b"RCPT TO:<guess2@example.test>\r\n").await;
    assert_eq!(client.read_reply().await.code, 550);
    let reply = client.read_reply().await;
    assert_eq!((reply.code, reply.status()), (421, "4.7.0"), "{reply}");
    assert!(client.is_closed().await);
    gw.stop().await;
}

/// A recipient the backend answers too late: its reply must not be read as the answer
/// to a later command (before, it was taken for the reply to DATA, and the client got
/// 250 for a message the backend never received).
#[tokio::test(flavor = "multi_thread")]
async fn a_late_backend_reply_poisons_the_transaction_not_the_next_one() {
    for chunking in [false, true] {
        let mut behaviour = Behaviour {
            chunking,
            ..Default::default()
        };
        behaviour
            .rcpt_delays
            .insert("late@example.test".into(), Duration::from_secs(3));
        let backend = FakeBackend::start(behaviour).await;
        let gw = Gateway::start(config(vec![backend.url()])).await;
        let (mut client, _) = gw.ehlo().await;
        let replies = transaction(&mut client, &["bob@example.test", "late@example.test"]).await;
        assert_eq!(replies[1].code, 250, "{}", replies[1]);
        assert_eq!(
            (replies[2].code, replies[2].status()),
            (451, "4.4.2"),
            "rcpt timeout is 2s: {}",
            replies[2]
        );
        // The late reply arrives meanwhile.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let more = client.cmd("RCPT TO:<carol@example.test>").await;
        assert_eq!(more.code, 451, "chunking {chunking}: {more}");
        let data = client.cmd("DATA").await;
        assert_eq!(
            (data.code, data.status()),
            (451, "4.4.2"),
            "chunking {chunking}: DATA after a broken backend session: {data}"
        );
        assert!(backend.messages().is_empty(), "chunking {chunking}");

        // The session itself is fine: after RSET the next transaction gets a fresh
        // connection.
        assert_eq!(client.cmd("RSET").await.code, 250);
        let reply = client
            .send_mail(
                "alice@sender.test",
                &["bob@example.test"],
                "Subject: after\n\nx\n",
            )
            .await;
        assert_eq!(reply.code, 250, "chunking {chunking}: {reply}");
        let messages = backend.messages();
        assert_eq!(messages.len(), 1, "chunking {chunking}");
        assert_eq!(messages[0].rcpts, vec!["bob@example.test"]);
        gw.stop().await;
    }
}
