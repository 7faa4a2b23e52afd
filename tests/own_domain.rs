//! The own-domain guard (`dmarc.protect_own_domains`) and the sender recipes in
//! `policies/recipes/`, over real SMTP with a real DNS server: a spoof of our own
//! domain under `p=none`, Netigate sending as our own addresses from the servers in
//! its SPF record, `mxgate explain` showing the guard's decision, and `mxgate check`
//! verifying enabled recipes against DNS.

use mxgate_test_kit as support;

use std::net::SocketAddr;
use support::client::{Reply, SmtpClient};
use support::dns::TestDns;
use support::gateway::{Gateway, TestConfig};
use support::mail;
use support::prom;

/// example.test is ours and publishes `p=none`, as most company domains do: DMARC alone
/// would deliver a spoof. Netigate's SPF records list 192.0.2.30 and 192.0.2.31.
fn zone(dns: &TestDns) {
    dns.txt("example.test", "v=spf1 ip4:198.51.100.1 -all");
    dns.txt("_dmarc.example.test", "v=DMARC1; p=none");
    dns.txt("attacker.test", "v=spf1 +all");
    dns.txt("_spf.netigate.se", "v=spf1 ip4:192.0.2.30 -all");
    dns.txt("_spf.ntgt.de", "v=spf1 ip4:192.0.2.31 -all");
}

fn recipe(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("policies/recipes")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A gateway with the given recipes enabled and metrics on; `extra` is top-level YAML.
async fn gateway(dns: &TestDns, recipes: &[&str], extra: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    for name in recipes {
        std::fs::write(dir.path().join("policies").join(name), recipe(name)).unwrap();
    }
    let config = TestConfig {
        extra: format!(
            "{}policy:\n  files: [\"policies/*.yaml\"]\nmetrics:\n  listen: 127.0.0.1:0\n{extra}",
            dns.config()
        ),
        ..Default::default()
    };
    let yaml = config.yaml(dir.path());
    Gateway::start_yaml(dir, &yaml).await
}

fn message(from: &str, subject: &str) -> String {
    mail::message(from, subject)
        .to("staff@example.test")
        .id_domain("x.test")
        .body("Please pay the attached invoice today.\n")
        .text()
}

async fn send(gw: &Gateway, source: &str, mail_from: &str, data: &str) -> Reply {
    let (mut client, _) = if source == "127.0.0.1" {
        SmtpClient::connect(gw.smtp).await
    } else {
        assert!(support::net::source_address(source), "need {source}");
        SmtpClient::connect_from(gw.smtp, source).await
    };
    assert_eq!(client.cmd("EHLO sender.host.test").await.code, 250);
    client
        .send_mail(mail_from, &["staff@example.test"], data)
        .await
}

/// `mxgate_rejections_total{reason}` from /metrics.
async fn rejections(metrics: SocketAddr, reason: &str) -> f64 {
    let series = format!("mxgate_rejections_total{{reason=\"{reason}\"}}");
    prom::value(&prom::exposition(metrics).await, &series)
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spoof_of_our_own_domain_under_p_none_is_refused_by_default() {
    let dns = TestDns::start().await;
    zone(&dns);
    let gw = gateway(&dns, &[], "").await;
    let metrics = gw.metrics.unwrap();
    // The attacker's own envelope passes SPF; DMARC for example.test fails (not
    // aligned), and p=none would let it through.
    for (n, from) in ["CEO <ceo@example.test>", "ceo@HR.Example.Test"]
        .iter()
        .enumerate()
    {
        let reply = send(
            &gw,
            "127.0.0.1",
            "ceo@attacker.test",
            &message(from, &format!("spoof{n}")),
        )
        .await;
        assert_eq!(
            (reply.code, reply.status()),
            (550, "5.7.1"),
            "{from}: {reply}"
        );
        assert!(
            reply.text().contains("our own domain"),
            "a clear text: {reply}"
        );
    }
    assert!(gw.delivered().is_empty());
    assert_eq!(rejections(metrics, "own_domain").await, 2.0);
    assert_eq!(rejections(metrics, "dmarc").await, 0.0);
    // Someone else's domain under p=none is not the guard's business.
    let reply = send(
        &gw,
        "127.0.0.1",
        "ceo@attacker.test",
        &message("ceo@attacker.test", "other"),
    )
    .await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(gw.delivered().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_guard_off_the_spoof_is_delivered() {
    let dns = TestDns::start().await;
    zone(&dns);
    let gw = gateway(&dns, &[], "dmarc:\n  protect_own_domains: false\n").await;
    let reply = send(
        &gw,
        "127.0.0.1",
        "ceo@attacker.test",
        &message("CEO <ceo@example.test>", "spoof"),
    )
    .await;
    assert_eq!(reply.code, 250, "{reply}");
    let delivered = gw.delivered();
    assert_eq!(delivered.len(), 1);
    assert!(
        delivered[0].contains("dmarc=fail"),
        "DMARC failed, p=none delivered it: {}",
        delivered[0]
    );
}

/// The recipe `netigate-own-domain.yaml`: a server in `_spf.netigate.se` may send as our
/// own addresses; the same From from anywhere else is refused by the guard.
#[tokio::test(flavor = "multi_thread")]
async fn netigate_may_send_as_our_domain_from_its_spf_servers_only() {
    let dns = TestDns::start().await;
    zone(&dns);
    let gw = gateway(&dns, &["netigate-own-domain.yaml"], "").await;
    let survey = message("HR <first.last@example.test>", "survey");
    let reply = send(&gw, "192.0.2.30", "first.last@example.test", &survey).await;
    assert_eq!(reply.code, 250, "Netigate's server: {reply}");
    let delivered = gw.delivered();
    assert_eq!(delivered.len(), 1);
    assert!(
        delivered[0].contains("netigate-as-own-domain"),
        "the override names the recipe's rule: {}",
        delivered[0]
    );
    // The same From, from a server Netigate does not list.
    let reply = send(&gw, "127.0.0.1", "first.last@example.test", &survey).await;
    assert_eq!((reply.code, reply.status()), (550, "5.7.1"), "{reply}");
    assert!(reply.text().contains("our own domain"), "{reply}");
    // Netigate's server, but a From that is not ours: `own_domain: true` does not hold,
    // so the recipe does not decide (this domain has no DMARC record: delivered).
    let reply = send(
        &gw,
        "192.0.2.30",
        "x@attacker.test",
        &message("x@attacker.test", "not-ours"),
    )
    .await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(gw.delivered().len(), 2);
}

fn write_config(
    dir: &std::path::Path,
    dns: &TestDns,
    files: &[&str],
    extra: &str,
) -> std::path::PathBuf {
    std::fs::create_dir_all(dir.join("recipes")).unwrap();
    std::fs::create_dir_all(dir.join("mail")).unwrap();
    let mut list = Vec::new();
    for name in files {
        std::fs::write(dir.join("recipes").join(name), recipe(name)).unwrap();
        list.push(format!("\"recipes/{name}\""));
    }
    let path = dir.join("mxgate.yaml");
    std::fs::write(
        &path,
        format!(
            "server:\n  hostname: mx.example.test\n  listen: [\"127.0.0.1:0\"]\n  domains: [example.test]\nbackend: [\"maildir:./mail\"]\n{}policy:\n  files: [{}]\n{extra}",
            dns.config(),
            list.join(", ")
        ),
    )
    .unwrap();
    path
}

fn run(args: Vec<String>) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_mxgate"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_shows_the_guards_decision() {
    let dns = TestDns::start().await;
    zone(&dns);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &dns, &["netigate-own-domain.yaml"], "");
    let eml = dir.path().join("m.eml");
    std::fs::write(&eml, message("first.last@example.test", "survey")).unwrap();
    let explain = |ip: &str, json: bool| {
        let mut args: Vec<String> = vec![
            "explain".into(),
            "--config".into(),
            config.display().to_string(),
            "--ip".into(),
            ip.into(),
            "--helo".into(),
            "sender.host.test".into(),
            "--mail-from".into(),
            "first.last@example.test".into(),
            "--rcpt".into(),
            "staff@example.test".into(),
        ];
        if json {
            args.push("--json".into());
        }
        args.push(eml.display().to_string());
        tokio::task::spawn_blocking(move || run(args))
    };
    let out = explain("203.0.113.9", true).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(v["own_domain_guard"]["decision"], "refuse", "{text}");
    assert_eq!(v["own_domain_guard"]["domain"], "example.test", "{text}");
    assert_eq!(v["verdict"]["code"], 550, "{text}");
    assert_eq!(v["verdict"]["enhanced"], "5.7.1", "{text}");
    let out = explain("192.0.2.30", true).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(v["own_domain_guard"]["decision"], "pass", "{text}");
    assert_eq!(v["policy"]["rule"], "netigate-as-own-domain", "{text}");
    assert_eq!(v["verdict"]["action"], "deliver", "{text}");
    let out = explain("203.0.113.9", false).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("own domain  refuse    header.from=example.test"),
        "{text}"
    );
}

async fn check(config: std::path::PathBuf) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let out = run(vec![
            "check".into(),
            "--config".into(),
            config.display().to_string(),
        ]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn check_verifies_enabled_recipes_against_dns() {
    let dns = TestDns::start().await;
    dns.txt("_spf.netigate.se", "v=spf1 ip4:192.0.2.30 -all");
    // _spf.ntgt.de is missing; Visma's host has an address whose PTR names another host.
    dns.a("smtp.od.visma.fi", "192.0.2.20");
    dns.ptr("192.0.2.20", "other.host.test");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &dns,
        &["netigate-own-domain.yaml", "visma-erp.yaml"],
        "",
    );
    let (ok, stderr) = check(config.clone()).await;
    assert!(ok, "warnings do not fail the check: {stderr}");
    let netigate = dir.path().join("recipes/netigate-own-domain.yaml");
    let visma = dir.path().join("recipes/visma-erp.yaml");
    assert!(
        stderr.contains(&format!("{}:", netigate.display()))
            && stderr.contains(
                "warning: _spf.ntgt.de publishes no SPF record; rule `netigate-as-own-domain` cannot match through it"
            ),
        "{stderr}"
    );
    assert!(!stderr.contains("_spf.netigate.se"), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:", visma.display()))
            && stderr.contains("warning: smtp.od.visma.fi is not forward-confirmed")
            && stderr.contains("192.0.2.20 -> other.host.test"),
        "{stderr}"
    );
    // Published properly: no warnings left.
    dns.txt("_spf.ntgt.de", "v=spf1 ip4:192.0.2.31 -all");
    dns.remove(&support::dns::reverse_name("192.0.2.20".parse().unwrap()));
    dns.ptr("192.0.2.20", "smtp.od.visma.fi");
    let (ok, stderr) = check(config.clone()).await;
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    // A host without any address.
    dns.remove("smtp.od.visma.fi");
    let (_, stderr) = check(config).await;
    assert!(
        stderr.contains("warning: smtp.od.visma.fi has no A or AAAA record"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn own_domain_alone_is_not_evidence() {
    let dns = TestDns::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &dns, &[], "");
    std::fs::write(
        dir.path().join("recipes/mine.yaml"),
        "rules:\n  - name: ours\n    match: { own_domain: true }\n    action: accept\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("files: []", "files: [\"recipes/mine.yaml\"]");
    std::fs::write(&config, text).unwrap();
    let (ok, stderr) = check(config).await;
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains(
            "mine.yaml:3:12: rule `ours`: an `accept` rule that matches only on addresses"
        ),
        "{stderr}"
    );
}
