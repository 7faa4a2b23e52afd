//! In-line relay: the client's reply is the backend's reply; anything uncertain is 4xx.

use mxgate_test_kit as support;

use std::time::Duration;
use support::backend::{Behaviour, FakeBackend, dead_address};
use support::client::SmtpClient;
use support::gateway::{Gateway, TestConfig};
use support::prom;

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

/// A reload builds new pools. The old ones keep nothing idle: their idle connections get
/// QUIT at once, and a session still on the old configuration gets a fresh connection
/// that is closed after its transaction. Before, every generation kept its own idle
/// pool, and a backend sized for `relay.max_connections` saw a multiple of it.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_closes_the_old_pools_idle_connections() {
    let backend = FakeBackend::start(Behaviour::default()).await;
    let gw = Gateway::start(config(vec![backend.url()])).await;
    let quits = || backend.commands().iter().filter(|c| *c == "QUIT").count();
    async fn until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..100 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{what}");
    }
    let mail = |n: usize| format!("Subject: {n}\n\nx\n");
    let (mut old_session, _) = gw.ehlo().await;
    let reply = old_session
        .send_mail("alice@sender.test", &["bob@example.test"], &mail(1))
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(quits(), 0, "{:?}", backend.commands());
    let before_reload = backend.connections();

    gw.running.as_ref().unwrap().reload().expect("reload");
    until("the old pool's idle connections are closed", || {
        quits() == before_reload
    })
    .await;

    // The session accepted before the reload still delivers, on a connection that is
    // not kept.
    let reply = old_session
        .send_mail("alice@sender.test", &["bob@example.test"], &mail(2))
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    until("the old pool's new connection is closed after use", || {
        quits() == before_reload + 1
    })
    .await;

    // A new session uses the new pool, which keeps its connection.
    let (mut new_session, _) = gw.ehlo().await;
    let reply = new_session
        .send_mail("alice@sender.test", &["bob@example.test"], &mail(3))
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(quits(), before_reload + 1, "{:?}", backend.commands());
    assert_eq!(backend.messages().len(), 3);
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
    // No transaction was left open at the backend: each MAIL it saw was a probe that
    // ended in RSET, or a delivery.
    let commands = backend.commands();
    let count = |verb: &str| commands.iter().filter(|c| c.starts_with(verb)).count();
    assert_eq!(
        count("MAIL"),
        count("RSET") + messages.len(),
        "{commands:?}"
    );
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
/// 250 for a message the backend never received). The probe's connection is dropped, so
/// the late `550` reaches nobody; the next recipient is verified on a fresh connection,
/// and the message goes to the recipients that were accepted, never to the late one.
#[tokio::test(flavor = "multi_thread")]
async fn a_late_backend_reply_is_never_read_as_another_answer() {
    for chunking in [false, true] {
        let mut behaviour = Behaviour {
            chunking,
            ..Default::default()
        };
        behaviour
            .rcpt_delays
            .insert("late@example.test".into(), Duration::from_secs(3));
        behaviour
            .rcpt_replies
            .insert("late@example.test".into(), "550 5.1.1 late".into());
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
        assert_eq!(more.code, 250, "chunking {chunking}: {more}");
        assert_eq!(client.cmd("DATA").await.code, 354);
        client.send(b"Subject: after\r\n\r\nx\r\n.\r\n").await;
        let reply = client.read_reply().await;
        assert_eq!(reply.code, 250, "chunking {chunking}: {reply}");
        let messages = backend.messages();
        assert_eq!(messages.len(), 1, "chunking {chunking}");
        assert_eq!(
            messages[0].rcpts,
            vec!["bob@example.test", "carol@example.test"],
            "chunking {chunking}"
        );
        gw.stop().await;
    }
}

fn hold_config(backends: Vec<String>, relay_extra: &str) -> TestConfig {
    TestConfig {
        extra: format!(
            "relay:\n  tls: off\n  pool_wait: 2s\n  timeouts:\n    data_done: 2s\n    rcpt: 2s\n{relay_extra}metrics:\n  listen: 127.0.0.1:0\n"
        ),
        ..config(backends)
    }
}

/// How often the backend saw `RCPT TO:<rcpt>` (probes and deliveries).
fn rcpt_commands(backend: &FakeBackend, rcpt: &str) -> usize {
    let line = format!("RCPT TO:<{rcpt}>");
    backend.commands().iter().filter(|c| **c == line).count()
}

/// Sends message content a few bytes at a time over `duration`, then ends it, and
/// returns the final reply: a client on a slow link.
async fn trickle(mut client: SmtpClient, duration: Duration) -> support::client::Reply {
    let steps = 12;
    for n in 0..steps {
        client.send(format!("line {n}\r\n").as_bytes()).await;
        tokio::time::sleep(duration / steps).await;
    }
    client.send(b".\r\n").await;
    client.read_reply().await
}

/// Issue 11 cases 5 and 9: clients that send their data slowly hold no backend
/// connection. With one pooled connection and three clients stalled mid-DATA, another
/// client delivers at once (before, every RCPT after the first stalled client waited
/// `pool_wait` and got `451 4.4.5`), and the stalled ones deliver too when they finish.
#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_do_not_hold_backend_connections() {
    let backend = FakeBackend::start(Behaviour::default()).await;
    let gw = Gateway::start(hold_config(vec![backend.url()], "  max_connections: 1\n")).await;
    let mut slow = Vec::new();
    for n in 0..3 {
        let (mut client, _) = gw.ehlo().await;
        let replies = transaction(&mut client, &[&format!("slow{n}@example.test")]).await;
        assert_eq!(replies[1].code, 250, "stalled client {n}: {}", replies[1]);
        assert_eq!(client.cmd("DATA").await.code, 354);
        client.send(b"Subject: slow\r\n\r\n").await;
        slow.push(tokio::spawn(trickle(client, Duration::from_secs(3))));
    }
    let (mut client, _) = gw.ehlo().await;
    let reply = client
        .send_mail(
            "alice@sender.test",
            &["bob@example.test"],
            "Subject: fast\n\nx\n",
        )
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(
        backend.messages().len(),
        1,
        "relayed while the slow clients were still sending"
    );
    for (n, task) in slow.into_iter().enumerate() {
        let reply = task.await.unwrap();
        assert_eq!(reply.code, 250, "slow client {n}: {reply}");
    }
    let messages = backend.messages();
    assert_eq!(messages.len(), 4);
    assert_eq!(messages[0].rcpts, vec!["bob@example.test"]);
    gw.stop().await;
}

/// Issue 11 case 6: a backend that closes connections idle for more than a second (with
/// `421`, as Postfix does) and a client that takes three seconds to upload its data:
/// the connection is taken at end of data (a stale pooled one is replaced), so the
/// message is stored and the client gets the backend's 250.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_upload_outlives_the_backend_idle_timeout() {
    for pipelining in [true, false] {
        let backend = FakeBackend::start(Behaviour {
            pipelining,
            idle_421: Some(Duration::from_secs(1)),
            ..Default::default()
        })
        .await;
        let gw = Gateway::start(hold_config(vec![backend.url()], "")).await;
        let (mut client, _) = gw.ehlo().await;
        let replies = transaction(&mut client, &["bob@example.test"]).await;
        assert_eq!(replies[1].code, 250, "{}", replies[1]);
        assert_eq!(client.cmd("DATA").await.code, 354);
        client.send(b"Subject: slow link\r\n\r\n").await;
        let reply = trickle(client, Duration::from_secs(3)).await;
        assert_eq!(
            (reply.code, reply.text().as_str()),
            (250, "2.0.0 Ok: queued as BACKEND1"),
            "pipelining {pipelining}"
        );
        let messages = backend.messages();
        assert_eq!(messages.len(), 1, "pipelining {pipelining}");
        assert!(
            messages[0]
                .text()
                .ends_with("Subject: slow link\r\n\r\nline 0\r\nline 1\r\nline 2\r\nline 3\r\nline 4\r\nline 5\r\nline 6\r\nline 7\r\nline 8\r\nline 9\r\nline 10\r\nline 11\r\n"),
            "{}",
            messages[0].text()
        );
        gw.stop().await;
    }
}

/// A backend reply of the 421 kind, at any stage, reaches the client as our `451 4.4.2`:
/// from us, a 421 would tell the client that *we* end the session. The session goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_backend_421_is_never_passed_on() {
    let closing = "421 4.3.2 backend.test Service shutting down";
    let rcpt_closing = || {
        let mut b = Behaviour::default();
        b.rcpt_replies
            .insert("bob@example.test".into(), closing.into());
        b
    };
    let lmtp_closing = || {
        let mut b = Behaviour {
            lmtp: true,
            ..Default::default()
        };
        b.lmtp_replies
            .insert("bob@example.test".into(), closing.into());
        b
    };
    // (what, backend, a change made after RCPT, the stage the client sees it at)
    let cases: Vec<(&str, Behaviour, Option<Change>, &str)> = vec![
        (
            "MAIL of the probe",
            Behaviour {
                mail_reply: closing.into(),
                ..Default::default()
            },
            None,
            "rcpt",
        ),
        ("RCPT of the probe", rcpt_closing(), None, "rcpt"),
        (
            "MAIL at delivery",
            Behaviour::default(),
            Some(|b| b.mail_reply = "421 4.3.2 backend.test Service shutting down".into()),
            "data",
        ),
        (
            "RCPT at delivery",
            Behaviour::default(),
            Some(|b| {
                b.rcpt_replies.insert(
                    "bob@example.test".into(),
                    "421 4.3.2 backend.test Service shutting down".into(),
                );
            }),
            "data",
        ),
        (
            "final reply",
            Behaviour {
                data_reply: closing.into(),
                ..Default::default()
            },
            None,
            "data",
        ),
        (
            "final reply, BDAT",
            Behaviour {
                data_reply: closing.into(),
                chunking: true,
                ..Default::default()
            },
            None,
            "data",
        ),
        ("LMTP reply per recipient", lmtp_closing(), None, "data"),
    ];
    client_gets(cases, (451, "4.4.2"), true).await;
}

/// What a case changes in the backend after RCPT was accepted.
type Change = fn(&mut Behaviour);

/// One message per case, each through a fresh gateway to its own backend: the reply
/// the client gets at `stage` ("rcpt", or "data" for the final reply) must be `want`,
/// and with `session_goes_on` the session must still take RSET.
async fn client_gets(
    cases: Vec<(&str, Behaviour, Option<Change>, &str)>,
    want: (u16, &str),
    session_goes_on: bool,
) {
    for (what, behaviour, change, stage) in cases {
        let backend = FakeBackend::start(behaviour).await;
        let gw = Gateway::start(hold_config(vec![backend.url()], "")).await;
        let (mut client, _) = gw.ehlo().await;
        let replies = transaction(&mut client, &["bob@example.test"]).await;
        let reply = if stage == "rcpt" {
            replies[1].clone()
        } else {
            assert_eq!(replies[1].code, 250, "{what}: {}", replies[1]);
            if let Some(change) = change {
                backend.set(change);
            }
            assert_eq!(client.cmd("DATA").await.code, 354, "{what}");
            client.send(b"Subject: x\r\n\r\nx\r\n.\r\n").await;
            client.read_reply().await
        };
        assert_eq!((reply.code, reply.status()), want, "{what}: {reply}");
        if session_goes_on {
            assert_eq!(
                client.cmd("RSET").await.code,
                250,
                "{what}: the session goes on"
            );
        }
        gw.stop().await;
    }
}

/// 3xx is an intermediate reply: the only one a mailbox server may give here is 354 to
/// DATA. One given to MAIL, RCPT or as the final reply is a broken backend, and the
/// client gets a 4xx (try again), never the 3xx, which it could not act on.
#[tokio::test(flavor = "multi_thread")]
async fn a_backend_3xx_is_never_passed_on() {
    let odd = "334 VXNlcm5hbWU6";
    let mut rcpt_odd = Behaviour::default();
    rcpt_odd
        .rcpt_replies
        .insert("bob@example.test".into(), odd.into());
    let cases: Vec<(&str, Behaviour, Option<Change>, &str)> = vec![
        (
            "MAIL of the probe",
            Behaviour {
                mail_reply: odd.into(),
                ..Default::default()
            },
            None,
            "rcpt",
        ),
        ("RCPT of the probe", rcpt_odd, None, "rcpt"),
        (
            "final reply",
            Behaviour {
                data_reply: odd.into(),
                ..Default::default()
            },
            None,
            "data",
        ),
        (
            "final reply, BDAT",
            Behaviour {
                data_reply: odd.into(),
                chunking: true,
                ..Default::default()
            },
            None,
            "data",
        ),
    ];
    client_gets(cases, (451, "4.5.0"), false).await;
}

/// Recipients are verified with a probe (MAIL with the real sender and its parameters,
/// RCPT, RSET). Definite answers are kept: the next message to an accepted recipient
/// costs no probe, a refusal is kept for `ttl_reject`, a 4xx is never kept.
#[tokio::test(flavor = "multi_thread")]
async fn recipient_answers_are_kept_in_a_cache() {
    let mut behaviour = Behaviour::default();
    behaviour.rcpt_replies.insert(
        "nobody@example.test".into(),
        "550 5.1.1 <nobody@example.test>: User unknown".into(),
    );
    behaviour
        .rcpt_replies
        .insert("full@example.test".into(), "452 4.2.2 Mailbox full".into());
    let backend = FakeBackend::start(behaviour).await;
    let gw = Gateway::start(hold_config(
        vec![backend.url()],
        "  recipient_cache:\n    ttl_reject: 1s\n",
    ))
    .await;
    let metrics = gw.metrics.expect("metrics listener");
    let (mut client, _) = gw.ehlo().await;
    for n in 1..=2 {
        let mail = client
            .cmd("MAIL FROM:<alice@sender.test> SIZE=100 BODY=8BITMIME")
            .await;
        assert_eq!(mail.code, 250);
        let bob = client.cmd("RCPT TO:<bob@example.test>").await;
        assert_eq!(bob.code, 250, "message {n}: {bob}");
        let nobody = client.cmd("RCPT TO:<nobody@example.test>").await;
        assert_eq!(
            nobody.to_string(),
            "550 5.1.1 <nobody@example.test>: User unknown",
            "message {n}: the backend's reply, kept or not"
        );
        let full = client.cmd("RCPT TO:<full@example.test>").await;
        assert_eq!((full.code, full.status()), (452, "4.2.2"), "message {n}");
        assert_eq!(client.cmd("DATA").await.code, 354);
        client.send(b"Subject: x\r\n\r\nx\r\n.\r\n").await;
        assert_eq!(client.read_reply().await.code, 250, "message {n}");
        // bob: one probe, then one RCPT per delivery; nobody: one probe; full: a probe
        // per message.
        assert_eq!(
            rcpt_commands(&backend, "bob@example.test"),
            n + 1,
            "message {n}"
        );
        assert_eq!(
            rcpt_commands(&backend, "nobody@example.test"),
            1,
            "message {n}"
        );
        assert_eq!(
            rcpt_commands(&backend, "full@example.test"),
            n,
            "message {n}"
        );
    }
    // Probes and deliveries carry the sender and its parameters.
    let commands = backend.commands();
    let mails: Vec<&String> = commands.iter().filter(|c| c.starts_with("MAIL")).collect();
    assert_eq!(
        mails.len(),
        6,
        "four probes and two deliveries: {commands:?}"
    );
    assert!(
        mails
            .iter()
            .all(|c| *c == "MAIL FROM:<alice@sender.test> SIZE=100 BODY=8BITMIME"),
        "{mails:?}"
    );
    assert_eq!(commands.iter().filter(|c| *c == "RSET").count(), 4);

    // The refusal expires after ttl_reject: the recipient is asked again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(client.cmd("MAIL FROM:<alice@sender.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<nobody@example.test>").await.code, 550);
    assert_eq!(rcpt_commands(&backend, "nobody@example.test"), 2);

    let exposition = prom::exposition(metrics).await;
    let probes = |result: &str| {
        prom::value(
            &exposition,
            &format!(
                "mxgate_backend_recipient_probes_total{{backend=\"{}\",result=\"{result}\"}}",
                backend.url()
            ),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(probes("accepted"), 1.0, "{exposition}");
    assert_eq!(probes("rejected"), 2.0, "{exposition}");
    assert_eq!(probes("tempfailed"), 2.0, "{exposition}");
    assert!(
        prom::value(
            &exposition,
            "mxgate_backend_recipient_cache_requests_total{result=\"hit\"}"
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{exposition}"
    );
    gw.stop().await;
}

/// A backend may refuse a recipient because of the envelope (a quota against the
/// declared SIZE, a list only some senders may write to). One client's refused envelope
/// must not make us refuse the same recipient for other senders: a refusal is kept for
/// its envelope only.
#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_for_one_envelope_is_not_served_to_another() {
    let mut behaviour = Behaviour::default();
    behaviour.rcpt_replies.insert(
        "bob@example.test".into(),
        "552 5.2.2 <bob@example.test>: Mailbox full".into(),
    );
    let backend = FakeBackend::start(behaviour).await;
    let gw = Gateway::start(hold_config(vec![backend.url()], "")).await;
    let (mut mallory, _) = gw.ehlo().await;
    let mail = mallory
        .cmd("MAIL FROM:<mallory@attacker.test> SIZE=9000000")
        .await;
    assert_eq!(mail.code, 250);
    let refused = mallory.cmd("RCPT TO:<bob@example.test>").await;
    assert_eq!(refused.code, 552, "{refused}");
    mallory.cmd("QUIT").await;

    // For a message of an ordinary size from another sender the backend takes bob.
    backend.set(|b| {
        b.rcpt_replies.remove("bob@example.test");
    });
    let (mut alice, _) = gw.ehlo().await;
    assert_eq!(alice.cmd("MAIL FROM:<alice@sender.test>").await.code, 250);
    let bob = alice.cmd("RCPT TO:<bob@example.test>").await;
    assert_eq!(bob.code, 250, "a refusal kept for another envelope: {bob}");
    assert_eq!(alice.cmd("DATA").await.code, 354);
    alice.send(b"Subject: x\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(alice.read_reply().await.code, 250);
    assert_eq!(backend.messages().len(), 1);
    // The same refused envelope is still answered from the cache.
    let (mut again, _) = gw.ehlo().await;
    backend.set(|b| {
        b.rcpt_replies.insert(
            "bob@example.test".into(),
            "552 5.2.2 <bob@example.test>: Mailbox full".into(),
        );
    });
    let probes = rcpt_commands(&backend, "bob@example.test");
    let mail = again
        .cmd("MAIL FROM:<mallory@attacker.test> SIZE=9000000")
        .await;
    assert_eq!(mail.code, 250);
    assert_eq!(again.cmd("RCPT TO:<bob@example.test>").await.code, 552);
    assert_eq!(rcpt_commands(&backend, "bob@example.test"), probes);
    gw.stop().await;
}

/// A backend that refuses DATA (Postfix's `smtpd_data_restrictions`, e.g.
/// `reject_multi_recipient_bounce`) keeps the transaction open. The connection must
/// not go back to the pool like that: the next MAIL on it, another client's probe or
/// delivery, would get `503 nested MAIL command`, a permanent refusal of mail the
/// backend would take.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_whose_data_was_refused_is_reset_before_reuse() {
    for pipelining in [true, false] {
        let backend = FakeBackend::start(Behaviour {
            pipelining,
            data_refusal: Some(
                "550 5.5.3 <DATA>: Data command rejected: Multi-recipient bounce".into(),
            ),
            ..Behaviour::default()
        })
        .await;
        let gw = Gateway::start(hold_config(vec![backend.url()], "")).await;
        let (mut mallory, _) = gw.ehlo().await;
        let reply = mallory
            .send_mail(
                "mallory@attacker.test",
                &["bob@example.test", "carol@example.test"],
                "Subject: x\n\nx\n",
            )
            .await;
        assert_eq!(reply.code, 550, "pipelining {pipelining}: {reply}");
        mallory.cmd("QUIT").await;

        backend.set(|b| b.data_refusal = None);
        for n in 1..=2 {
            let (mut alice, _) = gw.ehlo().await;
            assert_eq!(alice.cmd("MAIL FROM:<alice@sender.test>").await.code, 250);
            let rcpt = alice.cmd(&format!("RCPT TO:<dave{n}@example.test>")).await;
            assert_eq!(
                rcpt.code, 250,
                "pipelining {pipelining}, message {n}: {rcpt}"
            );
            assert_eq!(alice.cmd("DATA").await.code, 354);
            alice.send(b"Subject: x\r\n\r\nx\r\n.\r\n").await;
            let reply = alice.read_reply().await;
            assert_eq!(
                reply.code, 250,
                "pipelining {pipelining}, message {n}: {reply}"
            );
        }
        assert_eq!(backend.messages().len(), 2, "pipelining {pipelining}");
        gw.stop().await;
    }
}

/// The backend refuses at delivery a recipient it accepted when it was verified (its
/// directory changed meanwhile): no `250` for a subset (there is no local queue), so the
/// whole message gets `451 4.3.0` and nothing is stored. Without PIPELINING the
/// connection is reset before DATA; with it, DATA went with the RCPTs and got `354`, so
/// no content follows and the connection is closed, which ends the backend's
/// transaction.
#[tokio::test(flavor = "multi_thread")]
async fn a_recipient_refused_at_delivery_defers_the_whole_message() {
    for pipelining in [true, false] {
        let backend = FakeBackend::start(Behaviour {
            pipelining,
            ..Default::default()
        })
        .await;
        let gw = Gateway::start(hold_config(vec![backend.url()], "")).await;
        let (mut client, _) = gw.ehlo().await;
        let replies = transaction(&mut client, &["bob@example.test", "carol@example.test"]).await;
        assert!(replies.iter().all(|r| r.code == 250), "{replies:?}");
        assert_eq!(client.cmd("DATA").await.code, 354);
        backend.set(|b| {
            b.rcpt_replies.insert(
                "carol@example.test".into(),
                "550 5.1.1 <carol@example.test>: User unknown".into(),
            );
        });
        client.send(b"Subject: x\r\n\r\nx\r\n.\r\n").await;
        let reply = client.read_reply().await;
        assert_eq!(
            (reply.code, reply.status()),
            (451, "4.3.0"),
            "pipelining {pipelining}: {reply}"
        );
        assert!(reply.text().contains("<carol@example.test>"), "{reply}");
        assert!(backend.messages().is_empty(), "pipelining {pipelining}");
        let commands = backend.commands();
        let last = commands.last().map(String::as_str);
        if pipelining {
            assert_eq!(last, Some("DATA"), "{commands:?}");
        } else {
            assert!(!commands.iter().any(|c| c == "DATA"), "{commands:?}");
            assert_eq!(last, Some("RSET"), "{commands:?}");
        }
        // The next message must not meet a backend session left waiting for content.
        backend.set(|b| b.rcpt_replies.clear());
        let replies = transaction(&mut client, &["bob@example.test", "carol@example.test"]).await;
        assert!(replies.iter().all(|r| r.code == 250), "{replies:?}");
        assert_eq!(client.cmd("DATA").await.code, 354);
        client.send(b"Subject: y\r\n\r\ny\r\n.\r\n").await;
        let reply = client.read_reply().await;
        assert_eq!(reply.code, 250, "pipelining {pipelining}: {reply}");
        let messages = backend.messages();
        assert_eq!(messages.len(), 1, "pipelining {pipelining}");
        assert!(
            messages[0].text().contains("Subject: y"),
            "{}",
            messages[0].text()
        );
        // Had the connection left after 354 been reused, the backend would have read
        // this transaction's commands as the first one's content and stored that, for
        // bob alone. (Counting connections cannot tell: the readiness probe may open
        // one at any moment, and did under load.)
        assert_eq!(
            messages[0].rcpts,
            ["bob@example.test", "carol@example.test"],
            "pipelining {pipelining}: the closed connection was reused"
        );
        assert!(
            messages[0].text().starts_with("Received:"),
            "pipelining {pipelining}: {}",
            messages[0].text()
        );
        gw.stop().await;
    }
}

/// A non-ASCII envelope needs a backend that offers SMTPUTF8: such a recipient is
/// refused at RCPT (`553 5.6.7`) and never sent to the backend, while the ASCII
/// recipients of the same transaction are relayed.
#[tokio::test(flavor = "multi_thread")]
async fn a_backend_without_smtputf8_refuses_non_ascii_recipients_at_rcpt() {
    let backend = FakeBackend::start(Behaviour {
        smtputf8: false,
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(hold_config(vec![backend.url()], "")).await;
    let (mut client, _) = gw.ehlo().await;
    for _ in 0..2 {
        let mail = client.cmd("MAIL FROM:<alice@sender.test> SMTPUTF8").await;
        assert_eq!(mail.code, 250);
        let reply = client.cmd("RCPT TO:<jörg@example.test>").await;
        assert_eq!((reply.code, reply.status()), (553, "5.6.7"), "{reply}");
        assert_eq!(client.cmd("RCPT TO:<bob@example.test>").await.code, 250);
        assert_eq!(client.cmd("DATA").await.code, 354);
        client.send(b"Subject: x\r\n\r\nx\r\n.\r\n").await;
        let reply = client.read_reply().await;
        assert_eq!(reply.code, 250, "{reply}");
    }
    let messages = backend.messages();
    assert_eq!(messages.len(), 2);
    assert!(messages.iter().all(|m| m.rcpts == vec!["bob@example.test"]));
    assert!(
        !backend.commands().iter().any(|c| c.contains("jörg")),
        "never sent to a backend that cannot take it"
    );
    gw.stop().await;
}

/// More recipients than one pipelined group (100): MAIL and the RCPTs go out in groups,
/// each read before the next is written, and a refusal in a later group still defers
/// the whole message.
#[tokio::test(flavor = "multi_thread")]
async fn many_recipients_are_relayed_in_groups() {
    let backend = FakeBackend::start(Behaviour::default()).await;
    let mut config = hold_config(vec![backend.url()], "");
    config.server_extra = "  max_recipients: 250\n".into();
    let gw = Gateway::start(config).await;
    let (mut client, _) = gw.ehlo().await;
    let rcpts: Vec<String> = (0..150).map(|n| format!("r{n}@example.test")).collect();
    let refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let reply = client
        .send_mail("alice@sender.test", &refs, "Subject: many\n\nx\n")
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(backend.messages()[0].rcpts, rcpts);

    assert_eq!(client.cmd("MAIL FROM:<alice@sender.test>").await.code, 250);
    for rcpt in &rcpts {
        assert_eq!(client.cmd(&format!("RCPT TO:<{rcpt}>")).await.code, 250);
    }
    assert_eq!(client.cmd("DATA").await.code, 354);
    backend.set(|b| {
        b.rcpt_replies
            .insert("r140@example.test".into(), "550 5.1.1 gone".into());
    });
    client.send(b"Subject: x\r\n\r\nx\r\n.\r\n").await;
    let reply = client.read_reply().await;
    assert_eq!((reply.code, reply.status()), (451, "4.3.0"), "{reply}");
    assert_eq!(backend.messages().len(), 1);
    gw.stop().await;
}
