//! The SMTP conversation over a real socket: extensions, command sequencing, limits and
//! error replies with enhanced status codes.

use mxgate_test_kit as support;

use support::client::SmtpClient;
use support::gateway::{Gateway, TestConfig};

fn trusted_local() -> TestConfig {
    TestConfig {
        trusted: vec!["127.0.0.0/8".into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ehlo_offers_the_extensions() {
    let gw = Gateway::start(trusted_local()).await;
    let (_client, ehlo) = gw.ehlo().await;
    let keywords: Vec<&str> = ehlo.lines[1..].iter().map(String::as_str).collect();
    for want in [
        "PIPELINING",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "STARTTLS",
    ] {
        assert!(keywords.contains(&want), "{want} missing from {keywords:?}");
    }
    assert!(keywords.contains(&"SIZE 26214400"), "{keywords:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delivers_a_message_to_the_maildir() {
    let gw = Gateway::start(trusted_local()).await;
    let (mut client, _) = gw.ehlo().await;
    let reply = client
        .send_mail(
            "alice@sender.test",
            &["bob@example.test"],
            "Subject: hello\n\nbody line\n..dot line\n",
        )
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(reply.status(), "2.0.0");
    let delivered = gw.delivered();
    assert_eq!(delivered.len(), 1);
    let message = &delivered[0];
    assert!(message.starts_with("Return-Path: <alice@sender.test>\nDelivered-To: bob@example.test\nReceived: from client.example.net (unknown [127.0.0.1])"), "{message}");
    assert!(
        message.ends_with("Subject: hello\n\nbody line\n.dot line\n"),
        "{message}"
    );
    assert_eq!(client.cmd("QUIT").await.code, 221);
    assert!(client.is_closed().await);
    gw.stop().await;
}

/// An Authentication-Results field whose comment ends in a backslash used to panic the
/// session (found while writing the fuzz targets): the message is relayed and the
/// session goes on.
#[tokio::test(flavor = "multi_thread")]
async fn unterminated_comment_in_authentication_results_is_just_content() {
    let gw = Gateway::start(trusted_local()).await;
    let (mut client, _) = gw.ehlo().await;
    let reply = client
        .send_mail(
            "alice@sender.test",
            &["bob@example.test"],
            "Authentication-Results: (\\\nSubject: hello\n\nbody\n",
        )
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(gw.delivered().len(), 1);
    assert_eq!(client.cmd("QUIT").await.code, 221);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_out_of_sequence_get_503() {
    let gw = Gateway::start(trusted_local()).await;
    let mut client = gw.connect().await;
    let reply = client.cmd("MAIL FROM:<a@b.test>").await;
    assert_eq!((reply.code, reply.status()), (503, "5.5.1"), "{reply}");
    assert_eq!(client.cmd("EHLO c.test").await.code, 250);
    let reply = client.cmd("RCPT TO:<x@example.test>").await;
    assert_eq!((reply.code, reply.status()), (503, "5.5.1"), "{reply}");
    let reply = client.cmd("DATA").await;
    assert_eq!((reply.code, reply.status()), (503, "5.5.1"), "{reply}");
    assert_eq!(client.cmd("MAIL FROM:<a@b.test>").await.code, 250);
    let reply = client.cmd("MAIL FROM:<a@b.test>").await;
    assert_eq!(
        (reply.code, reply.status()),
        (503, "5.5.1"),
        "nested MAIL: {reply}"
    );
    let reply = client.cmd("DATA").await;
    assert_eq!(
        (reply.code, reply.status()),
        (554, "5.5.1"),
        "DATA without recipients: {reply}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn informational_commands() {
    let gw = Gateway::start(trusted_local()).await;
    let (mut client, _) = gw.ehlo().await;
    let reply = client.cmd("VRFY bob").await;
    assert_eq!((reply.code, reply.status()), (252, "2.5.0"), "{reply}");
    let reply = client.cmd("HELP").await;
    assert_eq!(reply.code, 214, "{reply}");
    let reply = client.cmd("NOOP").await;
    assert_eq!((reply.code, reply.status()), (250, "2.0.0"));
    let reply = client.cmd("RSET").await;
    assert_eq!((reply.code, reply.status()), (250, "2.0.0"));
    let reply = client.cmd("EXPN staff").await;
    assert_eq!((reply.code, reply.status()), (502, "5.5.1"), "{reply}");
    let reply = client.cmd("FROB").await;
    assert_eq!((reply.code, reply.status()), (500, "5.5.2"), "{reply}");
    let reply = client.cmd("AUTH PLAIN AGJvYgBzZWNyZXQ=").await;
    assert_eq!(reply.code / 100, 5, "{reply}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn helo_gets_plain_reply_and_no_extensions() {
    let gw = Gateway::start(trusted_local()).await;
    let mut client = gw.connect().await;
    let reply = client.cmd("HELO old.client.test").await;
    assert_eq!(reply.code, 250);
    assert_eq!(reply.lines.len(), 1, "{reply}");
    let reply = client
        .send_mail("a@b.test", &["c@example.test"], "Subject: x\n\nhi\n")
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    assert!(
        gw.delivered()[0].contains("with SMTP"),
        "HELO sessions are recorded as SMTP"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_our_domains_are_accepted() {
    let gw = Gateway::start(trusted_local()).await;
    let (mut client, _) = gw.ehlo().await;
    assert_eq!(client.cmd("MAIL FROM:<a@b.test>").await.code, 250);
    for rcpt in [
        "victim@elsewhere.test",
        "x@sub.example.test",
        "x@example.test.evil",
    ] {
        let reply = client.cmd(&format!("RCPT TO:<{rcpt}>")).await;
        assert_eq!(
            (reply.code, reply.status()),
            (550, "5.7.1"),
            "{rcpt}: {reply}"
        );
    }
    // An address literal is refused too (as bad syntax, by the parser).
    let reply = client.cmd("RCPT TO:<x@[127.0.0.1]>").await;
    assert_eq!(reply.code / 100, 5, "{reply}");
    let reply = client.cmd("RCPT TO:<Bob@EXAMPLE.TEST>").await;
    assert_eq!(reply.code, 250, "domains are case-insensitive: {reply}");
    let reply = client.cmd("RCPT TO:<postmaster>").await;
    assert_eq!(
        reply.code, 250,
        "RFC 5321 requires accepting <postmaster>: {reply}"
    );
    gw.stop().await;
}

/// A local part that names another domain is refused, even in our domain: the backend
/// trusts us, and Postfix there rewrites `user%evil.test@example.test`
/// (`allow_percent_hack`) and `evil.test!user@example.test` (`swap_bangpath`) to
/// `user@evil.test` and relays it for a trusted client, which would make the pair an
/// open relay.
#[tokio::test(flavor = "multi_thread")]
async fn local_parts_that_route_elsewhere_are_refused() {
    let gw = Gateway::start(trusted_local()).await;
    let (mut client, _) = gw.ehlo().await;
    assert_eq!(client.cmd("MAIL FROM:<a@b.test>").await.code, 250);
    for rcpt in [
        "user%evil.test@example.test",
        "evil.test!user@example.test",
        "\"user@evil.test\"@example.test",
    ] {
        let reply = client.cmd(&format!("RCPT TO:<{rcpt}>")).await;
        assert_eq!(
            (reply.code, reply.status()),
            (550, "5.7.1"),
            "{rcpt}: {reply}"
        );
        assert!(reply.text().contains("routes elsewhere"), "{rcpt}: {reply}");
    }
    for rcpt in ["first.last+tag@example.test", "o'brien@example.test"] {
        let reply = client.cmd(&format!("RCPT TO:<{rcpt}>")).await;
        assert_eq!(reply.code, 250, "{rcpt}: {reply}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn recipient_limit() {
    let gw = Gateway::start(TestConfig {
        server_extra: "  max_recipients: 3\n".into(),
        ..trusted_local()
    })
    .await;
    let (mut client, _) = gw.ehlo().await;
    assert_eq!(client.cmd("MAIL FROM:<a@b.test>").await.code, 250);
    for n in 0..3 {
        assert_eq!(
            client
                .cmd(&format!("RCPT TO:<u{n}@example.test>"))
                .await
                .code,
            250
        );
    }
    let reply = client.cmd("RCPT TO:<u4@example.test>").await;
    assert_eq!((reply.code, reply.status()), (452, "4.5.3"), "{reply}");
    gw.stop().await;
}

/// A client that pipelines more recipients than we take gets `452 4.5.3` for the rest
/// and sends them later; those replies are not errors, so the accepted recipients'
/// message is still delivered however many there were.
#[tokio::test(flavor = "multi_thread")]
async fn recipients_over_the_limit_do_not_count_as_errors() {
    let gw = Gateway::start(TestConfig {
        server_extra: "  max_recipients: 3\n  max_errors: 2\n".into(),
        ..trusted_local()
    })
    .await;
    let (mut client, _) = gw.ehlo().await;
    let mut pipelined = String::from("MAIL FROM:<a@b.test>\r\n");
    for n in 0..8 {
        pipelined.push_str(&format!("RCPT TO:<u{n}@example.test>\r\n"));
    }
    pipelined.push_str("DATA\r\n");
    client.send(pipelined.as_bytes()).await;
    assert_eq!(client.read_reply().await.code, 250, "MAIL");
    let codes: Vec<u16> = {
        let mut codes = Vec::new();
        for _ in 0..8 {
            codes.push(client.read_reply().await.code);
        }
        codes
    };
    assert_eq!(codes, [250, 250, 250, 452, 452, 452, 452, 452]);
    assert_eq!(client.read_reply().await.code, 354);
    client.send(b"Subject: many\r\n\r\nhi\r\n.\r\n").await;
    let reply = client.read_reply().await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(gw.delivered().len(), 1);
    assert!(gw.delivered()[0].contains("Delivered-To: u2@example.test"));
    // Real mistakes still count: two and the session ends.
    assert_eq!(client.cmd("BOGUS").await.code, 500);
    client.send(b"BOGUS\r\n").await;
    assert_eq!(client.read_reply().await.code, 500);
    assert_eq!(client.read_reply().await.code, 421);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn size_limits() {
    let gw = Gateway::start(TestConfig {
        server_extra: "  max_message_size: 2000\n".into(),
        ..trusted_local()
    })
    .await;
    let (mut client, ehlo) = gw.ehlo().await;
    assert!(ehlo.lines.contains(&"SIZE 2000".to_string()), "{ehlo}");
    let reply = client.cmd("MAIL FROM:<a@b.test> SIZE=2001").await;
    assert_eq!(
        (reply.code, reply.status()),
        (552, "5.3.4"),
        "declared size: {reply}"
    );
    let body = format!("Subject: big\n\n{}\n", "x".repeat(3000));
    let reply = client
        .send_mail("a@b.test", &["c@example.test"], &body)
        .await;
    assert_eq!(
        (reply.code, reply.status()),
        (552, "5.3.4"),
        "actual size: {reply}"
    );
    // The session is still usable after the oversized message was read to its end.
    let reply = client
        .send_mail("a@b.test", &["c@example.test"], "Subject: small\n\nok\n")
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(gw.delivered().len(), 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn overlong_command_line_is_refused() {
    let gw = Gateway::start(trusted_local()).await;
    let (mut client, _) = gw.ehlo().await;
    let line = format!("MAIL FROM:<{}@b.test>", "a".repeat(5000));
    let reply = client.cmd(&line).await;
    assert_eq!((reply.code, reply.status()), (500, "5.5.2"), "{reply}");

    // The tail of a line that reaches the limit exactly in the middle of a read is part
    // of the refused line, never a command of its own (here HELP, then RSET inside a
    // transaction), however the line is cut into reads.
    for piece in [1024, 4096, 333] {
        assert_eq!(client.cmd("MAIL FROM:<a@b.test>").await.code, 250);
        assert_eq!(client.cmd("RCPT TO:<bob@example.test>").await.code, 250);
        for tail in ["HELP", "RSET"] {
            let line = format!("NOOP {}{tail}\r\n", "x".repeat(4091));
            for chunk in line.as_bytes().chunks(piece) {
                client.send(chunk).await;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let reply = client.read_reply().await;
            assert_eq!((reply.code, reply.status()), (500, "5.5.2"), "{reply}");
        }
        let noop = client.cmd("NOOP").await;
        assert_eq!(
            noop.code, 250,
            "piece {piece}: only one reply per line: {noop}"
        );
        let data = client.cmd("DATA").await;
        assert_eq!(
            data.code, 354,
            "piece {piece}: the transaction survived: {data}"
        );
        client.send(b"Subject: t\r\n\r\nx\r\n.\r\n").await;
        assert_eq!(client.read_reply().await.code, 250);
    }
    gw.stop().await;
}

/// smtp-proto drops the quotes of a quoted domain: `a@"x.test> RET=FULL"` must not reach
/// the backend as `MAIL FROM:<a@x.test> RET=FULL>`.
#[tokio::test(flavor = "multi_thread")]
async fn quoted_domains_cannot_carry_parameters() {
    let gw = Gateway::start(trusted_local()).await;
    let (mut client, _) = gw.ehlo().await;
    for sender in [
        "MAIL FROM:<a@\"x.test> RET=FULL NOTIFY=NEVER\">",
        "MAIL FROM:<a@\"x.test>\">",
        "MAIL FROM:<a@\"x test\">",
    ] {
        let reply = client.cmd(sender).await;
        assert_eq!(
            (reply.code, reply.status()),
            (553, "5.1.7"),
            "{sender}: {reply}"
        );
    }
    assert_eq!(client.cmd("MAIL FROM:<a@b.test>").await.code, 250);
    for rcpt in [
        "RCPT TO:<bob@\"example.test> NOTIFY=NEVER\">",
        "RCPT TO:<bob@\"example.test x\">",
    ] {
        let reply = client.cmd(rcpt).await;
        assert_eq!(
            (reply.code, reply.status()),
            (553, "5.1.3"),
            "{rcpt}: {reply}"
        );
    }
    gw.stop().await;
}

/// A null forward-path is never valid (RFC 5321 4.1.1.3); `<postmaster>` is (4.5.1).
/// smtp-proto reports both as an empty address.
#[tokio::test(flavor = "multi_thread")]
async fn null_recipient_is_refused_postmaster_is_not() {
    let gw = Gateway::start(trusted_local()).await;
    let (mut client, _) = gw.ehlo().await;
    assert_eq!(
        client.cmd("RCPT TO:<>").await.code,
        503,
        "sequence first, outside a transaction"
    );
    assert_eq!(client.cmd("MAIL FROM:<a@b.test>").await.code, 250);
    for null in [
        "RCPT TO:<>",
        "RCPT TO:< >",
        "rcpt to:<>",
        "RCPT TO:<@postmaster.test:>",
    ] {
        let reply = client.cmd(null).await;
        assert_eq!(
            (reply.code, reply.status()),
            (553, "5.1.3"),
            "{null}: {reply}"
        );
    }
    for postmaster in [
        "RCPT TO:<postmaster>",
        "RCPT TO:<PostMaster>",
        "RCPT TO:<\"post\\master\">",
    ] {
        let reply = client.cmd(postmaster).await;
        assert_eq!(reply.code, 250, "{postmaster}: {reply}");
    }
    // Split across reads, the line is still judged whole.
    client.send(b"RCPT TO:<").await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    client.send(b">\r\n").await;
    assert_eq!(client.read_reply().await.code, 553);
    client.send(b"RCPT TO:<post").await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    client.send(b"master>\r\n").await;
    assert_eq!(client.read_reply().await.code, 250);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn too_many_errors_close_the_session() {
    let gw = Gateway::start(TestConfig {
        server_extra: "  max_errors: 3\n".into(),
        ..trusted_local()
    })
    .await;
    let (mut client, _) = gw.ehlo().await;
    assert_eq!(client.cmd("BOGUS1").await.code, 500);
    assert_eq!(client.cmd("BOGUS2").await.code, 500);
    client.send(b"BOGUS3\r\n").await;
    let reply = client.read_reply().await;
    assert_eq!(reply.code, 500);
    let reply = client.read_reply().await;
    assert_eq!((reply.code, reply.status()), (421, "4.7.0"), "{reply}");
    assert!(client.is_closed().await);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unoffered_parameters_are_refused() {
    let gw = Gateway::start(trusted_local()).await;
    let (mut client, _) = gw.ehlo().await;
    for line in [
        "MAIL FROM:<a@b.test> RET=FULL",
        "MAIL FROM:<a@b.test> BODY=BINARYMIME",
        "MAIL FROM:<a@b.test> ENVID=x",
    ] {
        let reply = client.cmd(line).await;
        assert_eq!(
            (reply.code, reply.status()),
            (555, "5.5.4"),
            "{line}: {reply}"
        );
    }
    assert_eq!(
        client
            .cmd("MAIL FROM:<a@b.test> BODY=8BITMIME SMTPUTF8")
            .await
            .code,
        250
    );
    let reply = client.cmd("RCPT TO:<c@example.test> NOTIFY=NEVER").await;
    assert_eq!((reply.code, reply.status()), (555, "5.5.4"), "{reply}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn non_ascii_address_needs_smtputf8() {
    let gw = Gateway::start(trusted_local()).await;
    let (mut client, _) = gw.ehlo().await;
    let reply = client.cmd("MAIL FROM:<jörg@sender.test>").await;
    assert_eq!((reply.code, reply.status()), (553, "5.6.7"), "{reply}");
    assert_eq!(
        client
            .cmd("MAIL FROM:<jörg@sender.test> SMTPUTF8")
            .await
            .code,
        250
    );
    assert_eq!(client.cmd("RCPT TO:<björn@example.test>").await.code, 250);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_transaction_in_one_write() {
    let gw = Gateway::start(trusted_local()).await;
    let (mut client, _) = SmtpClient::connect(gw.smtp).await;
    client
        .send(
            b"EHLO pipe.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nRCPT TO:<nobody@else.test>\r\nRCPT TO:<y@example.test>\r\nDATA\r\n",
        )
        .await;
    let codes: Vec<u16> = {
        let mut codes = Vec::new();
        for _ in 0..6 {
            codes.push(client.read_reply().await.code);
        }
        codes
    };
    assert_eq!(codes, vec![250, 250, 250, 550, 250, 354]);
    client
        .send(b"Subject: p\r\n\r\npipelined\r\n.\r\nQUIT\r\n")
        .await;
    assert_eq!(client.read_reply().await.code, 250);
    assert_eq!(client.read_reply().await.code, 221);
    let delivered = gw.delivered();
    assert_eq!(delivered.len(), 1);
    assert!(delivered[0].contains("Delivered-To: x@example.test\nDelivered-To: y@example.test\n"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bdat_chunks() {
    let gw = Gateway::start(trusted_local()).await;
    let (mut client, _) = gw.ehlo().await;
    assert_eq!(client.cmd("MAIL FROM:<a@b.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<c@example.test>").await.code, 250);
    let part1 = b"Subject: chunks\r\n\r\nfirst ";
    let part2 = b"second\r\n.not stuffed in BDAT\r\n";
    client
        .send(format!("BDAT {}\r\n", part1.len()).as_bytes())
        .await;
    client.send(part1).await;
    let reply = client.read_reply().await;
    assert_eq!(reply.code, 250, "{reply}");
    client
        .send(format!("BDAT {} LAST\r\n", part2.len()).as_bytes())
        .await;
    client.send(part2).await;
    let reply = client.read_reply().await;
    assert_eq!(reply.code, 250, "{reply}");
    let delivered = gw.delivered();
    assert!(
        delivered[0].ends_with("Subject: chunks\n\nfirst second\n.not stuffed in BDAT\n"),
        "{}",
        delivered[0]
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bdat_outside_a_transaction_is_read_and_refused() {
    let gw = Gateway::start(trusted_local()).await;
    let (mut client, _) = gw.ehlo().await;
    // The 12 octets must be consumed as data, not parsed as commands.
    client
        .send(b"BDAT 12 LAST\r\nQUIT\r\nQUIT\r\nNOOP\r\n")
        .await;
    let reply = client.read_reply().await;
    assert_eq!((reply.code, reply.status()), (503, "5.5.1"), "{reply}");
    let reply = client.read_reply().await;
    assert_eq!(reply.code, 250, "NOOP after the chunk: {reply}");
    let reply = client.cmd("BDAT 0 LAST").await;
    assert_eq!(reply.code, 503, "{reply}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rset_and_new_ehlo_abort_the_transaction() {
    let gw = Gateway::start(trusted_local()).await;
    let (mut client, _) = gw.ehlo().await;
    assert_eq!(client.cmd("MAIL FROM:<a@b.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<c@example.test>").await.code, 250);
    assert_eq!(client.cmd("RSET").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<c@example.test>").await.code, 503);
    assert_eq!(client.cmd("MAIL FROM:<a@b.test>").await.code, 250);
    assert_eq!(client.cmd("EHLO again.test").await.code, 250);
    assert_eq!(client.cmd("DATA").await.code, 503);
    assert!(gw.delivered().is_empty());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mxgate_check_reports_positions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "server:\n  hostname: mx.test\n  listen: [\"127.0.0.1:0\"]\n  domains: []\n  trusted_networks: [\"10.0.0.0/33\"]\nbackend: []\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mxgate"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let first = stderr.lines().next().unwrap();
    let expected = format!(
        "{}:5:22: server.trusted_networks[0]: `10.0.0.0/33` is not an IP address or network",
        path.display()
    );
    assert!(first.starts_with(&expected), "{stderr}");
    std::fs::write(
        &path,
        "server:\n  hostname: mx.test\n  listen: [\"127.0.0.1:0\"]\n  domains: []\nbackend: []\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mxgate"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 2, "both errors at once: {stderr}");
    assert!(
        stderr.contains(":4:12: server.domains needs at least one"),
        "{stderr}"
    );
    assert!(
        stderr.contains(":5:10: backend needs at least one"),
        "{stderr}"
    );
}

/// RFC 5321 4.5.3.2 deadlines, configured short: a client that goes quiet between
/// commands, or in the middle of its data, gets `421 4.4.2` and the connection closes;
/// a half-sent message is not delivered.
#[tokio::test(flavor = "multi_thread")]
async fn silent_clients_time_out() {
    let gw = Gateway::start(TestConfig {
        server_extra:
            "  timeouts:\n    command: 300ms\n    data_block: 300ms\n    shutdown_grace: 1s\n"
                .into(),
        ..trusted_local()
    })
    .await;
    let (mut client, _) = gw.ehlo().await;
    let started = std::time::Instant::now();
    let reply = client.read_reply().await;
    assert_eq!((reply.code, reply.status()), (421, "4.4.2"), "{reply}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(250));
    assert!(client.is_closed().await);

    let (mut client, _) = gw.ehlo().await;
    assert_eq!(client.cmd("MAIL FROM:<a@b.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<bob@example.test>").await.code, 250);
    assert_eq!(client.cmd("DATA").await.code, 354);
    client.send(b"Subject: half\r\n\r\nthe first half of").await;
    let reply = client.read_reply().await;
    assert_eq!((reply.code, reply.status()), (421, "4.4.2"), "{reply}");
    assert!(client.is_closed().await);
    assert!(gw.delivered().is_empty());
    gw.stop().await;
}

/// A message over `spool_threshold` goes through a temporary file instead of memory and
/// arrives byte for byte.
#[tokio::test(flavor = "multi_thread")]
async fn large_messages_are_spooled_and_arrive_intact() {
    let gw = Gateway::start(TestConfig {
        server_extra: "  spool_threshold: 4096\n".into(),
        ..trusted_local()
    })
    .await;
    let (mut client, _) = gw.ehlo().await;
    let body: String = (0..5000)
        .map(|n| format!("line {n:05} of a large message, with some text to fill it\n"))
        .collect();
    let reply = client
        .send_mail(
            "a@b.test",
            &["bob@example.test"],
            &format!("Subject: large\n\n{body}"),
        )
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    let delivered = &gw.delivered()[0];
    assert!(body.len() > 250_000);
    assert!(delivered.ends_with(&format!("\n\n{body}")), "body changed");
    gw.stop().await;
}
