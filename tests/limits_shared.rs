//! Limits shared in a real Redis (`limits.store: redis://…`) by real mxgate processes:
//! one per-client connection limit and one rate across two instances, mail still flowing
//! while the store is gone (`mxgate_limits_store_up` 0, then 1 again), and the slots of
//! a SIGKILLed instance freed by their lease. The client is a TEST-NET address on `lo`.

use mxgate_test_kit as support;

use std::time::{Duration, Instant};
use support::client::SmtpClient;
use support::gateway::{GatewayProcess, TestConfig};
use support::prom;
use support::redis::RedisServer;

/// A lease short enough for a test: slots of a killed instance end within it.
const TTL: Duration = Duration::from_secs(3);

fn source(ip: &str) -> bool {
    if support::net::source_address(ip) {
        return true;
    }
    support::skip(format!("cannot use {ip} as a client address"));
    false
}

/// An mxgate process counting in `store`, with its own directory (config, Maildir).
fn instance(
    store: &str,
    server_extra: &str,
    limits_extra: &str,
) -> (GatewayProcess, tempfile::TempDir) {
    instance_with_env(store, server_extra, limits_extra, &[])
}

fn instance_with_env(
    store: &str,
    server_extra: &str,
    limits_extra: &str,
    env: &[(&str, &str)],
) -> (GatewayProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ttl = match limits_extra.contains("store_connection_ttl") {
        true => String::new(),
        false => format!("  store_connection_ttl: {}s\n", TTL.as_secs()),
    };
    let config = TestConfig {
        server_extra: server_extra.into(),
        extra: format!(
            "auth:\n  enabled: false\nmetrics:\n  listen: \"127.0.0.1:0\"\nlimits:\n  store: \"{store}\"\n{ttl}{limits_extra}"
        ),
        ..Default::default()
    };
    let path = dir.path().join("mxgate.yaml");
    std::fs::write(&path, config.yaml(dir.path())).unwrap();
    (GatewayProcess::spawn_with_env(&path, env), dir)
}

async fn store_up(gateway: &GatewayProcess) -> f64 {
    let exposition = prom::exposition(gateway.metrics.expect("metrics listener")).await;
    prom::value(&exposition, "mxgate_limits_store_up").expect("mxgate_limits_store_up is exported")
}

/// Waits until the instance's `mxgate_limits_store_up` is `want`.
async fn wait_store_up(gateway: &GatewayProcess, want: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let now = store_up(gateway).await;
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "mxgate_limits_store_up stayed {now}, expected {want}:\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the store holds `want` connection slots for `client`.
async fn wait_open_slots(redis: &RedisServer, client: &str, want: usize) {
    let store = redis::Client::open(redis.url()).unwrap();
    let mut store = store.get_multiplexed_async_connection().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("*conn:{{{client}*"))
            .query_async(&mut store)
            .await
            .unwrap();
        let mut open = 0;
        for key in keys {
            // The connection-rate key of a client is named alike, but is no sorted set.
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut store)
                .await
                .unwrap();
            if kind != "zset" {
                continue;
            }
            let n: usize = redis::cmd("ZCARD")
                .arg(&key)
                .query_async(&mut store)
                .await
                .unwrap();
            open += n;
        }
        if open == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{open} slots open for {client}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (a little: the log is read from a pipe) until the instance has logged `text`.
async fn wait_log(gateway: &GatewayProcess, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !gateway.log().contains(text) {
        assert!(
            Instant::now() < deadline,
            "{text:?} not logged:\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects from `from`; returns the client when greeted with 220, else the code.
async fn connect(gateway: &GatewayProcess, from: &str) -> Result<SmtpClient, u16> {
    let (mut client, greeting) = SmtpClient::connect_from(gateway.smtp, from).await;
    if greeting.code != 220 {
        return Err(greeting.code);
    }
    assert_eq!(client.cmd("EHLO client.example.net").await.code, 250);
    Ok(client)
}

/// Retries `connect` until it is greeted, for at most `within`; returns how long it took.
async fn connect_within(
    gateway: &GatewayProcess,
    from: &str,
    within: Duration,
) -> (SmtpClient, Duration) {
    let start = Instant::now();
    loop {
        match connect(gateway, from).await {
            Ok(client) => return (client, start.elapsed()),
            Err(code) => {
                assert_eq!(code, 421, "refused with the wrong code");
                assert!(
                    start.elapsed() < within,
                    "still refused after {:?}:\n{}",
                    start.elapsed(),
                    gateway.log()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn deliver(client: &mut SmtpClient) -> u16 {
    client
        .send_mail(
            "a@sender.test",
            &["bob@example.test"],
            "Subject: shared\n\nhi\n",
        )
        .await
        .code
}

/// Issue 12, item 2: `max_connections_per_ip` 3 and `messages_per_minute` 4 hold for
/// two instances together (each alone would allow them again).
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_enforce_one_connection_limit_and_one_rate() {
    let client_ip = "192.0.2.41";
    let Some(redis) = RedisServer::start() else {
        return;
    };
    if !source(client_ip) {
        return;
    }
    let server = "  max_connections_per_ip: 3\n";
    let limits = "  messages_per_minute: 4\n";
    let (a, _a_dir) = instance(&redis.url(), server, limits);
    let (b, _b_dir) = instance(&redis.url(), server, limits);
    wait_store_up(&a, 1.0, Duration::from_secs(5)).await;
    wait_store_up(&b, 1.0, Duration::from_secs(5)).await;

    let mut on_a = vec![
        connect(&a, client_ip).await.unwrap(),
        connect(&a, client_ip).await.unwrap(),
    ];
    let mut on_b = connect(&b, client_ip).await.unwrap();
    // Three open across the two: the fourth is refused by either.
    assert_eq!(connect(&b, client_ip).await.err(), Some(421));
    assert_eq!(connect(&a, client_ip).await.err(), Some(421));
    // Another client has its own count.
    assert!(connect(&b, "127.0.0.9").await.is_ok());

    // One closed on A: B has room again (the slot is removed as the connection ends).
    let mut closing = on_a.pop().unwrap();
    assert_eq!(closing.cmd("QUIT").await.code, 221);
    drop(closing);
    let (_again, took) = connect_within(&b, client_ip, Duration::from_secs(2)).await;
    assert!(took < Duration::from_secs(2));

    // Four messages a minute, wherever they are sent.
    assert_eq!(deliver(&mut on_a[0]).await, 250);
    assert_eq!(deliver(&mut on_b).await, 250);
    assert_eq!(deliver(&mut on_a[0]).await, 250);
    assert_eq!(deliver(&mut on_b).await, 250);
    assert_eq!(on_b.cmd("MAIL FROM:<a@sender.test>").await.code, 450);
    assert_eq!(on_a[0].cmd("MAIL FROM:<a@sender.test>").await.code, 450);
    wait_log(&a, "limits store reachable").await;
    wait_log(&b, "limits store reachable").await;
    let logs = format!("{}{}", a.log(), b.log());
    assert!(!logs.contains("unreachable"), "{logs}");
}

/// `connections_per_minute` 3 across two instances: the slot and the rate are counted
/// in one script, and a connection refused for the rate takes no slot.
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_enforce_one_connection_rate() {
    let client_ip = "192.0.2.47";
    let Some(redis) = RedisServer::start() else {
        return;
    };
    if !source(client_ip) {
        return;
    }
    let server = "  max_connections_per_ip: 3\n";
    let limits = "  connections_per_minute: 3\n";
    let (a, _a_dir) = instance(&redis.url(), server, limits);
    let (b, _b_dir) = instance(&redis.url(), server, limits);
    wait_store_up(&a, 1.0, Duration::from_secs(5)).await;
    wait_store_up(&b, 1.0, Duration::from_secs(5)).await;
    let _one = connect(&a, client_ip).await.unwrap();
    let _two = connect(&b, client_ip).await.unwrap();
    // Closed at once: the rate counts connections made, not open. Its slot is given
    // back to the store after the close, asynchronously: wait for that, or the next
    // connection could be refused for the slot rather than for the rate.
    drop(connect(&a, client_ip).await.unwrap());
    wait_open_slots(&redis, client_ip, 2).await;
    assert_eq!(connect(&b, client_ip).await.err(), Some(421));
    assert_eq!(connect(&a, client_ip).await.err(), Some(421));
    let refused = prom::exposition(b.metrics.unwrap()).await;
    assert!(
        refused.contains("mxgate_limit_exceeded_total{limit=\"connections_per_minute\"} 1"),
        "{refused}"
    );
    assert!(
        refused.contains("mxgate_limit_exceeded_total{limit=\"max_connections_per_ip\"} 0"),
        "{refused}"
    );
}

/// Issue 12, items 2 and 6: the store stopped mid-run. Mail keeps flowing (counted in
/// memory), `mxgate_limits_store_up` goes to 0 with one log line, and back to 1 when the
/// store returns, after which the limit is shared again.
#[tokio::test(flavor = "multi_thread")]
async fn mail_flows_while_the_store_is_down() {
    let client_ip = "192.0.2.42";
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    if !source(client_ip) {
        return;
    }
    let server = "  max_connections_per_ip: 2\n";
    let (a, _a_dir) = instance(&redis.url(), server, "  store_timeout: 150ms\n");
    let (b, _b_dir) = instance(&redis.url(), server, "  store_timeout: 150ms\n");
    wait_store_up(&a, 1.0, Duration::from_secs(5)).await;
    let mut client = connect(&a, client_ip).await.unwrap();
    assert_eq!(deliver(&mut client).await, 250);

    redis.stop();
    let mut delivered = 0;
    for _ in 0..10 {
        assert_eq!(deliver(&mut client).await, 250);
        let mut other = connect(&b, client_ip)
            .await
            .expect("not refused for the store");
        assert_eq!(deliver(&mut other).await, 250);
        delivered += 2;
    }
    assert_eq!(delivered, 20);
    wait_store_up(&a, 0.0, Duration::from_secs(2)).await;
    wait_store_up(&b, 0.0, Duration::from_secs(2)).await;
    wait_log(&a, "limits store unreachable").await;
    let down_lines = a.log().matches("limits store unreachable").count();
    assert_eq!(down_lines, 1, "one line per transition:\n{}", a.log());
    assert!(!a.log().contains(":hunter"), "no password in logs");

    redis.resume();
    wait_store_up(&a, 1.0, Duration::from_secs(5)).await;
    wait_store_up(&b, 1.0, Duration::from_secs(5)).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while a.log().matches("limits store reachable").count() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        a.log().matches("limits store reachable").count(),
        2,
        "{}",
        a.log()
    );
    // Shared again. The store restarted empty, but A put back the slot of the
    // connection it still holds (taken in the store before it went away): one more on
    // B fills the client's two, and both instances refuse a third.
    let _b1 = connect(&b, client_ip).await.unwrap();
    assert_eq!(connect(&a, client_ip).await.err(), Some(421));
    assert_eq!(connect(&b, client_ip).await.err(), Some(421));
    assert_eq!(deliver(&mut client).await, 250);
}

/// A store that is slow rather than gone (`DEBUG SLEEP`): the checks give up after
/// `store_timeout`, the instance counts in memory (metric 0) while the store sleeps, and
/// shares again once it answers. No client waits for the sleeping store.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_store_is_not_waited_for() {
    let client_ip = "192.0.2.45";
    let Some(redis) = RedisServer::start() else {
        return;
    };
    if !source(client_ip) {
        return;
    }
    let (a, _a_dir) = instance(&redis.url(), "", "  store_timeout: 100ms\n");
    wait_store_up(&a, 1.0, Duration::from_secs(5)).await;
    const SLEEP: Duration = Duration::from_secs(4);
    redis.pause(SLEEP.as_secs() as u32);
    let paused = Instant::now();
    let mut client = connect(&a, client_ip)
        .await
        .expect("not refused for the store");
    assert_eq!(deliver(&mut client).await, 250);
    let mut second = connect(&a, client_ip)
        .await
        .expect("not refused for the store");
    assert_eq!(deliver(&mut second).await, 250);
    // Both sessions were served while the store still slept.
    assert!(
        paused.elapsed() < SLEEP,
        "served only after {:?}",
        paused.elapsed()
    );
    assert_eq!(store_up(&a).await, 0.0);
    wait_log(&a, "limits store unreachable").await;
    wait_store_up(&a, 1.0, SLEEP + Duration::from_secs(5)).await;
    assert_eq!(
        a.log().matches("limits store unreachable").count(),
        1,
        "{}",
        a.log()
    );
}

/// Issue 12, item 2: an instance SIGKILLed while holding a client's connection slots
/// cannot give them back; they end with their lease (`store_connection_ttl`).
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_instance_frees_its_slots_within_the_lease() {
    let client_ip = "192.0.2.43";
    let Some(redis) = RedisServer::start() else {
        return;
    };
    if !source(client_ip) {
        return;
    }
    let server = "  max_connections_per_ip: 2\n";
    let (mut a, _a_dir) = instance(&redis.url(), server, "");
    let (b, _b_dir) = instance(&redis.url(), server, "");
    wait_store_up(&a, 1.0, Duration::from_secs(5)).await;
    wait_store_up(&b, 1.0, Duration::from_secs(5)).await;
    let _held = [
        connect(&a, client_ip).await.unwrap(),
        connect(&a, client_ip).await.unwrap(),
    ];
    // Leases are renewed while A lives: longer than one lease, still full.
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    assert_eq!(connect(&b, client_ip).await.err(), Some(421));

    a.signal(libc::SIGKILL);
    assert!(a.wait(Duration::from_secs(5)).is_some());
    // Nobody removed the slots: refused until their lease ends, then room again.
    assert_eq!(connect(&b, client_ip).await.err(), Some(421));
    let (_client, took) = connect_within(&b, client_ip, TTL + Duration::from_secs(2)).await;
    eprintln!("slots of the killed instance freed after {took:?} (lease {TTL:?})");
}

/// `rediss://` with a password: TLS to the store (its certificate trusted through
/// `SSL_CERT_FILE`, as the system's CA store would), one limit for two instances, and
/// the password in no log line.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_over_tls_with_a_password() {
    let client_ip = "192.0.2.44";
    let password = "s3cret-pw";
    let Some(redis) = RedisServer::start_tls(password) else {
        return;
    };
    if !source(client_ip) {
        return;
    }
    let ca = redis.certificate().unwrap().to_str().unwrap().to_string();
    let env = [("SSL_CERT_FILE", ca.as_str())];
    let server = "  max_connections_per_ip: 1\n";
    let (a, _a_dir) = instance_with_env(&redis.url(), server, "", &env);
    let (b, _b_dir) = instance_with_env(&redis.url(), server, "", &env);
    wait_store_up(&a, 1.0, Duration::from_secs(5)).await;
    wait_store_up(&b, 1.0, Duration::from_secs(5)).await;
    let _held = connect(&a, client_ip).await.unwrap();
    assert_eq!(connect(&b, client_ip).await.err(), Some(421));
    let logs = format!("{}{}", a.log(), b.log());
    assert!(logs.contains("rediss://127.0.0.1:"), "{logs}");
    assert!(!logs.contains(password), "{logs}");

    // Not trusting the certificate is a store that is down: counted in memory.
    let (c, _c_dir) = instance(&redis.url(), server, "");
    wait_store_up(&c, 0.0, Duration::from_secs(5)).await;
    assert!(connect(&c, client_ip).await.is_ok());
    wait_log(&c, "limits store unreachable").await;
    assert!(!c.log().contains(password), "{}", c.log());
}

/// Issue 12, item 3 (rolling restarts): an instance stopped with SIGTERM gives its
/// slots back as its sessions end, not a lease later (here 30 s).
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_instance_gives_its_slots_back() {
    let client_ip = "192.0.2.46";
    let Some(redis) = RedisServer::start() else {
        return;
    };
    if !source(client_ip) {
        return;
    }
    let server = "  max_connections_per_ip: 2\n";
    let long_lease = "  store_connection_ttl: 30s\n";
    let (mut a, _a_dir) = instance(&redis.url(), server, long_lease);
    let (b, _b_dir) = instance(&redis.url(), server, long_lease);
    wait_store_up(&a, 1.0, Duration::from_secs(5)).await;
    wait_store_up(&b, 1.0, Duration::from_secs(5)).await;
    let held = [
        connect(&a, client_ip).await.unwrap(),
        connect(&a, client_ip).await.unwrap(),
    ];
    assert_eq!(connect(&b, client_ip).await.err(), Some(421));
    a.signal(libc::SIGTERM);
    // The drain closes the idle sessions after `shutdown_grace` (1 s in tests).
    assert!(a.wait(Duration::from_secs(10)).is_some(), "{}", a.log());
    drop(held);
    let _client = connect(&b, client_ip)
        .await
        .expect("the stopped instance's slots are free at once");
}

/// Issue 12, "done when": the cost of a Redis-backed limit check per connection (the
/// connection slot, the connection rate, and giving the slot back), against the memory
/// store, over loopback. Prints figures; asserts nothing about time. Run with
/// `cargo test --release --test limits_shared -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, not a check"]
async fn cost_of_a_shared_limit_check() {
    use mxgate::limits::{Limiter, Settings};
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let settings = Settings {
        ipv6_prefix_length: 64,
        max_connections_per_ip: 1_000_000,
        connections_per_minute: 1_000_000_000,
        messages_per_minute: 0,
        recipients_per_minute: 0,
        max_junk_commands: 0,
        min_data_rate: 0,
        data_grace: Duration::from_secs(1),
        max_tracked_clients: 100_000,
    };
    let shared = mxgate::config::LimitsConfig {
        store: redis.url(),
        ..Default::default()
    };
    let (redis_limiter, keeper) = Limiter::start(&settings, &shared).await;
    let memory_limiter = Limiter::new(&settings);
    const CONNECTIONS: u32 = 2_000;
    for (name, limiter) in [("redis", &redis_limiter), ("memory", &memory_limiter)] {
        let mut runs = Vec::new();
        for run in 0..7 {
            let start = Instant::now();
            for n in 0..CONNECTIONS {
                let ip = std::net::Ipv4Addr::from(0xC633_6400 + (n % 200)).into();
                let budget = limiter.admit(ip, false, settings).await;
                assert!(budget.is_ok(), "run {run}: refused");
            }
            runs.push(start.elapsed().as_secs_f64() * 1e6 / f64::from(CONNECTIONS));
        }
        runs.sort_by(f64::total_cmp);
        eprintln!(
            "{name}: per connection (slot + connection rate + release) median {:.1} µs, min {:.1} µs, max {:.1} µs over {} runs of {CONNECTIONS}",
            runs[runs.len() / 2],
            runs[0],
            runs[runs.len() - 1],
            runs.len()
        );
    }
    assert!(
        mxgate::metrics::render().contains("mxgate_limits_store_up 1"),
        "the shared store was in use"
    );
    if let Some(keeper) = keeper {
        keeper.abort();
    }
}
