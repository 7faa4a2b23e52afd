//! End to end behind a real load balancer: HAProxy (Debian's package) in front of two
//! mxgate processes with `send-proxy-v2` and SMTP health checks (PROXY v2 `LOCAL`).
//! The client connects from a TEST-NET address on `lo`; that address, not HAProxy's,
//! is what SPF, `Received` and `Authentication-Results` show. Then a few hundred
//! messages go through while one instance is killed with SIGKILL: clients retry like
//! an MTA, and nothing that was acknowledged is lost.
//!
//! The second test adds a real `redis-server` as both instances' limits store: a
//! per-client connection limit holds for the two together whichever instance HAProxy
//! picks, and when the store is killed in the middle of a load mail keeps flowing
//! (each instance counts in its own memory, `mxgate_limits_store_up` 0).
//!
//! Each test writes its figures (the ledger: messages, acknowledged, stored,
//! duplicates) straight to the process's stderr, which `cargo test` does not capture,
//! so they show in CI output even when the test passes.

use mxgate_test_kit as support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::backend::{Behaviour, FakeBackend};
use support::client::SmtpClient;
use support::dns::TestDns;
use support::gateway::{GatewayProcess, TestConfig};
use support::haproxy::Haproxy;
use support::prom;
use support::redis::RedisServer;

/// The sender's server, on `lo`; SPF for sender.test allows it alone.
const CLIENT_IP: &str = "192.0.2.5";
/// The sender of the shared-store test (its own address: its own connection count).
const SHARED_CLIENT_IP: &str = "192.0.2.48";
const MESSAGES: usize = 300;
const WORKERS: usize = 8;
/// Acknowledged messages before one instance (or the store) is killed.
const KILL_AFTER: usize = 100;
/// `server.max_connections_per_ip` of the shared-store test, for both instances together.
const PER_IP: usize = 3;
/// Clients of the shared-store load: twice the limit, so that it bites while the store
/// is up (the others are refused with 421 and retry).
const SHARED_WORKERS: usize = 2 * PER_IP;
/// How long a client keeps retrying one message (an MTA would keep it for days).
const RETRY_FOR: Duration = Duration::from_secs(120);

/// An mxgate process behind HAProxy. With `store` (a Redis URL) it counts its limits
/// there, with `max_connections_per_ip` [`PER_IP`].
fn instance(
    dns: &TestDns,
    backend: &FakeBackend,
    hostname: &str,
    store: Option<&str>,
) -> (tempfile::TempDir, GatewayProcess) {
    let dir = tempfile::tempdir().unwrap();
    // HAProxy connects from 127.0.0.1; only it may (and must) send PROXY headers.
    let mut server_extra = "  proxy_protocol:\n    trusted_networks: [\"127.0.0.1/32\"]\n".into();
    let mut extra = format!(
        "relay:\n  tls: off\nmetrics:\n  listen: 127.0.0.1:0\n{}",
        dns.config()
    );
    if let Some(store) = store {
        server_extra = format!("{server_extra}  max_connections_per_ip: {PER_IP}\n");
        // A generous deadline: a busy test machine must not pass for a store that is down.
        extra.push_str(&format!(
            "limits:\n  store: \"{store}\"\n  store_timeout: 2s\n"
        ));
    }
    let config = TestConfig {
        hostname: hostname.into(),
        backends: vec![backend.url()],
        tls: false,
        server_extra,
        extra,
        ..Default::default()
    };
    let path = dir.path().join("mxgate.yaml");
    std::fs::write(&path, config.yaml(dir.path())).unwrap();
    let process = GatewayProcess::spawn(&path);
    (dir, process)
}

/// DNS for the sender at `client_ip`: SPF allows it alone, and its iprev passes.
async fn sender_dns(client_ip: &str) -> TestDns {
    let dns = TestDns::start().await;
    dns.txt("sender.test", &format!("v=spf1 ip4:{client_ip} -all"));
    dns.a("mail.sender.test", client_ip);
    dns.ptr(client_ip, "mail.sender.test");
    dns
}

/// How one delivery attempt ended.
#[derive(PartialEq)]
enum Attempt {
    Acknowledged,
    /// `421` in place of the greeting (a per-client limit).
    Refused,
    /// Anything else: no greeting, a broken connection, a 4xx later on.
    Failed,
}

/// One delivery attempt through the balancer.
async fn attempt(front: SocketAddr, client_ip: &str, subject: &str) -> Attempt {
    let Some((mut client, greeting)) = SmtpClient::try_connect_from(front, client_ip).await else {
        return Attempt::Failed;
    };
    match greeting.code {
        220 => {}
        421 => return Attempt::Refused,
        _ => return Attempt::Failed,
    }
    for line in [
        "EHLO mail.sender.test",
        "MAIL FROM:<alice@sender.test>",
        "RCPT TO:<bob@example.test>",
        "DATA",
    ] {
        match client.try_cmd(line).await {
            Some(reply) if reply.code < 400 => {}
            _ => return Attempt::Failed,
        }
    }
    let body = format!(
        "From: alice@sender.test\r\nTo: bob@example.test\r\nSubject: {subject}\r\n\r\nhello\r\n.\r\n"
    );
    if !client.try_send(body.as_bytes()).await {
        return Attempt::Failed;
    }
    let acknowledged = matches!(client.try_read_reply().await, Some(r) if r.code == 250);
    let _ = client.try_cmd("QUIT").await;
    match acknowledged {
        true => Attempt::Acknowledged,
        false => Attempt::Failed,
    }
}

/// How one message fared: acknowledged at last or not, attempts, refusals among them.
struct Delivery {
    acknowledged: bool,
    attempts: usize,
    refused: usize,
}

/// Like an MTA: retries until the message is acknowledged (for at most [`RETRY_FOR`]).
async fn deliver(front: SocketAddr, client_ip: &str, subject: &str) -> Delivery {
    let started = Instant::now();
    let mut delivery = Delivery {
        acknowledged: false,
        attempts: 0,
        refused: 0,
    };
    while started.elapsed() < RETRY_FOR {
        delivery.attempts += 1;
        match attempt(front, client_ip, subject).await {
            Attempt::Acknowledged => {
                delivery.acknowledged = true;
                return delivery;
            }
            Attempt::Refused => delivery.refused += 1,
            Attempt::Failed => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    delivery
}

/// What the clients saw during a load.
struct Load {
    acknowledged: HashSet<String>,
    /// Never acknowledged despite the retries.
    failed: Vec<String>,
    attempts: usize,
    refused: usize,
    /// Acknowledged messages whose first attempt began after the trigger had run.
    acknowledged_after_trigger: usize,
    elapsed: Duration,
}

/// `messages` messages (subjects `load-N`) from `workers` clients at `client_ip`, each
/// retrying like an MTA. The client whose message is the `trigger_after`th acknowledged
/// runs `trigger` at once (a kill), so it happens in the middle of the run whatever the
/// machine's speed.
async fn load(
    front: SocketAddr,
    client_ip: &'static str,
    messages: usize,
    workers: usize,
    trigger_after: usize,
    trigger: Box<dyn FnOnce() + Send>,
) -> Load {
    let next = Arc::new(AtomicUsize::new(0));
    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let trigger = Arc::new(Mutex::new(Some(trigger)));
    let triggered = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (next, acknowledged) = (next.clone(), acknowledged.clone());
        let (trigger, triggered) = (trigger.clone(), triggered.clone());
        tasks.push(tokio::spawn(async move {
            let (mut failed, mut attempts, mut refused, mut after) = (Vec::new(), 0, 0, 0);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= messages {
                    return (failed, attempts, refused, after);
                }
                let subject = format!("load-{n}");
                let after_trigger = triggered.load(Ordering::SeqCst);
                let delivery = deliver(front, client_ip, &subject).await;
                attempts += delivery.attempts;
                refused += delivery.refused;
                if !delivery.acknowledged {
                    failed.push(subject);
                    continue;
                }
                after += usize::from(after_trigger);
                let count = {
                    let mut acknowledged = acknowledged.lock().unwrap();
                    acknowledged.insert(subject);
                    acknowledged.len()
                };
                if count == trigger_after {
                    let run = trigger.lock().unwrap().take();
                    if let Some(run) = run {
                        run();
                        triggered.store(true, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    let mut load = Load {
        acknowledged: HashSet::new(),
        failed: Vec::new(),
        attempts: 0,
        refused: 0,
        acknowledged_after_trigger: 0,
        elapsed: Duration::ZERO,
    };
    for task in tasks {
        let (failed, attempts, refused, after) = task.await.unwrap();
        load.failed.extend(failed);
        load.attempts += attempts;
        load.refused += refused;
        load.acknowledged_after_trigger += after;
    }
    load.elapsed = started.elapsed();
    load.acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        triggered.load(Ordering::SeqCst),
        "the trigger ran during the load"
    );
    load
}

/// What the backend received of a load: copies of each subject, messages per instance.
struct Ledger {
    copies: HashMap<String, usize>,
    by_instance: HashMap<String, usize>,
}

impl Ledger {
    /// Every stored message of the load shows `client_ip` in its `Received`.
    fn of(backend: &FakeBackend, client_ip: &str) -> Ledger {
        let mut ledger = Ledger {
            copies: HashMap::new(),
            by_instance: HashMap::new(),
        };
        for message in &backend.messages() {
            let text = message.text();
            let subject = subject(&text);
            if !subject.starts_with("load-") {
                continue;
            }
            *ledger.copies.entry(subject).or_default() += 1;
            let received = header_line(&text, "Received");
            assert!(received.contains(&format!("[{client_ip}]")), "{received}");
            let by = if received.contains("by mx1.example.test") {
                "mx1"
            } else {
                "mx2"
            };
            *ledger.by_instance.entry(by.into()).or_default() += 1;
        }
        ledger
    }

    fn stored(&self) -> usize {
        self.copies.values().sum()
    }

    fn duplicates(&self) -> usize {
        self.stored() - self.copies.len()
    }

    /// Acknowledged messages the backend does not have.
    fn lost<'a>(&self, load: &'a Load) -> Vec<&'a String> {
        load.acknowledged
            .iter()
            .filter(|s| !self.copies.contains_key(*s))
            .collect()
    }

    /// One line: messages, acknowledged, stored, duplicates and the rest.
    fn summary(&self, load: &Load) -> String {
        format!(
            "messages {MESSAGES}, acknowledged {}, stored {} ({} distinct), duplicates {}, \
             attempts {}, refused 421 {}, by instance {:?}, {:.1}s",
            load.acknowledged.len(),
            self.stored(),
            self.copies.len(),
            self.duplicates(),
            load.attempts,
            load.refused,
            self.by_instance,
            load.elapsed.as_secs_f64()
        )
    }
}

/// Figures for the CI log: straight to the process's stderr, which the test harness
/// does not capture (it captures only `eprintln!`), so they show when the test passes.
fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
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

/// The value of one sample (`name` with its labels, as exported) of an instance.
async fn metric(gateway: &GatewayProcess, sample: &str) -> f64 {
    let metrics = prom::exposition(gateway.metrics.expect("metrics listener")).await;
    prom::value(&metrics, sample).unwrap_or_else(|| panic!("no {sample} in\n{metrics}"))
}

/// Waits (generously) until an instance's `sample` is `want`.
async fn wait_metric(gateway: &GatewayProcess, sample: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = metric(gateway, sample).await;
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sample} stayed {now}, expected {want}:\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let dns = sender_dns(CLIENT_IP).await;
    let backend = FakeBackend::start(Behaviour::default()).await;
    let (_dir1, mut first) = instance(&dns, &backend, "mx1.example.test", None);
    let (_dir2, second) = instance(&dns, &backend, "mx2.example.test", None);
    let Some(haproxy) = Haproxy::start(&[first.smtp, second.smtp]) else {
        return;
    };
    let front = haproxy.addr;

    // The first message: the client's address is judged, not HAProxy's.
    let delivery = deliver(front, CLIENT_IP, "first").await;
    assert!(
        delivery.acknowledged,
        "no delivery through haproxy:\n{}",
        haproxy.log()
    );
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
    let victim = first.child.id() as i32;
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    #[allow(unsafe_code)]
    let kill = Box::new(move || unsafe {
        libc::kill(victim, libc::SIGKILL);
    });
    let load = load(front, CLIENT_IP, MESSAGES, WORKERS, KILL_AFTER, kill).await;
    assert!(
        first.wait(Duration::from_secs(10)).is_some(),
        "the first instance was killed during the load"
    );

    let ledger = Ledger::of(&backend, CLIENT_IP);
    report(&format!("haproxy e2e: {}", ledger.summary(&load)));
    let lost = ledger.lost(&load);
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    assert!(
        load.failed.is_empty(),
        "never acknowledged despite retries: {:?}\n{}",
        load.failed,
        haproxy.log()
    );
    assert_eq!(load.acknowledged.len(), MESSAGES);
    let by_instance = &ledger.by_instance;
    assert!(
        by_instance.get("mx1").copied().unwrap_or(0) > 0
            && by_instance.get("mx2").copied().unwrap_or(0) > 0,
        "both instances took mail before the kill: {by_instance:?}"
    );
    // HAProxy's SMTP health checks reached the surviving instance as v2 LOCAL
    // headers, and every client connection as a proxied one.
    for result in ["local", "proxied"] {
        let sample = format!("mxgate_proxy_protocol_headers_total{{result=\"{result}\"}}");
        let count = metric(&second, &sample).await;
        assert!(count > 0.0, "{sample} {count}");
    }
    drop(haproxy);
    drop(first);
    drop(second);
}

/// Issue 12, item 6: HAProxy in front of two instances that share one `redis-server`
/// for their limits. (a) `max_connections_per_ip` 3 holds for the two together: with 3
/// connections open through HAProxy, the next is refused with 421 by whichever
/// instance HAProxy hands it to (both do, in turn). (b) A load of 300 messages from
/// twice as many clients as the limit allows, and the store killed with SIGKILL a third
/// of the way through: every message is acknowledged, none acknowledged is lost, and
/// both instances report `mxgate_limits_store_up` 0.
#[tokio::test(flavor = "multi_thread")]
async fn haproxy_two_instances_one_redis_store_killed() {
    if !support::net::source_address(SHARED_CLIENT_IP) {
        support::skip(format!(
            "{SHARED_CLIENT_IP} is not usable as a source address"
        ));
        return;
    }
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dns = sender_dns(SHARED_CLIENT_IP).await;
    let backend = FakeBackend::start(Behaviour::default()).await;
    let url = redis.url();
    let (_dir1, first) = instance(&dns, &backend, "mx1.example.test", Some(&url));
    let (_dir2, second) = instance(&dns, &backend, "mx2.example.test", Some(&url));
    let instances = [("mx1", &first), ("mx2", &second)];
    for (_, gateway) in instances {
        wait_metric(gateway, "mxgate_limits_store_up", 1.0).await;
    }
    let Some(haproxy) = Haproxy::start(&[first.smtp, second.smtp]) else {
        return;
    };
    let front = haproxy.addr;

    // (a) The limit's worth of connections, open, wherever HAProxy put them.
    let mut held = Vec::new();
    let mut held_by: HashMap<&str, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while held.len() < PER_IP {
        let Some((mut client, greeting)) =
            SmtpClient::try_connect_from(front, SHARED_CLIENT_IP).await
        else {
            // No server up for a moment (a health check that failed): try again.
            assert!(Instant::now() < deadline, "no greeting:\n{}", haproxy.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        assert_eq!(greeting.code, 220, "{}", greeting.text());
        let (name, _) = instances
            .iter()
            .find(|(name, _)| greeting.text().starts_with(&format!("{name}.")))
            .expect("greeted by one of the instances");
        *held_by.entry(name).or_default() += 1;
        assert_eq!(client.cmd("EHLO mail.sender.test").await.code, 250);
        held.push(client);
    }
    // One more is refused, by each instance in turn (HAProxy's round robin): one that
    // holds fewer than 3 of them itself refuses only because the count is shared.
    let exceeded = "mxgate_limit_exceeded_total{limit=\"max_connections_per_ip\"}";
    let mut refused_by: HashMap<&str, usize> = HashMap::new();
    let mut tries = 0;
    while refused_by.len() < 2 {
        tries += 1;
        assert!(
            tries <= 40,
            "not refused by both instances: {refused_by:?}\n{}",
            haproxy.log()
        );
        let before = [
            metric(&first, exceeded).await,
            metric(&second, exceeded).await,
        ];
        let Some((_, greeting)) = SmtpClient::try_connect_from(front, SHARED_CLIENT_IP).await
        else {
            // No server up for a moment (a health check that failed): try again.
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        assert_eq!(
            (greeting.code, greeting.status()),
            (421, "4.7.0"),
            "connection {} of the client (limit {PER_IP} for both instances, held {held_by:?}): {}",
            PER_IP + 1,
            greeting.text()
        );
        // The refusal is counted before its reply is sent.
        let after = [
            metric(&first, exceeded).await,
            metric(&second, exceeded).await,
        ];
        for (n, (name, _)) in instances.iter().enumerate() {
            if after[n] > before[n] {
                *refused_by.entry(name).or_default() += 1;
            }
        }
    }
    report(&format!(
        "haproxy + redis e2e: max_connections_per_ip {PER_IP} for both instances: held {held_by:?}, \
         the next refused with 421 by {refused_by:?}"
    ));
    for mut client in held {
        let _ = client.try_cmd("QUIT").await;
    }

    // (b) The load, and SIGKILL to the store a third of the way through.
    let mut redis = redis;
    let kill = Box::new(move || redis.stop());
    let load = load(
        front,
        SHARED_CLIENT_IP,
        MESSAGES,
        SHARED_WORKERS,
        KILL_AFTER,
        kill,
    )
    .await;
    let ledger = Ledger::of(&backend, SHARED_CLIENT_IP);
    let mut store_up = Vec::new();
    for (name, gateway) in instances {
        wait_metric(gateway, "mxgate_limits_store_up", 0.0).await;
        store_up.push(format!("{name} 0"));
    }
    report(&format!(
        "haproxy + redis e2e: {}, acknowledged after redis was killed {}, \
         mxgate_limits_store_up then {}",
        ledger.summary(&load),
        load.acknowledged_after_trigger,
        store_up.join(", ")
    ));
    let lost = ledger.lost(&load);
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    assert!(
        load.failed.is_empty(),
        "never acknowledged despite retries: {:?}\n{}\n{}\n{}",
        load.failed,
        haproxy.log(),
        first.log(),
        second.log()
    );
    assert_eq!(load.acknowledged.len(), MESSAGES);
    assert!(
        load.acknowledged_after_trigger > 0,
        "mail flowed after the store was killed"
    );
    for (_, gateway) in instances {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !gateway.log().contains("limits store unreachable") {
            assert!(
                Instant::now() < deadline,
                "no log line for the store going away:\n{}",
                gateway.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    drop(haproxy);
}
