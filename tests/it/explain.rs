//! `mxgate explain` runs the whole evaluation offline against the configured DNS.

use mxgate_test_kit as support;

use support::dkim::DkimKey;
use support::dns::TestDns;

fn write_config(dir: &std::path::Path, dns: &TestDns, trusted: &str) -> std::path::PathBuf {
    let path = dir.join("mxgate.yaml");
    std::fs::write(
        &path,
        format!(
            "server:\n  hostname: mx.example.test\n  listen: [\"127.0.0.1:0\"]\n  domains: [example.test]\n  trusted_networks: [{trusted}]\nbackend:\n  - maildir:./mail\n{}",
            dns.config()
        ),
    )
    .unwrap();
    path
}

async fn explain(
    config: &std::path::Path,
    ip: &str,
    message: &std::path::Path,
    json: bool,
) -> (i32, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mxgate"));
    command
        .arg("explain")
        .arg("--config")
        .arg(config)
        .args([
            "--ip",
            ip,
            "--helo",
            "mail.sender.test",
            "--mail-from",
            "alice@sender.test",
            "--rcpt",
            "bob@example.test",
        ])
        .arg(message);
    if json {
        command.arg("--json");
    }
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), stdout)
}

fn zone(dns: &TestDns) -> DkimKey {
    dns.txt("sender.test", "v=spf1 ip4:192.0.2.5 -all");
    dns.txt("_dmarc.sender.test", "v=DMARC1; p=reject");
    dns.txt("mail.sender.test", "v=spf1 ip4:192.0.2.5 -all");
    dns.ptr("192.0.2.5", "mail.sender.test");
    dns.a("mail.sender.test", "192.0.2.5");
    let key = DkimKey::rsa("sender.test", "s2026", 2048);
    key.publish(dns);
    key
}

const MESSAGE: &str = "From: alice@sender.test\nTo: bob@example.test\nSubject: hi\nDate: Mon, 23 Nov 2026 10:00:00 +0000\nMessage-ID: <1@sender.test>\n\nhello\n";

#[tokio::test(flavor = "multi_thread")]
async fn json_has_every_check_and_the_verdict() {
    let dns = TestDns::start().await;
    let key = zone(&dns);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &dns, "");
    let message = dir.path().join("m.eml");
    // LF line endings, as a file saved by a mail client would have.
    std::fs::write(&message, key.sign(MESSAGE).replace("\r\n", "\n")).unwrap();
    let (_, out) = explain(&config, "192.0.2.5", &message, true).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["spf"]["result"], "pass", "{v:#}");
    assert_eq!(v["spf"]["domain"], "sender.test");
    assert_eq!(v["helo_spf"]["result"], "pass");
    assert_eq!(v["dkim"][0]["result"], "pass");
    assert_eq!(v["dkim"][0]["domain"], "sender.test");
    assert_eq!(v["dkim"][0]["selector"], "s2026");
    assert_eq!(v["arc"]["result"], "none");
    assert_eq!(v["dmarc"]["result"], "pass");
    assert_eq!(v["dmarc"]["domain"], "sender.test");
    assert_eq!(v["dmarc"]["policy"], "reject");
    assert!(v["iprev"]["result"].is_string(), "{v:#}");
    assert_eq!(v["verdict"]["action"], "deliver");
    assert_eq!(v["verdict"]["code"], 250);
    assert_eq!(v["verdict"]["enhanced"], "2.0.0");
    assert!(v["verdict"]["text"].is_string());
    assert!(
        v["authentication_results"]
            .as_str()
            .unwrap()
            .starts_with("mx.example.test; iprev=")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_message_explains_the_rejection() {
    let dns = TestDns::start().await;
    zone(&dns);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &dns, "");
    let message = dir.path().join("m.eml");
    std::fs::write(&message, MESSAGE).unwrap();
    let (_, out) = explain(&config, "198.51.100.7", &message, true).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["spf"]["result"], "fail", "{v:#}");
    assert_eq!(v["dkim"].as_array().unwrap().len(), 0);
    assert_eq!(v["dmarc"]["result"], "fail");
    assert_eq!(v["verdict"]["action"], "reject");
    assert_eq!(v["verdict"]["code"], 550);
    assert_eq!(v["verdict"]["enhanced"], "5.7.1");
    assert!(
        v["verdict"]["text"]
            .as_str()
            .unwrap()
            .contains("sender.test")
    );

    let (_, text) = explain(&config, "198.51.100.7", &message, false).await;
    assert!(text.contains("dmarc       fail"), "{text}");
    assert!(text.contains("verdict     reject -> 550 5.7.1"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_client_is_not_checked() {
    let dns = TestDns::start().await;
    zone(&dns);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &dns, "\"198.51.100.0/24\"");
    let message = dir.path().join("m.eml");
    std::fs::write(&message, MESSAGE).unwrap();
    let (_, out) = explain(&config, "198.51.100.7", &message, true).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["client"]["trusted"], true);
    assert_eq!(v["verdict"]["action"], "deliver");
    // The contract's fields are there all the same, saying why nothing was checked.
    for check in ["spf", "helo_spf", "arc", "dmarc", "iprev"] {
        assert_eq!(v[check]["result"], "none", "{check}: {out}");
        assert_eq!(
            v[check]["reason"], "not checked: trusted network",
            "{check}"
        );
    }
    assert_eq!(v["dkim"], serde_json::json!([]));
}

/// A rule that refuses one recipient does so at RCPT live, and the message goes on to
/// the others; explain says the same.
#[tokio::test(flavor = "multi_thread")]
async fn a_recipient_refused_at_rcpt_is_explained() {
    let dns = TestDns::start().await;
    zone(&dns);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &dns, "");
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/p.yaml"),
        "rules:\n  - name: ceo-protection\n    match: { rcpt: ceo@example.test }\n    action: reject\n  - name: sender-host\n    match: { client_ip: 192.0.2.5 }\n    action: tag\n    header: \"X-Known: yes\"\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{text}policy:\n  files: [\"policies/*.yaml\"]\n"),
    )
    .unwrap();
    let message = dir.path().join("m.eml");
    std::fs::write(&message, MESSAGE).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mxgate"));
    command
        .args(["explain", "--config"])
        .arg(&config)
        .args(["--ip", "192.0.2.5", "--helo", "mail.sender.test"])
        .args(["--mail-from", "alice@sender.test"])
        .args([
            "--rcpt",
            "bob@example.test",
            "--rcpt",
            "ceo@example.test",
            "--json",
        ])
        .arg(&message);
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["refused_rcpts"][0]["rcpt"], "ceo@example.test", "{out}");
    assert_eq!(v["refused_rcpts"][0]["rule"], "ceo-protection", "{out}");
    assert_eq!(v["refused_rcpts"][0]["code"], 550, "{out}");
    assert_eq!(v["refused_rcpts"].as_array().unwrap().len(), 1, "{out}");
    // bob's copy: the next rule tags it, and it is delivered.
    assert_eq!(v["policy"]["rule"], "sender-host", "{out}");
    assert_eq!(v["verdict"]["action"], "deliver", "{out}");
}

/// A permerror says why, in the text and in `--json` (`reason`, `reason_kind`).
#[tokio::test(flavor = "multi_thread")]
async fn spf_errors_carry_their_reason() {
    let dns = TestDns::start().await;
    dns.txt("sender.test", "v=spf1 ip4:192.0.2.5 -all");
    dns.txt("sender.test", "v=spf1 -all");
    dns.txt(
        "mail.sender.test",
        "v=spf1 a:v1.sender.test a:v2.sender.test a:v3.sender.test -all",
    );
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &dns, "");
    let message = dir.path().join("m.eml");
    std::fs::write(&message, MESSAGE).unwrap();
    let (_, out) = explain(&config, "192.0.2.5", &message, true).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["spf"]["result"], "permerror", "{v:#}");
    assert_eq!(v["spf"]["reason"], "two v=spf1 records at sender.test");
    assert_eq!(v["spf"]["reason_kind"], "multiple_records");
    assert_eq!(v["helo_spf"]["result"], "permerror", "{v:#}");
    assert_eq!(v["helo_spf"]["reason_kind"], "void_lookup_limit");
    assert!(
        v["authentication_results"]
            .as_str()
            .unwrap()
            .contains("spf=permerror"),
        "{v:#}"
    );

    let (_, text) = explain(&config, "192.0.2.5", &message, false).await;
    assert!(
        text.contains(
            "spf         permerror sender.test (alice@sender.test): two v=spf1 records at sender.test"
        ),
        "{text}"
    );
    assert!(text.contains("void lookup limit"), "{text}");
}
