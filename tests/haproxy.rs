//! End to end behind a real load balancer: HAProxy (Debian's package) in front of two
//! mxgate processes with `send-proxy-v2` and SMTP health checks (PROXY v2 `LOCAL`).
//! The client connects from a TEST-NET address on `lo`; that address, not HAProxy's,
//! is what SPF, `Received` and `Authentication-Results` show. Then a few hundred
//! messages go through while one instance is killed with SIGKILL: clients retry like
//! an MTA, and nothing that was acknowledged is lost.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::backend::{Behaviour, FakeBackend};
use support::client::SmtpClient;
use support::dns::TestDns;
use support::gateway::{GatewayProcess, TestConfig};
use support::haproxy::Haproxy;

/// The sender's server, on `lo`; SPF for sender.test allows it alone.
const CLIENT_IP: &str = "192.0.2.5";
const MESSAGES: usize = 300;
const WORKERS: usize = 8;
/// Acknowledged messages before one instance is killed.
const KILL_AFTER: usize = 100;

fn instance(
    dns: &TestDns,
    backend: &FakeBackend,
    hostname: &str,
) -> (tempfile::TempDir, GatewayProcess) {
    let dir = tempfile::tempdir().unwrap();
    let config = TestConfig {
        hostname: hostname.into(),
        backends: vec![backend.url()],
        tls: false,
        // HAProxy connects from 127.0.0.1; only it may (and must) send PROXY headers.
        server_extra: "  proxy_protocol:\n    trusted_networks: [\"127.0.0.1/32\"]\n".into(),
        extra: format!(
            "relay:\n  tls: off\nmetrics:\n  listen: 127.0.0.1:0\n{}",
            dns.config()
        ),
        ..Default::default()
    };
    let path = dir.path().join("mxgate.yaml");
    std::fs::write(&path, config.yaml(dir.path())).unwrap();
    let process = GatewayProcess::spawn(&path);
    (dir, process)
}

/// One delivery attempt through the balancer; `true` when the message got 250.
async fn attempt(front: SocketAddr, subject: &str) -> bool {
    let Some((mut client, greeting)) = SmtpClient::try_connect_from(front, CLIENT_IP).await else {
        return false;
    };
    if greeting.code != 220 {
        return false;
    }
    for line in [
        "EHLO mail.sender.test",
        "MAIL FROM:<alice@sender.test>",
        "RCPT TO:<bob@example.test>",
        "DATA",
    ] {
        match client.try_cmd(line).await {
            Some(reply) if reply.code < 400 => {}
            _ => return false,
        }
    }
    let body = format!(
        "From: alice@sender.test\r\nTo: bob@example.test\r\nSubject: {subject}\r\n\r\nhello\r\n.\r\n"
    );
    if !client.try_send(body.as_bytes()).await {
        return false;
    }
    let acknowledged = matches!(client.try_read_reply().await, Some(r) if r.code == 250);
    let _ = client.try_cmd("QUIT").await;
    acknowledged
}

/// Like an MTA: retries until the message is acknowledged (bounded).
async fn deliver(front: SocketAddr, subject: &str) -> (bool, u32) {
    for tries in 1..=100 {
        if attempt(front, subject).await {
            return (true, tries);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (false, 100)
}

fn header_line<'a>(message: &'a str, name: &str) -> &'a str {
    let start = message
        .find(&format!("{name}: "))
        .unwrap_or_else(|| panic!("no {name} in\n{message}"));
    let rest = &message[start..];
    let mut end = rest.find('\n').unwrap();
    while rest[end + 1..].starts_with(['\t', ' ']) {
        end += 1 + rest[end + 1..].find('\n').unwrap();
    }
    &rest[..end]
}

/// The text of `/metrics`.
async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("metrics in time")
        .unwrap();
    String::from_utf8_lossy(&raw).into_owned()
}

fn subject(message: &str) -> String {
    message
        .lines()
        .find_map(|l| l.strip_prefix("Subject: "))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn haproxy_send_proxy_v2_two_instances_one_killed() {
    if !support::net::source_address(CLIENT_IP) {
        support::skip(format!("{CLIENT_IP} is not usable as a source address"));
        return;
    }
    let dns = TestDns::start().await;
    dns.txt("sender.test", &format!("v=spf1 ip4:{CLIENT_IP} -all"));
    dns.a("mail.sender.test", CLIENT_IP);
    dns.ptr(CLIENT_IP, "mail.sender.test");
    let backend = FakeBackend::start(Behaviour::default()).await;
    let (_dir1, mut first) = instance(&dns, &backend, "mx1.example.test");
    let (_dir2, second) = instance(&dns, &backend, "mx2.example.test");
    let Some(haproxy) = Haproxy::start(&[first.smtp, second.smtp]) else {
        return;
    };
    let front = haproxy.addr;

    // The first message: the client's address is judged, not HAProxy's.
    let (ok, _) = deliver(front, "first").await;
    assert!(ok, "no delivery through haproxy:\n{}", haproxy.log());
    let messages = backend.messages();
    let message = messages[0].text();
    let received = header_line(&message, "Received");
    assert!(
        received.contains(&format!("(mail.sender.test [{CLIENT_IP}])")),
        "{received}"
    );
    assert!(!received.contains("127.0.0.1"), "{received}");
    let results = header_line(&message, "Authentication-Results");
    assert!(
        results.contains(&format!(
            "spf=pass (domain of sender.test designates {CLIENT_IP} as permitted sender)"
        )),
        "{results}"
    );
    assert!(
        results.contains(&format!(
            "iprev=pass (mail.sender.test) policy.iprev={CLIENT_IP}"
        )),
        "{results}"
    );

    // The load, and SIGKILL to the first instance a third of the way through.
    let next = Arc::new(AtomicUsize::new(0));
    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let attempts = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (next, acknowledged, attempts) = (next.clone(), acknowledged.clone(), attempts.clone());
        workers.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= MESSAGES {
                    return failed;
                }
                let subject = format!("load-{n}");
                let (ok, tries) = deliver(front, &subject).await;
                attempts.fetch_add(tries as usize, Ordering::Relaxed);
                if ok {
                    acknowledged.lock().unwrap().insert(subject);
                } else {
                    failed.push(subject);
                }
            }
        }));
    }
    let victim = first.child.id() as i32;
    let watcher = acknowledged.clone();
    let killer = tokio::spawn(async move {
        loop {
            if watcher.lock().unwrap().len() >= KILL_AFTER {
                unsafe { libc::kill(victim, libc::SIGKILL) };
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let mut failed = Vec::new();
    for worker in workers {
        failed.extend(worker.await.unwrap());
    }
    killer.await.unwrap();
    let elapsed = started.elapsed();
    assert!(
        first.child.try_wait().unwrap().is_some(),
        "the first instance was killed during the load"
    );

    let acknowledged = acknowledged.lock().unwrap().clone();
    let stored = backend.messages();
    let mut copies: HashMap<String, usize> = HashMap::new();
    let mut by_instance: HashMap<String, usize> = HashMap::new();
    for message in &stored {
        let text = message.text();
        let subject = subject(&text);
        if !subject.starts_with("load-") {
            continue;
        }
        *copies.entry(subject).or_default() += 1;
        let received = header_line(&text, "Received");
        assert!(received.contains(&format!("[{CLIENT_IP}]")), "{received}");
        let by = if received.contains("by mx1.example.test") {
            "mx1"
        } else {
            "mx2"
        };
        *by_instance.entry(by.into()).or_default() += 1;
    }
    let stored_total: usize = copies.values().sum();
    let duplicates = stored_total - copies.len();
    eprintln!(
        "haproxy e2e: messages {MESSAGES}, acknowledged {}, stored {stored_total} ({} distinct), \
         duplicates {duplicates}, attempts {}, by instance {by_instance:?}, {:.1}s",
        acknowledged.len(),
        copies.len(),
        attempts.load(Ordering::Relaxed),
        elapsed.as_secs_f64()
    );
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|s| !copies.contains_key(*s))
        .collect();
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    assert!(
        failed.is_empty(),
        "never acknowledged despite retries: {failed:?}\n{}",
        haproxy.log()
    );
    assert_eq!(acknowledged.len(), MESSAGES);
    assert!(
        by_instance.get("mx1").copied().unwrap_or(0) > 0
            && by_instance.get("mx2").copied().unwrap_or(0) > 0,
        "both instances took mail before the kill: {by_instance:?}"
    );
    // HAProxy's SMTP health checks reached the surviving instance as v2 LOCAL
    // headers, and every client connection as a proxied one.
    let metrics = scrape(second.metrics.expect("metrics listener")).await;
    for result in ["local", "proxied"] {
        let line = format!("mxgate_proxy_protocol_headers_total{{result=\"{result}\"}} ");
        let count: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {line} in\n{metrics}"));
        assert!(count > 0.0, "{line}{count}");
    }
    drop(haproxy);
    drop(first);
    drop(second);
}
