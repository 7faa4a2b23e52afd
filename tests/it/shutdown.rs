//! The gateway as a real process: SIGTERM drains, and `kill -9` at any moment never
//! loses a message the client was told was delivered.

use mxgate_test_kit as support;

use std::collections::HashSet;
use std::time::Duration;
use support::backend::{Behaviour, FakeBackend};
use support::client::SmtpClient;
use support::gateway::{GatewayProcess, TestConfig};

fn spawn(backend: &FakeBackend, grace: &str) -> (tempfile::TempDir, GatewayProcess) {
    let dir = tempfile::tempdir().unwrap();
    let config = TestConfig {
        trusted: vec!["127.0.0.0/8".into()],
        backends: vec![backend.url()],
        server_extra: format!("  timeouts:\n    shutdown_grace: {grace}\n"),
        extra: "relay:\n  tls: off\n".into(),
        ..Default::default()
    };
    let path = dir.path().join("mxgate.yaml");
    std::fs::write(&path, config.yaml(dir.path())).unwrap();
    let process = GatewayProcess::spawn(&path);
    (dir, process)
}

async fn start_transaction(addr: std::net::SocketAddr, subject: &str) -> SmtpClient {
    let (mut client, greeting) = SmtpClient::connect(addr).await;
    assert_eq!(greeting.code, 220);
    assert_eq!(client.cmd("EHLO c.test").await.code, 250);
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<b@example.test>").await.code, 250);
    assert_eq!(client.cmd("DATA").await.code, 354);
    client
        .send(format!("Subject: {subject}\r\n\r\nbody\r\n.\r\n").as_bytes())
        .await;
    client
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_transactions_and_closes_idle_sessions() {
    let backend = FakeBackend::start(Behaviour {
        data_delay: Some(Duration::from_millis(1500)),
        ..Default::default()
    })
    .await;
    let (_dir, mut gateway) = spawn(&backend, "20s");
    let addr = gateway.smtp;

    let (mut idle, _) = SmtpClient::connect(addr).await;
    assert_eq!(idle.cmd("EHLO idle.test").await.code, 250);
    let mut busy = start_transaction(addr, "in flight").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    gateway.signal(libc::SIGTERM);
    let reply = idle.read_reply().await;
    assert_eq!(
        (reply.code, reply.status()),
        (421, "4.3.2"),
        "idle session: {reply}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "new connections must be refused while draining"
    );
    let reply = busy.read_reply().await;
    assert_eq!(
        reply.code, 250,
        "the transaction in flight completes: {reply}"
    );
    // After its transaction the draining session says goodbye.
    let reply = busy.read_reply().await;
    assert_eq!(reply.code, 421, "{reply}");

    let status = tokio::task::spawn_blocking(move || {
        let status = gateway.wait(Duration::from_secs(10));
        (status, gateway.log())
    })
    .await
    .unwrap();
    assert!(
        status.0.is_some_and(|s| s.success()),
        "exit: {:?}\n{}",
        status.0,
        status.1
    );
    assert_eq!(backend.messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn grace_period_cuts_slow_transactions_without_a_250() {
    let backend = FakeBackend::start(Behaviour {
        data_delay: Some(Duration::from_secs(30)),
        ..Default::default()
    })
    .await;
    let (_dir, mut gateway) = spawn(&backend, "1s");
    let mut busy = start_transaction(gateway.smtp, "too slow").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    gateway.signal(libc::SIGTERM);
    let reply = busy.try_read_reply().await;
    if let Some(reply) = &reply {
        assert_eq!(reply.code, 421, "{reply}");
    }
    let status = tokio::task::spawn_blocking(move || gateway.wait(Duration::from_secs(15)))
        .await
        .unwrap();
    assert!(
        status.is_some(),
        "gateway did not exit after the grace period"
    );
}

/// Many clients send; the gateway is killed with SIGKILL at an arbitrary moment. Every
/// message a client got 250 for must be at the backend (the converse, a message at the
/// backend that the client did not see acknowledged, is a duplicate after retry, not a
/// loss).
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_never_loses_an_acknowledged_message() {
    for round in 0..3u64 {
        let backend = FakeBackend::start(Behaviour {
            data_delay: Some(Duration::from_millis(5)),
            ..Default::default()
        })
        .await;
        let (_dir, gateway) = spawn(&backend, "5s");
        let addr = gateway.smtp;
        let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(HashSet::new()));
        let mut clients = Vec::new();
        for worker in 0..8 {
            let acknowledged = acknowledged.clone();
            clients.push(tokio::spawn(async move {
                let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
                    return;
                };
                drop(tcp);
                let (mut client, _) = SmtpClient::connect(addr).await;
                if client.cmd("EHLO w.test").await.code != 250 {
                    return;
                }
                for n in 0.. {
                    let subject = format!("r{round}-w{worker}-m{n}");
                    let steps = [
                        "MAIL FROM:<a@sender.test>".to_string(),
                        "RCPT TO:<b@example.test>".to_string(),
                        "DATA".to_string(),
                    ];
                    for step in steps {
                        client.send(format!("{step}\r\n").as_bytes()).await;
                        match client.try_read_reply().await {
                            Some(r) if r.code < 400 => {}
                            _ => return,
                        }
                    }
                    client
                        .send(format!("Subject: {subject}\r\n\r\nx\r\n.\r\n").as_bytes())
                        .await;
                    match client.try_read_reply().await {
                        Some(r) if r.code == 250 => {
                            acknowledged.lock().unwrap().insert(subject);
                        }
                        _ => return,
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(150 + round * 97)).await;
        gateway.signal(libc::SIGKILL);
        for client in clients {
            let _ = client.await;
        }
        let delivered: HashSet<String> = backend
            .messages()
            .iter()
            .filter_map(|m| {
                m.text()
                    .lines()
                    .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
            })
            .collect();
        let acknowledged = acknowledged.lock().unwrap().clone();
        assert!(
            !acknowledged.is_empty(),
            "round {round}: nothing was sent before the kill"
        );
        let lost: Vec<_> = acknowledged.difference(&delivered).collect();
        assert!(
            lost.is_empty(),
            "round {round}: acknowledged but not delivered: {lost:?}"
        );
        drop(gateway);
    }
}

/// GET `path` on the metrics listener; the status code.
async fn http_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("metrics");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("metrics answer in time")
        .unwrap();
    let head = String::from_utf8_lossy(&raw);
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad HTTP answer {head:?}"))
}

/// A rolling restart behind a load balancer: on SIGTERM `/readyz` is 503 at once,
/// while connections are still accepted (and served) for `shutdown_delay`; then the
/// drain refuses new ones.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_makes_readyz_fail_before_the_drain() {
    let backend = FakeBackend::start(Behaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = TestConfig {
        trusted: vec!["127.0.0.0/8".into()],
        backends: vec![backend.url()],
        server_extra: "  timeouts:\n    shutdown_grace: 5s\n    shutdown_delay: 3s\n".into(),
        extra: "relay:\n  tls: off\nmetrics:\n  listen: 127.0.0.1:0\n".into(),
        ..Default::default()
    };
    let path = dir.path().join("mxgate.yaml");
    std::fs::write(&path, config.yaml(dir.path())).unwrap();
    let mut gateway = GatewayProcess::spawn(&path);
    let metrics = gateway.metrics.expect("metrics listener");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http_status(metrics, "/readyz").await != 200 {
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    gateway.signal(libc::SIGTERM);
    let signalled = std::time::Instant::now();
    loop {
        let status = http_status(metrics, "/readyz").await;
        if status == 503 {
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(1),
            "/readyz still {status} after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(http_status(metrics, "/healthz").await, 200, "alive");
    // Inside the delay: a new client is still served end to end.
    let mut client = start_transaction(gateway.smtp, "during the delay").await;
    let reply = client.read_reply().await;
    assert_eq!(reply.code, 250, "{reply}");
    assert!(
        signalled.elapsed() < Duration::from_millis(2700),
        "the test was too slow to check inside the delay"
    );
    // After the delay the drain starts: the idle session is told, the listener closes.
    let reply = client.read_reply().await;
    assert_eq!((reply.code, reply.status()), (421, "4.3.2"), "{reply}");
    assert!(signalled.elapsed() >= Duration::from_secs(3));
    // The listener closes as the drain begins; the idle session's 421 and the close
    // race each other by a few milliseconds on a loaded machine.
    let drained = std::time::Instant::now();
    while tokio::net::TcpStream::connect(gateway.smtp).await.is_ok() {
        assert!(
            drained.elapsed() < Duration::from_secs(2),
            "new connections are refused once the drain began"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = tokio::task::spawn_blocking(move || gateway.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
    assert_eq!(backend.messages().len(), 1);
}
