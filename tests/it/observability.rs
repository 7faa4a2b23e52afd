//! Observability: the metrics endpoint passes `promtool check metrics`, counters move
//! exactly with the traffic, the alert rules and the Grafana dashboard's queries are
//! valid PromQL, and a real Prometheus scraping a real mxgate process returns data for
//! every query of the dashboard.

use mxgate_test_kit as support;

use mxgate::keygen::KeyAlgorithm;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::client::SmtpClient;
use support::dkim::DkimKey;
use support::dns::TestDns;
use support::gateway::{Gateway, GatewayProcess, TestConfig};
use support::mail::{self, sealing_key, send_from};
use support::prom::{Sample, http_get, label_spec, percent_encode, scrape, sum};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn message(from: &str, subject: &str) -> String {
    mail::message(from, subject)
        .id_domain("observability.test")
        .body("hello\n")
        .text()
}

// ------------------------------------------------------------------------------------
// The dashboard's queries.

/// Every PromQL expression of the dashboard: (where, expression, legend).
fn dashboard_queries() -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(repo_file("grafana/mxgate.json")).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut out = Vec::new();
    fn walk(panels: &[serde_json::Value], out: &mut Vec<(String, String, String)>) {
        for panel in panels {
            if let Some(nested) = panel["panels"].as_array() {
                walk(nested, out);
            }
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap_or_default().to_string();
                out.push((
                    format!(
                        "panel {} `{}` target {}",
                        panel["id"],
                        panel["title"].as_str().unwrap_or_default(),
                        target["refId"].as_str().unwrap_or_default()
                    ),
                    expr,
                    target["legendFormat"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                ));
            }
        }
    }
    walk(dashboard["panels"].as_array().expect("panels"), &mut out);
    for annotation in dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(expr) = annotation["expr"].as_str() {
            out.push((
                format!("annotation `{}`", annotation["name"].as_str().unwrap_or("")),
                expr.to_string(),
                String::new(),
            ));
        }
    }
    out
}

/// What Grafana substitutes before the query reaches Prometheus.
fn substitute(expr: &str) -> String {
    let expr = expr
        .replace("$__rate_interval", "1m")
        .replace("${__rate_interval}", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "5m")
        .replace("${instance:regex}", ".*")
        .replace("${instance}", ".*")
        .replace("$instance", ".*");
    assert!(!expr.contains('$'), "unsubstituted variable in {expr}");
    expr
}

fn run_promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(PROMTOOL)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {PROMTOOL} (Debian package prometheus): {e}"));
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
    }
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output.status.success(), format!("{stdout}{stderr}"))
}

// ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn promtool_accepts_live_metrics() {
    let dns = TestDns::start().await;
    // good.test authorises this host; spoofed.test does not and publishes p=reject.
    dns.txt("good.test", "v=spf1 ip4:127.0.0.1 -all");
    dns.txt("_dmarc.good.test", "v=DMARC1; p=none");
    dns.txt("spoofed.test", "v=spf1 ip4:192.0.2.1 -all");
    dns.txt("_dmarc.spoofed.test", "v=DMARC1; p=reject");
    let gw = Gateway::start(TestConfig {
        extra: format!("{}metrics:\n  listen: 127.0.0.1:0\n", dns.config()),
        ..Default::default()
    })
    .await;
    let metrics = gw.metrics.expect("metrics listener");

    // Everything inside one STARTTLS session: a delivery, a DMARC reject, relay denied.
    let (mut client, _) = gw.ehlo().await;
    assert_eq!(client.cmd("STARTTLS").await.code, 220);
    let (mut client, _) = client.starttls(&gw.cert(), "mx.example.test").await;
    assert_eq!(client.cmd("EHLO client.example.net").await.code, 250);
    let reply = client
        .send_mail(
            "alice@good.test",
            &["bob@example.test"],
            &message("alice@good.test", "delivered"),
        )
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    let reply = client
        .send_mail(
            "ceo@spoofed.test",
            &["bob@example.test"],
            &message("ceo@spoofed.test", "spoofed"),
        )
        .await;
    assert_eq!(reply.code, 550, "DMARC reject: {reply}");
    assert_eq!(client.cmd("MAIL FROM:<alice@good.test>").await.code, 250);
    let reply = client.cmd("RCPT TO:<someone@elsewhere.test>").await;
    assert_eq!(reply.code, 550, "relay denied: {reply}");
    assert_eq!(client.cmd("QUIT").await.code, 221);
    assert_eq!(gw.delivered().len(), 1);

    let (status, body) = http_get(metrics, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "mxgate_transactions_total",
        "mxgate_smtp_replies_total",
        "mxgate_tls_handshakes_total",
        "mxgate_auth_results_total",
        "mxgate_dmarc_actions_total",
        "mxgate_backend_deliveries_total",
        "mxgate_dns_lookups_total",
        "mxgate_build_info",
    ] {
        assert!(
            body.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{body}"
        );
    }
    let (ok, problems) = run_promtool(&["check", "metrics"], Some(&body));
    assert!(
        ok && problems.trim().is_empty(),
        "promtool check metrics:\n{problems}\n--- exposition ---\n{body}"
    );

    let (status, body) = http_get(metrics, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // The Maildir is probed at start; give the probe a moment on a busy machine.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http_get(metrics, "/readyz").await;
        if status == 200 {
            assert_eq!(body, "ready\n");
            break;
        }
        assert!(Instant::now() < deadline, "/readyz: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A reload builds new backends; their health carries over, so readiness does not
    // drop until the next probe round.
    gw.running.as_ref().unwrap().reload().expect("reload");
    let (status, body) = http_get(metrics, "/readyz").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "ready\n"),
        "right after a reload"
    );
    let (status, _) = http_get(metrics, "/nothing-here").await;
    assert_eq!(status, 404);
    gw.stop().await;
}

/// Not ready while no backend answers; alive all the same.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_fails_without_a_reachable_backend() {
    let dead = support::backend::dead_address().await;
    let gw = Gateway::start(TestConfig {
        backends: vec![format!("smtp://{dead}")],
        extra: "metrics:\n  listen: 127.0.0.1:0\n".into(),
        ..Default::default()
    })
    .await;
    let metrics = gw.metrics.expect("metrics listener");
    let (status, body) = http_get(metrics, "/readyz").await;
    assert_eq!(
        (status, body.trim()),
        (503, "not ready: no backend reachable recently")
    );
    let (status, _) = http_get(metrics, "/healthz").await;
    assert_eq!(status, 200);
    gw.stop().await;
}

/// A session from `source` that says EHLO.
async fn session(smtp: SocketAddr, source: &str) -> SmtpClient {
    let (mut client, greeting) = SmtpClient::connect_from(smtp, source).await;
    assert_eq!(greeting.code, 220, "{greeting}");
    assert_eq!(client.cmd("EHLO client.example.net").await.code, 250);
    client
}

#[tokio::test(flavor = "multi_thread")]
async fn counters_match_the_traffic() {
    const DELIVERED: usize = 7;
    const DMARC_REJECTED: usize = 3;
    const RELAY_DENIED: usize = 2;

    let dns = TestDns::start().await;
    dns.txt("sender.test", "v=spf1 ip4:127.0.0.1 -all");
    dns.txt("_dmarc.sender.test", "v=DMARC1; p=reject");
    let dkim = DkimKey::ed25519("sender.test", "ed1");
    dkim.publish(&dns);
    dns.txt("bank.test", "v=spf1 ip4:192.0.2.1 -all");
    dns.txt("_dmarc.bank.test", "v=DMARC1; p=reject");

    // A separate process: its registry sees only this test's traffic.
    let dir = tempfile::tempdir().unwrap();
    let config = TestConfig {
        extra: format!("{}metrics:\n  listen: 127.0.0.1:0\n", dns.config()),
        ..Default::default()
    };
    let config_path = dir.path().join("mxgate.yaml");
    std::fs::write(&config_path, config.yaml(dir.path())).unwrap();
    let gateway = GatewayProcess::spawn(&config_path);
    let metrics = gateway.metrics.expect("metrics listener");
    let before = scrape(metrics).await;

    // Session 1: aligned, signed mail from an SPF-authorised host.
    let mut client = session(gateway.smtp, "127.0.0.1").await;
    for n in 0..DELIVERED {
        let signed = dkim.sign(&message("alice@sender.test", &format!("ok-{n}")));
        let reply = client
            .send_mail("alice@sender.test", &["bob@example.test"], &signed)
            .await;
        assert_eq!(reply.code, 250, "{reply}");
    }
    assert_eq!(client.cmd("QUIT").await.code, 221);
    // Session 2: bank.test spoofed; DMARC fails with p=reject.
    let mut client = session(gateway.smtp, "127.0.0.1").await;
    for n in 0..DMARC_REJECTED {
        let reply = client
            .send_mail(
                "ceo@bank.test",
                &["bob@example.test"],
                &message("ceo@bank.test", &format!("spoof-{n}")),
            )
            .await;
        assert_eq!((reply.code, reply.status()), (550, "5.7.1"), "{reply}");
    }
    assert_eq!(client.cmd("QUIT").await.code, 221);
    // Session 3: recipients in domains we do not serve; QUIT abandons the transaction.
    let mut client = session(gateway.smtp, "127.0.0.1").await;
    assert_eq!(client.cmd("MAIL FROM:<alice@sender.test>").await.code, 250);
    for n in 0..RELAY_DENIED {
        let reply = client
            .cmd(&format!("RCPT TO:<user{n}@elsewhere.test>"))
            .await;
        assert_eq!(reply.code, 550, "{reply}");
    }
    assert_eq!(client.cmd("QUIT").await.code, 221);

    let (d, r, x) = (DELIVERED as f64, DMARC_REJECTED as f64, RELAY_DENIED as f64);
    let messages = d + r;
    let sessions = 3.0;
    // (metric, labels the series must have, expected increase)
    let expected: Vec<(&str, &str, f64)> = vec![
        (
            "mxgate_transactions_total",
            "outcome=delivered,reply_class=2xx",
            d,
        ),
        (
            "mxgate_transactions_total",
            "outcome=rejected,reply_class=5xx",
            r,
        ),
        (
            "mxgate_transactions_total",
            "outcome=aborted,reply_class=none",
            1.0,
        ),
        ("mxgate_transactions_total", "", d + r + 1.0),
        // Per session: greeting, EHLO and QUIT; per message: MAIL, RCPT, 354 for DATA
        // and the final reply (2xx unless rejected); session 3: MAIL.
        (
            "mxgate_smtp_replies_total",
            "class=2xx",
            3.0 * sessions + 3.0 * d + 2.0 * r + 1.0,
        ),
        ("mxgate_smtp_replies_total", "class=3xx", messages),
        ("mxgate_smtp_replies_total", "class=4xx", 0.0),
        ("mxgate_smtp_replies_total", "class=5xx", r + x),
        ("mxgate_auth_results_total", "check=dmarc,result=pass", d),
        ("mxgate_auth_results_total", "check=dmarc,result=fail", r),
        ("mxgate_auth_results_total", "check=dmarc", messages),
        // One result per signature; unsigned mail counts once as `none`, as its
        // Authentication-Results says.
        ("mxgate_auth_results_total", "check=dkim,result=pass", d),
        ("mxgate_auth_results_total", "check=dkim,result=none", r),
        ("mxgate_auth_results_total", "check=dkim", messages),
        (
            "mxgate_auth_results_total",
            "check=arc,result=none",
            messages,
        ),
        // SPF per MAIL FROM (session 3's included), HELO SPF per EHLO, iprev per
        // connection.
        (
            "mxgate_auth_results_total",
            "check=spf,result=pass",
            d + 1.0,
        ),
        ("mxgate_auth_results_total", "check=spf,result=fail", r),
        ("mxgate_auth_results_total", "check=helo_spf", sessions),
        ("mxgate_auth_results_total", "check=iprev", sessions),
        ("mxgate_dmarc_actions_total", "action=reject", r),
        ("mxgate_dmarc_actions_total", "", r),
        ("mxgate_backend_deliveries_total", "result=accepted", d),
        ("mxgate_backend_deliveries_total", "", d),
        ("mxgate_backend_delivery_duration_seconds_count", "", d),
        ("mxgate_message_size_bytes_count", "", messages),
        (
            "mxgate_stage_duration_seconds_count",
            "stage=end_of_data",
            messages,
        ),
        (
            "mxgate_stage_duration_seconds_count",
            "stage=transaction",
            d + r + 1.0,
        ),
        ("mxgate_connections_total", "", sessions),
        (
            "mxgate_connect_to_greeting_duration_seconds_count",
            "",
            sessions,
        ),
        ("mxgate_session_duration_seconds_count", "", sessions),
        ("mxgate_connections_refused_total", "", 0.0),
        ("mxgate_tls_handshakes_total", "", 0.0),
        ("mxgate_policy_rule_hits_total", "", 0.0),
        ("mxgate_arc_seals_total", "", 0.0),
        ("mxgate_arc_overrides_total", "", 0.0),
        ("mxgate_backend_errors_total", "", 0.0),
        ("mxgate_config_reloads_total", "", 0.0),
    ];

    // Checks started at connect, EHLO and MAIL finish in the background, and
    // sessions close after QUIT: wait until the numbers settle.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let after = scrape(metrics).await;
        let mismatches: Vec<String> = expected
            .iter()
            .filter_map(|(name, spec, want)| {
                let labels = label_spec(spec);
                let delta = sum(&after, name, &labels) - sum(&before, name, &labels);
                (delta != *want).then(|| format!("{name}{{{spec}}}: delta {delta}, want {want}"))
            })
            .chain(
                (sum(&after, "mxgate_connections_current", &[]) != 0.0)
                    .then(|| "mxgate_connections_current is not back to 0".to_string()),
            )
            .collect();
        if mismatches.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "counters do not match the traffic:\n{}\n\nlog:\n{}",
            mismatches.join("\n"),
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = scrape(metrics).await;
    assert_eq!(
        sum(&after, "mxgate_config_generation", &[]),
        1.0,
        "no reload happened"
    );
    assert_eq!(sum(&after, "mxgate_build_info", &[]), 1.0);
    assert_eq!(
        sum(
            &after,
            "mxgate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
}

#[tokio::test]
async fn alert_rules_are_valid() {
    let rules = repo_file("deploy/prometheus/alerts.yaml");
    let (ok, output) = run_promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert!(ok, "promtool check rules:\n{output}");
    assert!(output.contains("SUCCESS"), "{output}");
    // The alerts' own unit tests (fire when they should, resolve when they should).
    let tests = repo_file("deploy/prometheus/alerts_test.yaml");
    let (ok, output) = run_promtool(&["test", "rules", tests.to_str().unwrap()], None);
    assert!(
        ok && output.contains("SUCCESS"),
        "promtool test rules:\n{output}"
    );
    let config = repo_file("deploy/prometheus/prometheus.yml");
    let (ok, output) = run_promtool(&["check", "config", config.to_str().unwrap()], None);
    assert!(ok, "promtool check config:\n{output}");
    // The alerts the deployment relies on are there.
    let text = std::fs::read_to_string(&rules).unwrap();
    for alert in [
        "MxgateBackendDown",
        "MxgateAllBackendsDown",
        "MxgateNoSuccessfulDelivery",
        "MxgateTempfailRateHigh",
        "MxgateTlsHandshakeFailuresRising",
        "MxgateCertificateExpiringSoon",
        "MxgateConfigReloadFailed",
    ] {
        assert!(
            text.contains(&format!("alert: {alert}\n")),
            "{alert} missing"
        );
    }
    assert!(text.contains("14 * 86400"), "certificate expiry threshold");
}

#[tokio::test]
async fn dashboard_queries_are_valid_promql() {
    let text = std::fs::read_to_string(repo_file("grafana/mxgate.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        dashboard["schemaVersion"]
            .as_i64()
            .is_some_and(|v| (36..=41).contains(&v)),
        "schemaVersion {}",
        dashboard["schemaVersion"]
    );
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "no datasource variable"
    );
    // Every panel and every target queries the chosen data source.
    let mut ids = std::collections::HashSet::new();
    let panels = dashboard["panels"].as_array().unwrap();
    for panel in panels {
        assert!(ids.insert(panel["id"].as_i64().unwrap()), "duplicate id");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {}",
            panel["title"]
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}");
            let expr = target["expr"].as_str().unwrap();
            if expr.contains("rate(") || expr.contains("increase(") {
                assert!(
                    expr.contains("[$__rate_interval]"),
                    "panel {}: use $__rate_interval in {expr}",
                    panel["title"]
                );
            }
        }
    }

    let queries = dashboard_queries();
    assert!(queries.len() >= 30, "only {} queries", queries.len());
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, (origin, expr, _)) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "      # {origin}\n      - record: dashboard:query_{n}\n        expr: {}\n",
            serde_json::to_string(&substitute(expr)).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-rules.yaml");
    std::fs::write(&path, &rules).unwrap();
    let (ok, output) = run_promtool(&["check", "rules", path.to_str().unwrap()], None);
    assert!(
        ok,
        "promtool check rules:\n{output}\n--- rules ---\n{rules}"
    );
    assert!(
        output.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{output}"
    );
}

// ------------------------------------------------------------------------------------
// A real Prometheus.

struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(targets: &[SocketAddr]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let targets = targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files: [{}]\nscrape_configs:\n  - job_name: mxgate\n    static_configs:\n      - targets: [{targets}]\n",
            serde_json::to_string(repo_file("deploy/prometheus/alerts.yaml").to_str().unwrap())
                .unwrap()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok()
                && http_get(addr, "/-/ready").await.0 == 200
            {
                return prometheus;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus did not become ready:\n{}",
                prometheus.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn api(&self, target: &str) -> serde_json::Value {
        let (status, body) = http_get(self.addr, target).await;
        let value: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{target}: {status} {e}: {body}"));
        assert_eq!(value["status"], "success", "{target}: {body}");
        value["data"].clone()
    }

    /// The result vector of an instant query.
    async fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let data = self
            .api(&format!("/api/v1/query?query={}", percent_encode(expr)))
            .await;
        data["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Rules for the gateway under test: a connect-time block (enforced) and a shadow rule
/// that watches DMARC failures.
const POLICY: &str = r#"rules:
  - name: block-listed-ip
    match: { client_ip: 127.0.0.9 }
    action: reject
    reply: { code: 554, status: "5.7.1", text: "Your address is blocked" }
  - name: watch-dmarc-failures
    match: { dmarc: fail }
    action: reject
    mode: shadow
"#;

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_and_every_dashboard_query_returns_data() {
    if !Path::new(PROMETHEUS).exists() {
        support::skip(format!(
            "{PROMETHEUS} is not installed (Debian package `prometheus`; CI installs it)"
        ));
        return;
    }
    let started = Instant::now();
    let dns = TestDns::start().await;
    // sender.test: only 127.0.0.5 may send for it; p=reject; an aligned DKIM key.
    dns.txt("sender.test", "v=spf1 ip4:127.0.0.5 -all");
    dns.txt("_dmarc.sender.test", "v=DMARC1; p=reject");
    let dkim = DkimKey::ed25519("sender.test", "ed1");
    dkim.publish(&dns);
    // slow.test: its DMARC record never answers (temperror -> 451).
    dns.txt("slow.test", "v=spf1 ip4:127.0.0.5 -all");
    dns.timeout("_dmarc.slow.test");

    // The gateway under test (B), as a process: TLS, a dead first backend (failover to
    // the Maildir), DNS, ARC sealing that trusts edge.test, a policy, metrics.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let policy_path = dir.path().join("policies/rules.yaml");
    std::fs::write(&policy_path, POLICY).unwrap();
    let b_key = sealing_key(
        &dns,
        dir.path(),
        "mx-b.test",
        "s1",
        KeyAlgorithm::Ed25519,
        true,
    );
    let dead = support::backend::dead_address().await;
    let config = TestConfig {
        hostname: "mx-b.example.test".into(),
        backends: vec![
            format!("smtp://{dead}"),
            format!("maildir:{}", dir.path().join("mail").display()),
        ],
        extra: format!(
            "{}relay:\n  tls: off\narc:\n  domain: mx-b.test\n  selector: s1\n  private_key: {}\n  trusted_sealers: [\"edge.test\"]\npolicy:\n  files: [\"policies/*.yaml\"]\n  reload_interval: 200ms\nmetrics:\n  listen: 127.0.0.1:0\n",
            dns.config(),
            b_key.display()
        ),
        ..Default::default()
    };
    let config_path = dir.path().join("mxgate.yaml");
    std::fs::write(&config_path, config.yaml(dir.path())).unwrap();
    let b = GatewayProcess::spawn(&config_path);
    let metrics = b.metrics.expect("metrics listener");
    let prometheus = Prometheus::start(&[metrics]).await;
    // Prometheus applies new targets a few seconds after start: wait for the first
    // scrape, so the changes below (the reloads in particular) are seen happening.
    let deadline = Instant::now() + Duration::from_secs(20);
    while prometheus
        .query("mxgate_config_generation == 1")
        .await
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "prometheus does not scrape {metrics}:\n{}",
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The edge gateway (A), in-process: seals as edge.test and relays to B, so B sees
    // the message from 127.0.0.1 (SPF and DMARC fail) with a trusted seal.
    let edge_dir = tempfile::tempdir().unwrap();
    let a_key = sealing_key(
        &dns,
        edge_dir.path(),
        "edge.test",
        "arc2026",
        KeyAlgorithm::Ed25519,
        true,
    );
    let edge = Gateway::start(TestConfig {
        hostname: "mx-a.example.test".into(),
        backends: vec![format!("smtp://{}", b.smtp)],
        extra: format!(
            "{}relay:\n  tls: off\narc:\n  domain: edge.test\n  selector: arc2026\n  private_key: {}\n",
            dns.config(),
            a_key.display()
        ),
        ..Default::default()
    })
    .await;

    let signed = |subject: &str| dkim.sign(&message("alice@sender.test", subject));

    // Delivered: DKIM and SPF pass, sealed by B.
    let mut client = session(b.smtp, "127.0.0.5").await;
    for n in 0..3 {
        let reply = client
            .send_mail(
                "alice@sender.test",
                &["bob@example.test"],
                &signed(&format!("plain-{n}")),
            )
            .await;
        assert_eq!(reply.code, 250, "{reply}\n{}", b.log());
    }
    assert_eq!(client.cmd("QUIT").await.code, 221);
    // Delivered over STARTTLS.
    let mut client = session(b.smtp, "127.0.0.5").await;
    assert_eq!(client.cmd("STARTTLS").await.code, 220);
    let (mut client, _) = client
        .starttls(&dir.path().join("cert.pem"), "mx-b.example.test")
        .await;
    assert_eq!(client.cmd("EHLO client.example.net").await.code, 250);
    let reply = client
        .send_mail("alice@sender.test", &["bob@example.test"], &signed("tls"))
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(client.cmd("QUIT").await.code, 221);
    // A failed handshake: plaintext where the ClientHello should be.
    failed_handshake(b.smtp).await;
    // DMARC reject: spoofed From, unsigned, SPF fails.
    let reply = send_from(
        b.smtp,
        "127.0.0.66",
        "alice@sender.test",
        &message("alice@sender.test", "spoof"),
    )
    .await;
    assert_eq!(reply.code, 550, "{reply}");
    // DMARC temperror: 451.
    let reply = send_from(
        b.smtp,
        "127.0.0.5",
        "bob@slow.test",
        &message("bob@slow.test", "slow"),
    )
    .await;
    assert_eq!(reply.code, 451, "{reply}");
    // Relay denied.
    let mut client = session(b.smtp, "127.0.0.5").await;
    assert_eq!(client.cmd("MAIL FROM:<alice@sender.test>").await.code, 250);
    assert_eq!(
        client.cmd("RCPT TO:<someone@elsewhere.test>").await.code,
        550
    );
    assert_eq!(client.cmd("QUIT").await.code, 221);
    // Refused at connect by the policy.
    let (_, greeting) = SmtpClient::connect_from(b.smtp, "127.0.0.9").await;
    assert_eq!(greeting.code, 554, "{greeting}");
    // Through the edge: DMARC fails at B, the trusted seal overrides it.
    let reply = send_from(
        edge.smtp,
        "127.0.0.5",
        "alice@sender.test",
        &message("alice@sender.test", "via-edge"),
    )
    .await;
    assert_eq!(reply.code, 250, "through the edge: {reply}\n{}", b.log());

    // A reload that fails (broken policy file), then one that succeeds.
    let wait_for = |name: &'static str,
                    labels: &'static [(&'static str, &'static str)],
                    at_least: f64| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        while sum(&scrape(metrics).await, name, labels) < at_least {
            assert!(
                Instant::now() < deadline,
                "{name}{labels:?} stays below {at_least}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    std::fs::write(&policy_path, "rules:\n  - name: broken\n").unwrap();
    wait_for("mxgate_config_reloads_total", &[("result", "failure")], 1.0).await;
    // The failure series starts at 1, which increase() cannot see: let Prometheus
    // scrape it, then fail once more so the reload alerts have an increase to see.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    std::fs::write(&policy_path, "rules:\n  - name: broken-again\n").unwrap();
    wait_for("mxgate_config_reloads_total", &[("result", "failure")], 2.0).await;
    std::fs::write(&policy_path, format!("# fixed\n{POLICY}")).unwrap();
    wait_for("mxgate_config_reloads_total", &[("result", "success")], 1.0).await;

    // More traffic, so rates are not all zero.
    let mut client = session(b.smtp, "127.0.0.5").await;
    for n in 0..2 {
        let reply = client
            .send_mail(
                "alice@sender.test",
                &["bob@example.test"],
                &signed(&format!("later-{n}")),
            )
            .await;
        assert_eq!(reply.code, 250, "{reply}");
    }
    assert_eq!(client.cmd("QUIT").await.code, 221);

    // Every dashboard query (and the instance variable's source) returns data; the
    // labels legends refer to are on every series. No query is exempt: the traffic
    // above makes every panel's series exist (TLS on for the certificate expiry, a
    // failed handshake, a dead backend for failovers, the broken policy file for
    // reload failures, the edge's seal for ARC overrides).
    let mut queries = dashboard_queries();
    queries.push((
        "variable `instance`".into(),
        "mxgate_build_info".into(),
        "{{instance}}".into(),
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pending: Vec<(String, String, String)> = queries;
    let mut last_errors = Vec::new();
    while !pending.is_empty() {
        let mut still = Vec::new();
        last_errors.clear();
        for (origin, expr, legend) in pending {
            let expr_text = substitute(&expr);
            let result = prometheus.query(&expr_text).await;
            if result.is_empty() {
                last_errors.push(format!("{origin}: no data for {expr_text}"));
                still.push((origin, expr, legend));
                continue;
            }
            for label in legend_labels(&legend) {
                for series in &result {
                    assert!(
                        series["metric"].get(&label).is_some(),
                        "{origin}: legend uses {{{{{label}}}}} but the series has no such label: {series}\n{expr_text}"
                    );
                }
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dashboard queries without data:\n{}\n\nprometheus log:\n{}\nmxgate log:\n{}",
            last_errors.join("\n"),
            prometheus.log(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The scrape is healthy and every alert rule evaluates without error on real data.
    let targets = prometheus.api("/api/v1/targets").await;
    let active = targets["activeTargets"].as_array().unwrap();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0]["health"], "up", "{}", active[0]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let data = prometheus.api("/api/v1/rules").await;
        let rules: Vec<serde_json::Value> = data["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        assert!(rules.len() >= 7, "alert rules not loaded: {data}");
        for rule in &rules {
            assert_ne!(rule["health"], "err", "alert rule fails: {rule}");
        }
        if rules.iter().all(|r| r["health"] == "ok") {
            // The failed reload is visible to the quick alert.
            let failing = rules
                .iter()
                .find(|r| r["name"] == "MxgateConfigReloadFailing")
                .unwrap();
            if failing["state"] != "inactive" {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "alert rules not evaluated: {data}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    edge.stop().await;
    drop(b);
    drop(prometheus);
    eprintln!("prometheus test took {:?}", started.elapsed());
}

/// STARTTLS, then plaintext where the ClientHello should be: the server answers with
/// a TLS alert and closes.
async fn failed_handshake(smtp: SocketAddr) {
    let conversation = async {
        let mut tcp = tokio::net::TcpStream::connect(smtp).await?;
        let mut buf = vec![0u8; 4096];
        let mut seen = String::new();
        for command in ["EHLO client.example.net\r\n", "STARTTLS\r\n"] {
            let n = tcp.read(&mut buf).await?;
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            tcp.write_all(command.as_bytes()).await?;
        }
        // Read until the 220 reply to STARTTLS has arrived.
        while !seen.contains("220 2.0.0") {
            let n = tcp.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(seen.contains("220 2.0.0"), "no STARTTLS go-ahead: {seen}");
        tcp.write_all(b"this is not a TLS ClientHello\r\n").await?;
        let mut rest = Vec::new();
        tcp.read_to_end(&mut rest).await?;
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(15), conversation)
        .await
        .expect("failed handshake: timed out")
        .ok();
}

/// `{{name}}` placeholders of a legend format.
fn legend_labels(legend: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = legend;
    while let Some(start) = rest.find("{{") {
        let Some(end) = rest[start..].find("}}") else {
            break;
        };
        out.push(rest[start + 2..start + end].trim().to_string());
        rest = &rest[start + end + 2..];
    }
    out
}

/// One JSON log line per transaction with everything an admin asks about it, and never
/// the message content.
#[tokio::test(flavor = "multi_thread")]
async fn one_json_log_line_per_transaction_without_content() {
    let dns = TestDns::start().await;
    dns.txt("sender.test", "v=spf1 ip4:127.0.0.1 -all");
    dns.txt("_dmarc.sender.test", "v=DMARC1; p=reject");
    let dkim = DkimKey::ed25519("sender.test", "ed1");
    dkim.publish(&dns);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/tag.yaml"),
        "rules:\n  - name: tag-sender\n    match: { envelope_from: sender.test, spf: pass }\n    action: tag\n    header: \"X-Tagged: yes\"\n",
    )
    .unwrap();
    let config = TestConfig {
        extra: format!(
            "{}policy:\n  files: [\"policies/*.yaml\"]\nlog:\n  format: json\n",
            dns.config()
        ),
        ..Default::default()
    };
    let config_path = dir.path().join("mxgate.yaml");
    std::fs::write(&config_path, config.yaml(dir.path())).unwrap();
    let gateway = GatewayProcess::spawn(&config_path);

    let mut client = session(gateway.smtp, "127.0.0.1").await;
    let signed = dkim.sign(
        "From: alice@sender.test\nTo: bob@example.test\nSubject: Quarterly SECRET-SUBJECT\n\nSECRET-BODY-TEXT\n",
    );
    let reply = client
        .send_mail("alice@sender.test", &["bob@example.test"], &signed)
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(client.cmd("QUIT").await.code, 221);

    let deadline = Instant::now() + Duration::from_secs(10);
    let (line, log) = loop {
        let log = gateway.log();
        let line = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["target"] == "mxgate::transaction" && v["outcome"] == "delivered");
        if let Some(line) = line {
            break (line, log);
        }
        assert!(Instant::now() < deadline, "no transaction line:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The JSON format flattens the event's fields into the object.
    let fields = &line;
    let id = fields["id"].as_str().unwrap();
    assert!(!id.is_empty());
    assert!(
        reply.text().contains(id),
        "the reply names the transaction: {reply}"
    );
    for (key, want) in [
        ("client_ip", "127.0.0.1"),
        ("helo", "client.example.net"),
        ("tls", "none"),
        ("mail_from", "alice@sender.test"),
        ("rcpts", "bob@example.test"),
        ("rule", "tag-sender"),
        ("action", "deliver"),
        ("outcome", "delivered"),
    ] {
        assert_eq!(fields[key], want, "{key} in {line}");
    }
    let auth = fields["auth"].as_str().unwrap();
    for part in [
        "iprev=",
        "spf=pass(sender.test)",
        "helo_spf=",
        "dkim=pass(sender.test)",
        "arc=none",
        "dmarc=pass(sender.test)",
    ] {
        assert!(auth.contains(part), "{part} not in auth={auth}");
    }
    assert!(fields["backend"].as_str().unwrap().starts_with("maildir:"));
    assert!(fields["reply"].as_str().unwrap().starts_with("250 2.0.0"));
    assert!(fields["duration_ms"].is_u64(), "{line}");
    let transactions = log
        .lines()
        .filter(|l| l.contains("\"target\":\"mxgate::transaction\""))
        .count();
    assert_eq!(transactions, 1, "{log}");
    assert!(
        !log.contains("SECRET-BODY-TEXT") && !log.contains("SECRET-SUBJECT"),
        "message content in the log:\n{log}"
    );
}

/// A backend removed by a reload disappears from the health gauges (no alert for a
/// backend nobody runs any more).
#[tokio::test(flavor = "multi_thread")]
async fn removed_backends_leave_the_health_gauges() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("mxgate.yaml");
    let write = |backends: &[&str]| {
        let config = TestConfig {
            backends: backends
                .iter()
                .map(|b| format!("maildir:{}", dir.path().join(b).display()))
                .collect(),
            extra: "metrics:\n  listen: 127.0.0.1:0\npolicy:\n  reload_interval: 1h\n".into(),
            ..Default::default()
        };
        std::fs::write(&config_path, config.yaml(dir.path())).unwrap();
    };
    write(&["first", "second"]);
    let gateway = GatewayProcess::spawn(&config_path);
    let metrics = gateway.metrics.expect("metrics listener");
    let up = |samples: &[Sample], name: &str| {
        samples.iter().any(|s| {
            s.name == "mxgate_backend_up" && s.labels.iter().any(|(_, v)| v.ends_with(name))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let samples = scrape(metrics).await;
        if up(&samples, "/first") && up(&samples, "/second") {
            break;
        }
        assert!(Instant::now() < deadline, "both backends probed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    write(&["first"]);
    gateway.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let samples = scrape(metrics).await;
        if !up(&samples, "/second") {
            assert!(up(&samples, "/first"), "the remaining backend stays");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "removed backend still exported:\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
