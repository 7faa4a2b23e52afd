//! Per-client budgets (`limits:`) over real sockets: junk commands, connections per
//! IPv6 prefix, the minimum data rate, and the connection, message and recipient rates.
//! IPv6 clients come from TEST-NET addresses (2001:db8::/32) put on `lo`.

use mxgate_test_kit as support;

use std::time::{Duration, Instant};
use support::client::SmtpClient;
use support::gateway::{Gateway, TestConfig};

fn trusted_local() -> TestConfig {
    TestConfig {
        trusted: vec!["127.0.0.0/8".into()],
        ..Default::default()
    }
}

/// The value of one metric sample in this process's registry.
fn metric(name_and_labels: &str) -> f64 {
    support::prom::value(&mxgate::metrics::render(), name_and_labels).unwrap_or(0.0)
}

/// Issue 11, case 7: 1,000 NOOPs in a row were all answered. With the defaults
/// (`max_junk_commands` 100, `max_errors` 20) the 120th is the last one answered, then
/// `421 4.7.0` and the connection closes.
#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_noops_end_the_session() {
    let gw = Gateway::start(trusted_local()).await;
    let before = metric("mxgate_limit_exceeded_total{limit=\"max_junk_commands\"}");
    let (mut client, _) = gw.ehlo().await;
    let mut answered = 0;
    let mut last = None;
    for _ in 0..1000 {
        let reply = client.cmd("NOOP").await;
        assert_eq!(reply.code, 250, "NOOP {}: {reply}", answered + 1);
        answered += 1;
        // The closing reply comes in the same write as the last 250.
        if !client.pending().is_empty() {
            last = Some(client.read_reply().await);
            break;
        }
    }
    let last = last.expect("1,000 NOOPs were all answered and the session goes on");
    assert_eq!((last.code, last.status()), (421, "4.7.0"), "{last}");
    assert_eq!(answered, 120);
    assert!(client.is_closed().await);
    let after = metric("mxgate_limit_exceeded_total{limit=\"max_junk_commands\"}");
    assert!(after >= before + 20.0, "{before} -> {after}");
    gw.stop().await;
}

/// VRFY, HELP and RSET with no transaction count like NOOP; an RSET that ends a
/// transaction does not, and an accepted message starts the count over.
#[tokio::test(flavor = "multi_thread")]
async fn junk_commands_count_until_a_message_is_accepted() {
    let gw = Gateway::start(TestConfig {
        server_extra: "  max_errors: 2\n".into(),
        extra: "limits:\n  max_junk_commands: 4\n".into(),
        ..trusted_local()
    })
    .await;
    let (mut client, _) = gw.ehlo().await;
    for command in ["NOOP", "VRFY bob", "HELP", "RSET"] {
        assert!(client.cmd(command).await.code < 400, "{command}");
    }
    // Ending a transaction is not junk.
    for _ in 0..3 {
        assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
        assert_eq!(client.cmd("RSET").await.code, 250);
    }
    assert!(client.pending().is_empty());
    let reply = client
        .send_mail("a@sender.test", &["bob@example.test"], "Subject: x\n\nhi\n")
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    // Four more after the delivery are within the limit again; the sixth is the second
    // error and ends the session.
    for n in 1..=5 {
        assert_eq!(client.cmd("NOOP").await.code, 250, "NOOP {n}");
        assert!(client.pending().is_empty(), "closed after NOOP {n}");
    }
    assert_eq!(client.cmd("NOOP").await.code, 250);
    let reply = client.read_reply().await;
    assert_eq!((reply.code, reply.status()), (421, "4.7.0"), "{reply}");
    assert!(client.is_closed().await);
    gw.stop().await;
}

/// EHLO/HELO again with no transaction open does nothing for mail, yet each new name
/// costs a HELO SPF check (DNS look-ups to names the client picks): it counts as junk,
/// so an endless stream of them ends the session like NOOPs do.
#[tokio::test(flavor = "multi_thread")]
async fn repeated_ehlo_counts_as_junk() {
    let gw = Gateway::start(TestConfig {
        server_extra: "  max_errors: 2\n".into(),
        extra: "limits:\n  max_junk_commands: 4\n".into(),
        ..trusted_local()
    })
    .await;
    let (mut client, _) = gw.ehlo().await;
    for n in 1..=5 {
        let reply = client.cmd(&format!("EHLO n{n}.client.test")).await;
        assert_eq!(reply.code, 250, "EHLO {n}: {reply}");
        assert!(client.pending().is_empty(), "closed after EHLO {n}");
    }
    assert_eq!(client.cmd("HELO n6.client.test").await.code, 250);
    let reply = client.read_reply().await;
    assert_eq!((reply.code, reply.status()), (421, "4.7.0"), "{reply}");
    assert!(client.is_closed().await);
    gw.stop().await;
}

/// Issue 11, case 8: 30 connections from 30 addresses of one /64 were all greeted.
/// `max_connections_per_ip` (20) now counts the /64; another /64 is not affected, and
/// trusted networks are counted too (the count bounds what one client can hold).
#[tokio::test(flavor = "multi_thread")]
async fn ipv6_clients_are_counted_by_prefix() {
    let sources: Vec<String> = (1..=30).map(|n| format!("2001:db8:11:8::{n:x}")).collect();
    let other = "2001:db8:11:9::1";
    for source in sources.iter().map(String::as_str).chain([other]) {
        if !support::net::source_address(source) {
            return support::skip(format!("cannot use {source} as a source address"));
        }
    }
    let config = TestConfig {
        trusted: vec!["2001:db8:11::/48".into()],
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let yaml = config
        .yaml(dir.path())
        .replace("listen: [\"127.0.0.1:0\"]", "listen: [\"[::1]:0\"]");
    let gw = Gateway::start_yaml(dir, &yaml).await;
    let refused_before = metric("mxgate_limit_exceeded_total{limit=\"max_connections_per_ip\"}");

    let mut open = Vec::new();
    let mut refused = 0;
    for source in &sources {
        let (client, greeting) = SmtpClient::connect_from(gw.smtp, source).await;
        match greeting.code {
            220 => open.push(client),
            421 => {
                assert_eq!(greeting.status(), "4.7.0", "{greeting}");
                refused += 1;
            }
            _ => panic!("from {source}: {greeting}"),
        }
    }
    assert_eq!((open.len(), refused), (20, 10));
    let (_other, greeting) = SmtpClient::connect_from(gw.smtp, other).await;
    assert_eq!(greeting.code, 220, "another /64: {greeting}");
    let refused_after = metric("mxgate_limit_exceeded_total{limit=\"max_connections_per_ip\"}");
    assert!(refused_after >= refused_before + 10.0);

    // A closed connection gives its slot back.
    let mut first = open.remove(0);
    assert_eq!(first.cmd("QUIT").await.code, 221);
    assert!(first.is_closed().await);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_client, greeting) = SmtpClient::connect_from(gw.smtp, &sources[29]).await;
        if greeting.code == 220 {
            break;
        }
        assert!(Instant::now() < deadline, "slot not given back: {greeting}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.stop().await;
}

/// With `ipv6_prefix_length: 128` every address counts on its own.
#[tokio::test(flavor = "multi_thread")]
async fn ipv6_prefix_length_is_configurable() {
    let sources = ["2001:db8:11:a::1", "2001:db8:11:a::2", "2001:db8:11:a::3"];
    for source in sources {
        if !support::net::source_address(source) {
            return support::skip(format!("cannot use {source} as a source address"));
        }
    }
    let run = |length: u8| async move {
        let config = TestConfig {
            trusted: vec!["2001:db8:11::/48".into()],
            server_extra: "  max_connections_per_ip: 1\n".into(),
            extra: format!("limits:\n  ipv6_prefix_length: {length}\n"),
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let yaml = config
            .yaml(dir.path())
            .replace("listen: [\"127.0.0.1:0\"]", "listen: [\"[::1]:0\"]");
        let gw = Gateway::start_yaml(dir, &yaml).await;
        let mut codes = Vec::new();
        let mut open = Vec::new();
        for source in sources {
            let (client, greeting) = SmtpClient::connect_from(gw.smtp, source).await;
            codes.push(greeting.code);
            open.push(client);
        }
        gw.stop().await;
        codes
    };
    assert_eq!(run(64).await, [220, 421, 421]);
    assert_eq!(run(128).await, [220, 220, 220]);
}

/// On a dual-stack listener IPv4 clients arrive as IPv4-mapped IPv6 (`::ffff:a.b.c.d`):
/// they are counted per IPv4 address, not lumped together in one IPv6 prefix.
#[tokio::test(flavor = "multi_thread")]
async fn ipv4_mapped_clients_count_per_address() {
    let config = TestConfig {
        server_extra: "  max_connections_per_ip: 1\n".into(),
        ..trusted_local()
    };
    let dir = tempfile::tempdir().unwrap();
    let yaml = config
        .yaml(dir.path())
        .replace("listen: [\"127.0.0.1:0\"]", "listen: [\"[::]:0\"]");
    let gw = Gateway::start_yaml(dir, &yaml).await;
    let port = gw.smtp.port();
    let v4: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (_first, greeting) = SmtpClient::connect_from(v4, "127.0.0.5").await;
    assert_eq!(greeting.code, 220, "{greeting}");
    let (_second, greeting) = SmtpClient::connect_from(v4, "127.0.0.5").await;
    assert_eq!(
        (greeting.code, greeting.status()),
        (421, "4.7.0"),
        "{greeting}"
    );
    let (_other, greeting) = SmtpClient::connect_from(v4, "127.0.0.6").await;
    assert_eq!(greeting.code, 220, "another IPv4 address: {greeting}");
    gw.stop().await;
}

/// Sends one byte of message content every `gap` until the gateway answers; returns the
/// answer and how long it took.
async fn trickle(client: &mut SmtpClient, gap: Duration) -> (support::client::Reply, Duration) {
    let started = Instant::now();
    for _ in 0..200 {
        client.send(b"x").await;
        if let Ok(reply) = tokio::time::timeout(gap, client.read_reply()).await {
            return (reply, started.elapsed());
        }
    }
    panic!("a client sending a byte every {gap:?} was never cut off");
}

/// Issue 11, case 9: a session that sends one byte of DATA every few seconds kept its
/// transaction as long as it liked (each byte resets the read timeout). Below
/// `min_data_rate` after the first `timeouts.data_block` it gets `421 4.4.2` and is
/// closed; nothing is delivered. Same for BDAT.
#[tokio::test(flavor = "multi_thread")]
async fn slow_data_is_closed() {
    let gw = Gateway::start(TestConfig {
        server_extra: "  timeouts:\n    data_block: 1s\n    shutdown_grace: 1s\n".into(),
        ..trusted_local()
    })
    .await;
    let before = metric("mxgate_limit_exceeded_total{limit=\"min_data_rate\"}");
    let (mut client, _) = gw.ehlo().await;
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<bob@example.test>").await.code, 250);
    assert_eq!(client.cmd("DATA").await.code, 354);
    client.send(b"Subject: slow\r\n\r\n").await;
    // A byte every 200 ms: far inside the 1 s read timeout, far below 500 bytes/s.
    let (reply, took) = trickle(&mut client, Duration::from_millis(200)).await;
    assert_eq!((reply.code, reply.status()), (421, "4.4.2"), "{reply}");
    assert!(reply.text().contains("rate"), "{reply}");
    assert!(
        took >= Duration::from_millis(700),
        "cut before the grace: {took:?}"
    );
    assert!(client.is_closed().await);

    let (mut client, _) = gw.ehlo().await;
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<bob@example.test>").await.code, 250);
    client.send(b"BDAT 100000 LAST\r\n").await;
    let (reply, _) = trickle(&mut client, Duration::from_millis(200)).await;
    assert_eq!((reply.code, reply.status()), (421, "4.4.2"), "{reply}");
    assert!(client.is_closed().await);

    assert!(gw.delivered().is_empty());
    let after = metric("mxgate_limit_exceeded_total{limit=\"min_data_rate\"}");
    assert!(after >= before + 2.0, "{before} -> {after}");
    gw.stop().await;
}

/// A message that takes longer than `data_block` but keeps above the rate arrives.
#[tokio::test(flavor = "multi_thread")]
async fn steady_data_past_the_grace_is_delivered() {
    let gw = Gateway::start(TestConfig {
        server_extra: "  timeouts:\n    data_block: 500ms\n    shutdown_grace: 1s\n".into(),
        extra: "limits:\n  min_data_rate: 1000\n".into(),
        ..trusted_local()
    })
    .await;
    let (mut client, _) = gw.ehlo().await;
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<bob@example.test>").await.code, 250);
    assert_eq!(client.cmd("DATA").await.code, 354);
    client.send(b"Subject: steady\r\n\r\n").await;
    // About 20,000 bytes per second for 1.5 s: twenty times the minimum, so a loaded
    // machine that oversleeps does not fail the test.
    let line = format!("{}\r\n", "y".repeat(998)).repeat(2);
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        client.send(line.as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client.send(b".\r\n").await;
    let reply = client.read_reply().await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(gw.delivered().len(), 1);
    gw.stop().await;
}

/// Small configured rates: the connection over `connections_per_minute` gets
/// `421 4.7.0` at connect, the MAIL over `messages_per_minute` and the RCPT over
/// `recipients_per_minute` get `450 4.7.1`. Each client (address) has its own count,
/// and trusted networks are exempt.
#[tokio::test(flavor = "multi_thread")]
async fn rates_per_client() {
    let gw = Gateway::start(TestConfig {
        trusted: vec!["127.0.0.2".into()],
        extra: "auth:\n  enabled: false\nlimits:\n  connections_per_minute: 3\n  messages_per_minute: 2\n  recipients_per_minute: 3\n".into(),
        ..Default::default()
    })
    .await;
    let exceeded =
        |limit: &str| metric(&format!("mxgate_limit_exceeded_total{{limit=\"{limit}\"}}"));
    let before = [
        exceeded("connections_per_minute"),
        exceeded("messages_per_minute"),
        exceeded("recipients_per_minute"),
    ];

    // Connections.
    let mut open = Vec::new();
    for n in 1..=3 {
        let (client, greeting) = SmtpClient::connect_from(gw.smtp, "127.0.0.3").await;
        assert_eq!(greeting.code, 220, "connection {n}: {greeting}");
        open.push(client);
    }
    let (mut fourth, greeting) = SmtpClient::connect_from(gw.smtp, "127.0.0.3").await;
    assert_eq!(
        (greeting.code, greeting.status()),
        (421, "4.7.0"),
        "{greeting}"
    );
    assert!(fourth.is_closed().await);
    let (_, greeting) = SmtpClient::connect_from(gw.smtp, "127.0.0.4").await;
    assert_eq!(greeting.code, 220, "another client: {greeting}");
    for n in 1..=5 {
        let (_, greeting) = SmtpClient::connect_from(gw.smtp, "127.0.0.2").await;
        assert_eq!(greeting.code, 220, "trusted connection {n}: {greeting}");
    }

    // Recipients, then messages, on a connection taken before the limit.
    let mut client = open.remove(0);
    assert_eq!(client.cmd("EHLO client.example.net").await.code, 250);
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    for n in 1..=3 {
        let reply = client.cmd(&format!("RCPT TO:<u{n}@example.test>")).await;
        assert_eq!(reply.code, 250, "RCPT {n}: {reply}");
    }
    let reply = client.cmd("RCPT TO:<u4@example.test>").await;
    assert_eq!((reply.code, reply.status()), (450, "4.7.1"), "{reply}");
    // The recipients accepted so far get the message.
    assert_eq!(client.cmd("DATA").await.code, 354);
    client.send(b"Subject: rates\r\n\r\nhi\r\n.\r\n").await;
    assert_eq!(client.read_reply().await.code, 250);
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(client.cmd("RSET").await.code, 250);
    let reply = client.cmd("MAIL FROM:<a@sender.test>").await;
    assert_eq!((reply.code, reply.status()), (450, "4.7.1"), "{reply}");
    // Trusted clients are not counted.
    let (mut trusted, _) = SmtpClient::connect_from(gw.smtp, "127.0.0.2").await;
    assert_eq!(trusted.cmd("EHLO relay.example.test").await.code, 250);
    for _ in 0..4 {
        assert_eq!(trusted.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
        assert_eq!(trusted.cmd("RSET").await.code, 250);
    }

    assert!(exceeded("connections_per_minute") >= before[0] + 1.0);
    assert!(exceeded("messages_per_minute") >= before[1] + 1.0);
    assert!(exceeded("recipients_per_minute") >= before[2] + 1.0);
    gw.stop().await;
}

/// A client that keeps sending MAIL after `450 4.7.1` runs into `max_errors`.
#[tokio::test(flavor = "multi_thread")]
async fn refused_mail_counts_as_an_error() {
    let gw = Gateway::start(TestConfig {
        server_extra: "  max_errors: 3\n".into(),
        extra: "auth:\n  enabled: false\nlimits:\n  messages_per_minute: 1\n".into(),
        ..Default::default()
    })
    .await;
    let (mut client, _) = gw.ehlo().await;
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(client.cmd("RSET").await.code, 250);
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 450);
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 450);
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 450);
    let reply = client.read_reply().await;
    assert_eq!((reply.code, reply.status()), (421, "4.7.0"), "{reply}");
    assert!(client.is_closed().await);
    gw.stop().await;
}

/// A RCPT refused for a limit (`452 4.5.3` past `server.max_recipients`, `450 4.7.1`
/// past `limits.recipients_per_minute`) is not an error, yet it does nothing: each one
/// counts as junk, so a client that keeps sending them is disconnected like one that
/// keeps sending NOOP. Before, they never counted, and an endless pipelined stream of
/// them was answered at wire speed, each one a rate-store call.
#[tokio::test(flavor = "multi_thread")]
async fn recipients_refused_for_a_limit_count_as_junk() {
    for (limit, server_extra, limits_extra, refused) in [
        (
            "max_recipients",
            "  max_recipients: 1\n",
            "",
            (452, "4.5.3"),
        ),
        (
            "recipients_per_minute",
            "",
            "  recipients_per_minute: 1\n",
            (450, "4.7.1"),
        ),
    ] {
        let gw = Gateway::start(TestConfig {
            server_extra: format!("  max_errors: 2\n{server_extra}"),
            extra: format!(
                "auth:\n  enabled: false\nlimits:\n  max_junk_commands: 4\n{limits_extra}"
            ),
            ..Default::default()
        })
        .await;
        let (mut client, _) = gw.ehlo().await;
        assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
        assert_eq!(client.cmd("RCPT TO:<u0@example.test>").await.code, 250);
        // Four are junk within the limit, the fifth is the first error, the sixth the
        // second: it is answered, then `421` closes the session.
        for n in 1..=6 {
            let reply = client.cmd(&format!("RCPT TO:<u{n}@example.test>")).await;
            assert_eq!(
                (reply.code, reply.status()),
                refused,
                "{limit}: RCPT {n}: {reply}"
            );
            if n < 6 {
                assert!(
                    client.pending().is_empty(),
                    "{limit}: closed after RCPT {n}"
                );
            }
        }
        let reply = client.read_reply().await;
        assert_eq!(
            (reply.code, reply.status()),
            (421, "4.7.0"),
            "{limit}: {reply}"
        );
        assert!(client.is_closed().await, "{limit}");
        gw.stop().await;
    }
}

/// Each refusal is logged with the client's address and the limit's name, once per
/// client and window for the refusals a flood repeats.
#[tokio::test(flavor = "multi_thread")]
async fn refusals_are_logged_with_the_client_and_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let config = TestConfig {
        server_extra: "  max_errors: 50\n".into(),
        extra:
            "auth:\n  enabled: false\nlimits:\n  messages_per_minute: 1\n  max_junk_commands: 1\n"
                .into(),
        ..Default::default()
    };
    let config_path = dir.path().join("mxgate.yaml");
    std::fs::write(&config_path, config.yaml(dir.path())).unwrap();
    let gateway = support::gateway::GatewayProcess::spawn(&config_path);
    let (mut client, _) = SmtpClient::connect_from(gateway.smtp, "127.0.0.7").await;
    assert_eq!(client.cmd("EHLO client.example.net").await.code, 250);
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(client.cmd("RSET").await.code, 250);
    for _ in 0..3 {
        assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 450);
    }
    for _ in 0..3 {
        assert_eq!(client.cmd("NOOP").await.code, 250);
    }
    assert_eq!(client.cmd("QUIT").await.code, 221);

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = gateway.log();
        let rate_lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("limit=\"messages_per_minute\""))
            .collect();
        let junk_logged = log.contains("limit=\"max_junk_commands\"");
        if junk_logged && !rate_lines.is_empty() {
            assert_eq!(
                rate_lines.len(),
                1,
                "one line per client and window:\n{log}"
            );
            assert!(rate_lines[0].contains("127.0.0.7"), "{}", rate_lines[0]);
            let junk: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("limit=\"max_junk_commands\""))
                .collect();
            assert_eq!(junk.len(), 1, "one line per connection:\n{log}");
            assert!(junk[0].contains("127.0.0.7"), "{}", junk[0]);
            break;
        }
        assert!(Instant::now() < deadline, "refusals not logged:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `server.listen_backlog` reaches the kernel. std's listeners queue 128 connections:
/// in the peer benchmark a burst of 1,000 overflowed that while the workers were busy
/// signing, and the clients whose completed handshake the kernel dropped waited for a
/// greeting that never came.
#[tokio::test(flavor = "multi_thread")]
async fn the_listen_backlog_reaches_the_kernel() {
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .expect("Linux's somaxconn")
        .trim()
        .parse()
        .unwrap();
    for (server_extra, backlog) in [("", 1024), ("  listen_backlog: 700\n", 700)] {
        let gw = Gateway::start(TestConfig {
            server_extra: server_extra.into(),
            ..trusted_local()
        })
        .await;
        let Some(queued) = listen_backlog(gw.smtp) else {
            gw.stop().await;
            return;
        };
        assert_eq!(queued, backlog.min(somaxconn), "{server_extra:?}");
        // And it still serves.
        let (mut client, _) = gw.ehlo().await;
        assert_eq!(client.cmd("QUIT").await.code, 221);
        gw.stop().await;
    }
}

/// The backlog of the listening socket on `addr`, as `ss` reads it (Send-Q of a
/// listener). `None` (a skip) without `ss`.
fn listen_backlog(addr: std::net::SocketAddr) -> Option<u32> {
    let output = match std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{}", addr.port())])
        .output()
    {
        Ok(output) => output,
        Err(err) => {
            support::skip(format!("ss (iproute2) is not installed: {err}"));
            return None;
        }
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find(|line| line.contains(&addr.to_string()))
        .unwrap_or_else(|| panic!("no listener on {addr} in\n{text}"));
    Some(line.split_whitespace().nth(2).unwrap().parse().unwrap())
}
