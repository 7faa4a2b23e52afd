//! `mxgate check` on policy files: every error at once, each with file, line, column and
//! the rule; the anti-spoofing rule; warnings about SPF records the rules rely on.

use mxgate_test_kit as support;

use support::dns::TestDns;

fn write(dir: &std::path::Path, name: &str, text: &str) {
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("policies").join(name), text).unwrap();
}

fn config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("mxgate.yaml");
    std::fs::write(
        &path,
        format!("server:\n  hostname: mx.example.test\n  listen: [\"127.0.0.1:0\"]\n  domains: [example.test]\nbackend: [\"maildir:./mail\"]\npolicy:\n  files: [\"policies/*.yaml\"]\n{extra}"),
    )
    .unwrap();
    path
}

async fn check(config: &std::path::Path) -> (bool, String) {
    let config = config.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mxgate"))
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn all_errors_at_once_with_positions_and_rules() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.yaml",
        "rules:\n  - name: typo\n    match: { clinet_ip: 1.2.3.4 }\n    action: accept\n  - name: bad-net\n    match:\n      client_ip: [10.0.0.0/8, 300.0.0.0/8]\n    action: accept\n  - name: spoofable\n    match:\n      header_from: ceo@example.test\n    action: accept\n",
    );
    write(
        dir.path(),
        "b.yaml",
        "rules:\n  - name: bad-reply\n    match: { client_ip: 192.0.2.1 }\n    action: reject\n    reply: { code: 250, text: oops }\n  - name: tls-late\n    match: { dkim_domain: x.test }\n    action: require_tls\n  - name: typo\n    match: { client_ip: 192.0.2.2 }\n    action: accept\n  - name: wrong-action\n    match: { client_ip: 192.0.2.3 }\n    action: acept\n",
    );
    let config = config(dir.path(), "");
    let (ok, stderr) = check(&config).await;
    assert!(!ok, "{stderr}");
    let a = dir.path().join("policies/a.yaml").display().to_string();
    let b = dir.path().join("policies/b.yaml").display().to_string();
    let expected = [
        format!("{a}:3:14: rule `typo`: rules[0].match.clinet_ip: unknown field `clinet_ip`"),
        format!("{a}:7:31: rule `bad-net`: `300.0.0.0/8` is not an IP address or network"),
        format!("{a}:11:7: rule `spoofable`: an `accept` rule that matches only on addresses"),
        format!("{b}:5:20: rule `bad-reply`: a reject reply needs a 5xx code, not 250"),
        format!("{b}:7:27: rule `tls-late`: `dkim_domain` cannot be used in a require_tls rule"),
        format!("{b}:9:11: rule `typo`: the name is already used at {a}:2"),
        format!("{b}:14:13: rule `wrong-action`: rules[3].action: unknown variant `acept`"),
    ];
    for want in &expected {
        assert!(
            stderr.lines().any(|l| l.starts_with(want.as_str())),
            "missing {want:?} in:\n{stderr}"
        );
    }
    let errors = stderr
        .lines()
        .filter(|l| !l.contains(": warning: "))
        .count();
    assert_eq!(errors, expected.len(), "{stderr}");
}

/// An unknown key does not hide the other errors in its rule's conditions; the action
/// and the rule as a whole are not judged without what was left out (a `match`
/// without its typo'd condition would look empty, a `tag` whose header had the wrong
/// type would look as if it had none).
#[tokio::test(flavor = "multi_thread")]
async fn errors_in_one_rule_do_not_hide_each_other() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.yaml",
        "rules:\n  - name: two-problems\n    match: { clinet_ip: 1.2.3.4, spf: bogus }\n    action: accept\n  - name: tagger\n    match: { client_ip: 192.0.2.1 }\n    action: tag\n    header: [X-Foo]\n",
    );
    let config = config(dir.path(), "");
    let (ok, stderr) = check(&config).await;
    assert!(!ok, "{stderr}");
    let a = dir.path().join("policies/a.yaml").display().to_string();
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains(": warning: "))
        .collect();
    let expected = [
        format!("{a}:3:14: rule `two-problems`: rules[0].match.clinet_ip: unknown field"),
        format!("{a}:3:39: rule `two-problems`: `bogus` is not a result"),
        format!("{a}:8:13: rule `tagger`: rules[1].header: invalid type: sequence"),
    ];
    assert_eq!(errors.len(), expected.len(), "{stderr}");
    for (line, want) in errors.iter().zip(&expected) {
        assert!(line.starts_with(want.as_str()), "{want:?} in:\n{stderr}");
    }
}

/// `spf: pass` passes for whatever MAIL FROM domain the sender picked: it proves nothing
/// about a From or a HELO, only about an envelope sender the rule names.
#[tokio::test(flavor = "multi_thread")]
async fn spf_pass_is_evidence_only_for_the_envelope_sender() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.yaml",
        "rules:\n  - name: from-spf\n    match: { header_from: ceo@bank.test, spf: pass }\n    action: accept\n  - name: helo-spf\n    match: { helo: mail.bank.test, spf: pass }\n    action: accept\n  - name: envelope-spf\n    match: { envelope_from: bank.test, spf: pass }\n    action: accept\n",
    );
    let config = config(dir.path(), "");
    let (ok, stderr) = check(&config).await;
    assert!(!ok, "{stderr}");
    let a = dir.path().join("policies/a.yaml").display().to_string();
    for want in [
        format!("{a}:3:12: rule `from-spf`: an `accept` rule that matches only on addresses"),
        format!("{a}:6:12: rule `helo-spf`: an `accept` rule that matches only on addresses"),
    ] {
        assert!(
            stderr.lines().any(|l| l.starts_with(want.as_str())),
            "missing {want:?} in:\n{stderr}"
        );
    }
    assert!(!stderr.contains("envelope-spf"), "{stderr}");
}

/// `dmarc: pass` passes for whatever From domain the sender wrote: it proves nothing
/// about an envelope sender or a HELO, only about a From the rule names. And `spf: pass`
/// beside an envelope sender anyone can register (`*.com`) proves nothing either.
#[tokio::test(flavor = "multi_thread")]
async fn dmarc_pass_is_evidence_only_for_the_header_from() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.yaml",
        "rules:\n  - name: envelope-dmarc\n    match: { envelope_from: billing@partner.test, dmarc: pass }\n    action: accept\n  - name: helo-dmarc\n    match: { helo: mail.partner.test, dmarc: pass }\n    action: accept\n  - name: any-com-spf\n    match: { envelope_from: \"*.com\", spf: pass }\n    action: accept\n  - name: from-dmarc\n    match: { header_from: billing@partner.test, dmarc: pass }\n    action: accept\n  - name: own-dmarc\n    match: { own_domain: true, dmarc: pass }\n    action: accept\n",
    );
    let config = config(dir.path(), "");
    let (ok, stderr) = check(&config).await;
    assert!(!ok, "{stderr}");
    let a = dir.path().join("policies/a.yaml").display().to_string();
    for want in [
        format!("{a}:3:12: rule `envelope-dmarc`: an `accept` rule that matches only on addresses"),
        format!("{a}:6:12: rule `helo-dmarc`: an `accept` rule that matches only on addresses"),
        format!("{a}:9:12: rule `any-com-spf`: an `accept` rule that matches only on addresses"),
    ] {
        assert!(
            stderr.lines().any(|l| l.starts_with(want.as_str())),
            "missing {want:?} in:\n{stderr}"
        );
    }
    for fine in ["from-dmarc", "own-dmarc"] {
        assert!(!stderr.contains(fine), "{stderr}");
    }
}

/// `*@bank.test` reads as a pattern but would match only the address whose local part is
/// `*`: a rule that never matches. It is refused with the spelling that works.
#[tokio::test(flavor = "multi_thread")]
async fn a_star_local_part_is_refused_with_the_pattern_that_works() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.yaml",
        "rules:\n  - name: block-bank\n    match: { header_from: \"*@bank.test\" }\n    action: reject\n",
    );
    let (ok, stderr) = check(&config(dir.path(), "")).await;
    assert!(!ok, "{stderr}");
    let a = dir.path().join("policies/a.yaml").display().to_string();
    let want = format!(
        "{a}:3:27: rule `block-bank`: `*@bank.test` is not a pattern: write `bank.test` for every address in the domain, `*.bank.test` for its subdomains"
    );
    assert!(
        stderr.lines().any(|l| l.starts_with(want.as_str())),
        "missing {want:?} in:\n{stderr}"
    );
}

/// Evidence anyone can obtain is no evidence: a name under a top-level domain can be
/// registered by anyone, an address in 0.0.0.0/0 is everyone's. Each such `accept` rule
/// is refused at the pattern, and none of them is reported twice.
#[tokio::test(flavor = "multi_thread")]
async fn evidence_anyone_can_obtain_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.yaml",
        "rules:\n  - name: any-com-signer\n    match: { own_domain: true, dkim_domain: \"*.com\" }\n    action: accept\n  - name: any-com-host\n    match:\n      header_from: bank.test\n      client_host: [mail.bank.test, \"*.com\"]\n    action: accept\n  - name: everyone\n    match: { own_domain: true, client_ip: [192.0.2.0/24, 0.0.0.0/0, \"::/0\"] }\n    action: accept\n  - name: narrow\n    match: { own_domain: true, dkim_domain: \"*.mail.bank.test\", client_ip: 3.0.0.0/8 }\n    action: accept\n  - name: broad-reject-is-fine\n    match: { client_ip: 0.0.0.0/0, header_from: bank.test }\n    action: reject\n  - name: risk-taken\n    match: { own_domain: true, dkim_domain: \"*.com\" }\n    action: accept\n    unauthenticated: true\n",
    );
    let config = config(dir.path(), "");
    let (ok, stderr) = check(&config).await;
    assert!(!ok, "{stderr}");
    let a = dir.path().join("policies/a.yaml").display().to_string();
    for want in [
        format!("{a}:3:45: rule `any-com-signer`: `*.com` cannot authenticate a sender"),
        format!("{a}:8:37: rule `any-com-host`: `*.com` cannot authenticate a sender"),
        format!("{a}:11:58: rule `everyone`: `0.0.0.0/0` cannot authenticate a sender"),
        format!("{a}:11:69: rule `everyone`: `::/0` cannot authenticate a sender"),
    ] {
        assert!(
            stderr.lines().any(|l| l.starts_with(want.as_str())),
            "missing {want:?} in:\n{stderr}"
        );
    }
    assert_eq!(
        stderr.matches("cannot authenticate a sender").count(),
        4,
        "{stderr}"
    );
    assert!(!stderr.contains("anyone can forge"), "{stderr}");
    for fine in ["`narrow`", "broad-reject-is-fine", "risk-taken"] {
        assert!(!stderr.contains(fine), "{stderr}");
    }
}

/// The recipes are not loaded by the shipped config; each must still load cleanly
/// when an admin lists it.
#[tokio::test(flavor = "multi_thread")]
async fn every_recipe_is_a_valid_policy() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut names = Vec::new();
    for entry in std::fs::read_dir(root.join("policies/recipes")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            names.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    names.sort();
    assert_eq!(
        names,
        [
            "netigate-envelope.yaml",
            "netigate-own-domain.yaml",
            "netvisor-ses.yaml",
            "visma-erp.yaml"
        ]
    );
    for name in &names {
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(root.join("policies/recipes").join(name)).unwrap();
        write(dir.path(), name, &text);
        // No nameserver answers here: `check` may warn that the recipe's DNS cannot be
        // verified, but the policy itself must have no error.
        let config = config(
            dir.path(),
            "dns:\n  nameservers: [\"127.0.0.1:9\"]\n  timeout: 1s\n  attempts: 1\n",
        );
        let (ok, stderr) = check(&config).await;
        assert!(ok, "{name}: {stderr}");
        for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
            assert!(line.contains(": warning: "), "{name}: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_rules_and_explicit_unauthenticated_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "empty.yaml", "rules: []\n");
    write(
        dir.path(),
        "risk.yaml",
        "rules:\n  - name: newsletter\n    match: { envelope_from: news@vendor.test }\n    action: accept\n    unauthenticated: true\n  - name: abuse-mailbox\n    match: { rcpt: abuse@example.test }\n    action: accept\n",
    );
    let (ok, stderr) = check(&config(dir.path(), "")).await;
    assert!(ok, "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_allowlist_is_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let (ok, stderr) = check(&root.join("mxgate.yaml")).await;
    assert!(ok, "{stderr}");
    let text = std::fs::read_to_string(root.join("policies/allowlist.yaml")).unwrap();
    for sender in [
        "noreply@netvisor.fi",
        "smtp.od.visma.fi",
        "_spf.netigate.se",
        "_spf.ntgt.de",
        "89.45.227.221",
        "46.254.11.92",
        "89.45.227.195",
        "86.107.243.139",
        "survey@netigate.se",
        "survey@ntgt.de",
    ] {
        assert!(
            text.contains(sender),
            "{sender} missing from the shipped allowlist"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn spf_records_that_cannot_work_are_warned_about() {
    let dns = TestDns::start().await;
    // 11 includes: over the lookup limit.
    let includes: String = (0..11).map(|n| format!(" include:l{n}.big.test")).collect();
    dns.txt("_spf.big.test", &format!("v=spf1{includes} -all"));
    for n in 0..11 {
        dns.txt(&format!("l{n}.big.test"), "v=spf1 ip4:203.0.113.1 -all");
    }
    dns.txt("_spf.fine.test", "v=spf1 ip4:192.0.2.7 -all");
    // Two v=spf1 records (RFC 7208 4.5: permerror), each valid on its own.
    dns.txt("_spf.twice.test", "v=spf1 ip4:192.0.2.7 -all");
    dns.txt("_spf.twice.test", "v=spf1 ip4:192.0.2.8 -all");
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "spf.yaml",
        "rules:\n  - name: big\n    match: { spf_record: _spf.big.test }\n    action: accept\n  - name: gone\n    match: { spf_record: _spf.gone.test }\n    action: accept\n  - name: fine\n    match: { spf_record: _spf.fine.test }\n    action: accept\n  - name: twice\n    match: { spf_record: _spf.twice.test }\n    action: accept\n",
    );
    let config = config(dir.path(), &dns.config());
    let (ok, stderr) = check(&config).await;
    assert!(ok, "warnings do not fail the check: {stderr}");
    let file = dir.path().join("policies/spf.yaml").display().to_string();
    assert!(
        stderr.contains(&format!(
            "{file}:3:26: warning: the SPF record at _spf.big.test needs more than 10 DNS lookups"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{file}:6:26: warning: _spf.gone.test publishes no SPF record"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{file}:12:26: warning: the SPF record at _spf.twice.test is invalid (two v=spf1 records at _spf.twice.test)"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("_spf.fine.test"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_shows_the_rule_and_its_conditions() {
    let dns = TestDns::start().await;
    dns.txt("customer.test", "v=spf1 -all");
    dns.txt("_dmarc.customer.test", "v=DMARC1; p=reject");
    dns.txt("_spf.netigate.se", "v=spf1 ip4:192.0.2.30 -all");
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.yaml",
        "rules:\n  - name: netigate\n    match:\n      spf_record: _spf.netigate.se\n      envelope_from: survey@netigate.se\n    action: accept\n",
    );
    let config = config(dir.path(), &dns.config());
    let message = dir.path().join("m.eml");
    std::fs::write(
        &message,
        "From: first.last@customer.test\nTo: bob@example.test\nSubject: survey\n\nhi\n",
    )
    .unwrap();
    let run = |ip: &'static str, json: bool| {
        let (config, message) = (config.clone(), message.clone());
        tokio::task::spawn_blocking(move || {
            let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mxgate"));
            command
                .arg("explain")
                .arg("--config")
                .arg(&config)
                .args([
                    "--ip",
                    ip,
                    "--helo",
                    "out.netigate.se",
                    "--mail-from",
                    "survey@netigate.se",
                    "--rcpt",
                    "bob@example.test",
                ])
                .arg(&message);
            if json {
                command.arg("--json");
            }
            String::from_utf8(command.output().unwrap().stdout).unwrap()
        })
    };
    let v: serde_json::Value =
        serde_json::from_str(&run("192.0.2.30", true).await.unwrap()).unwrap();
    assert_eq!(v["policy"]["rule"], "netigate", "{v:#}");
    assert_eq!(v["policy"]["action"], "accept");
    assert_eq!(v["policy"]["mode"], "enforce");
    assert_eq!(v["dmarc"]["result"], "fail");
    assert_eq!(v["verdict"]["action"], "deliver");
    assert_eq!(v["policy_trace"][0]["conditions"][0]["result"], true);
    let text = run("192.0.2.99", false).await.unwrap();
    assert!(
        text.contains("rule        no    netigate (accept, enforce)"),
        "{text}"
    );
    assert!(
        text.contains("false client IP authorised by SPF record [_spf.netigate.se]"),
        "{text}"
    );
    assert!(text.contains("verdict     reject -> 550 5.7.1"), "{text}");
}

/// Errors in the main file and in the policy files it names, and a backend error next
/// to others: one run of `mxgate check` prints them all.
#[tokio::test(flavor = "multi_thread")]
async fn errors_in_config_and_policies_are_reported_together() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.yaml",
        "rules:\n  - name: broken\n    match: { client_ip: 999.1.1.1 }\n    action: accept\n",
    );
    let policy = dir.path().join("policies/a.yaml").display().to_string();
    let path = dir.path().join("mxgate.yaml");
    for (backend, spool, config_error) in [
        // A validation error in the main file.
        ("maildir:./mail", "0", ":5:"),
        // A backend that cannot be set up (found while compiling, after validation).
        ("maildir:/proc/mxgate-cannot-exist", "1000000", ":6:"),
    ] {
        std::fs::write(
            &path,
            format!("server:\n  hostname: mx.example.test\n  listen: [\"127.0.0.1:0\"]\n  domains: [example.test]\n  spool_threshold: {spool}\nbackend: [\"{backend}\"]\npolicy:\n  files: [\"policies/*.yaml\"]\n"),
        )
        .unwrap();
        let (ok, stderr) = check(&path).await;
        assert!(!ok, "{stderr}");
        let config = path.display().to_string();
        assert!(
            stderr.contains(&format!("{config}{config_error}")),
            "config error: {stderr}"
        );
        assert!(
            stderr.contains(&format!("{policy}:3:")),
            "policy error: {stderr}"
        );
        assert!(stderr.contains("999.1.1.1"), "{stderr}");
    }
}
