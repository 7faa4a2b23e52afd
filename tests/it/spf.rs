//! SPF over SMTP by mxgate's own evaluator (`src/auth/spf/`), with a real DNS server:
//! the cases where mail-auth's lenient SPF gave a different answer, the bounds on what
//! a sender's record can make us look up, and the reasons in metrics and headers.
//! (The whole RFC 7208 / 4408 suites run in `conformance_spf.rs`.)

use mxgate_test_kit as support;

use support::client::{Reply, SmtpClient};
use support::dkim::DkimKey;
use support::dns::TestDns;
use support::gateway::{Gateway, TestConfig};

const LEGIT_IP: &str = "192.0.2.5";

fn counter(metrics: &str, series: &str) -> u64 {
    support::prom::value(metrics, series).unwrap_or(0.0) as u64
}

/// sender.test with DMARC p=reject and a DKIM key, so a message signed by it is
/// delivered whatever SPF says; `spf` is the sender's SPF TXT record(s).
fn zone(dns: &TestDns, spf: &[&str]) -> DkimKey {
    for record in spf {
        dns.txt("sender.test", record);
    }
    dns.txt("_dmarc.sender.test", "v=DMARC1; p=reject");
    dns.txt("mail.sender.test", "v=spf1 ip4:192.0.2.5 -all");
    let key = DkimKey::rsa("sender.test", "s2026", 2048);
    key.publish(dns);
    key
}

async fn send(dns: &TestDns, key: &DkimKey) -> (Gateway, Reply) {
    let gw = Gateway::start(TestConfig {
        extra: dns.config(),
        ..Default::default()
    })
    .await;
    assert!(
        support::net::source_address(LEGIT_IP),
        "cannot send from {LEGIT_IP}"
    );
    let (mut client, _) = SmtpClient::connect_from(gw.smtp, LEGIT_IP).await;
    assert_eq!(client.cmd("EHLO mail.sender.test").await.code, 250);
    let message = key.sign(
        "From: alice@sender.test\nTo: bob@example.test\nSubject: spf\nMessage-ID: <spf@sender.test>\n\nhello\n",
    );
    let reply = client
        .send_mail("alice@sender.test", &["bob@example.test"], &message)
        .await;
    (gw, reply)
}

fn spf_results(delivered: &str) -> String {
    let start = delivered
        .find("Authentication-Results: mx.example.test;")
        .unwrap_or_else(|| panic!("no Authentication-Results in\n{delivered}"));
    let header = &delivered[start..];
    let end = header.find("\r\n\r\n").or(header.find("\n\n")).unwrap();
    header[..end].replace("\r\n\t", " ").replace("\n\t", " ")
}

/// RFC 7208 4.5: two v=spf1 records are a permerror even when both authorise the
/// client (mail-auth used the first and said pass).
#[tokio::test(flavor = "multi_thread")]
async fn two_records_are_a_permerror_counted_with_their_reason() {
    let dns = TestDns::start().await;
    let key = zone(
        &dns,
        &["v=spf1 ip4:192.0.2.5 -all", "v=spf1 ip4:192.0.2.0/24 -all"],
    );
    let series = "mxgate_spf_errors_total{check=\"spf\",reason=\"multiple_records\"}";
    let before = counter(&mxgate::metrics::render(), series);
    let (gw, reply) = send(&dns, &key).await;
    assert_eq!(reply.code, 250, "DKIM-aligned DMARC pass delivers: {reply}");
    let ar = spf_results(&gw.delivered()[0]);
    assert!(ar.contains("spf=permerror"), "{ar}");
    assert!(ar.contains("dmarc=pass"), "{ar}");
    let metrics = mxgate::metrics::render();
    assert!(counter(&metrics, series) > before, "{metrics}");
    gw.stop().await;
}

/// RFC 7208 4.6.4: the third look-up that finds nothing ends the evaluation with a
/// permerror, and nothing after it is asked.
#[tokio::test(flavor = "multi_thread")]
async fn void_lookups_stop_at_two() {
    let dns = TestDns::start().await;
    let key = zone(
        &dns,
        &[
            "v=spf1 a:v1.sender.test a:v2.sender.test a:v3.sender.test a:v4.sender.test ip4:192.0.2.5 -all",
        ],
    );
    let series = "mxgate_spf_errors_total{check=\"spf\",reason=\"void_lookup_limit\"}";
    let before = counter(&mxgate::metrics::render(), series);
    let (gw, reply) = send(&dns, &key).await;
    assert_eq!(reply.code, 250, "{reply}");
    let ar = spf_results(&gw.delivered()[0]);
    assert!(ar.contains("spf=permerror"), "{ar}");
    assert!(dns.queries_for("v3.sender.test") >= 1);
    assert_eq!(dns.queries_for("v4.sender.test"), 0, "asked past the limit");
    assert!(counter(&mxgate::metrics::render(), series) > before);
    gw.stop().await;
}

/// RFC 7208 4.6.4: the whole evaluation has a deadline (`auth.timeouts.spf`), not only
/// each look-up. Ten names answered just within the per-query timeout would otherwise
/// hold the message for ten times that (with MX names, some 110 times).
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_record_is_a_temperror_at_the_evaluation_deadline() {
    let dns = TestDns::start().await;
    let names: Vec<String> = (1..=9).map(|n| format!("slow{n}.sender.test")).collect();
    let record = format!(
        "v=spf1 {} -all",
        names
            .iter()
            .map(|n| format!("a:{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let key = zone(&dns, &[&record]);
    for name in &names {
        dns.a(name, "198.51.100.1");
        dns.delay(name, std::time::Duration::from_millis(400));
    }
    let series = "mxgate_spf_errors_total{check=\"spf\",reason=\"timeout\"}";
    let before = counter(&mxgate::metrics::render(), series);
    let gw = Gateway::start(TestConfig {
        extra: format!(
            "dns:\n  nameservers: [\"{}\"]\n  timeout: 3s\n  attempts: 1\nauth:\n  timeouts:\n    spf: 1s\n",
            dns.addr
        ),
        ..Default::default()
    })
    .await;
    let (mut client, _) = SmtpClient::connect_from(gw.smtp, LEGIT_IP).await;
    assert_eq!(client.cmd("EHLO mail.sender.test").await.code, 250);
    let message = key.sign(
        "From: alice@sender.test\nTo: bob@example.test\nSubject: spf\nMessage-ID: <slow@sender.test>\n\nhello\n",
    );
    let reply = client
        .send_mail("alice@sender.test", &["bob@example.test"], &message)
        .await;
    assert_eq!(reply.code, 250, "DKIM-aligned DMARC pass delivers: {reply}");
    let ar = spf_results(&gw.delivered()[0]);
    assert!(ar.contains("spf=temperror"), "{ar}");
    // Without the deadline, all nine names answer (3.6 s) and the result is fail.
    assert!(counter(&mxgate::metrics::render(), series) > before);
    gw.stop().await;
}

/// RFC 7208 5.6: `ip6` never matches an IPv4 client, not even through its IPv4-mapped
/// form (mail-auth matched it); and a malformed name is a permerror, not a look-up.
#[tokio::test(flavor = "multi_thread")]
async fn ip6_never_matches_ipv4_and_bad_names_are_permerrors() {
    let dns = TestDns::start().await;
    let key = zone(&dns, &["v=spf1 ip6:::ffff:192.0.2.5 ip6:::/0 -all"]);
    let (gw, reply) = send(&dns, &key).await;
    assert_eq!(reply.code, 250, "{reply}");
    let ar = spf_results(&gw.delivered()[0]);
    assert!(ar.contains("spf=fail"), "{ar}");
    gw.stop().await;

    let dns = TestDns::start().await;
    let key = zone(&dns, &["v=spf1 a:foo-bar ip4:192.0.2.5 -all"]);
    let (gw, reply) = send(&dns, &key).await;
    assert_eq!(reply.code, 250, "{reply}");
    let ar = spf_results(&gw.delivered()[0]);
    assert!(ar.contains("spf=permerror"), "{ar}");
    assert_eq!(dns.queries_for("foo-bar"), 0);
    gw.stop().await;
}

/// An internationalised MAIL FROM domain is looked up by its A-labels, and the SPF
/// identity keeps the address as the client gave it.
#[tokio::test(flavor = "multi_thread")]
async fn internationalised_domains_are_looked_up_by_their_a_labels() {
    let dns = TestDns::start().await;
    dns.txt("xn--bcher-kva.test", "v=spf1 ip4:192.0.2.5 -all");
    let config = mxgate::config::DnsConfig {
        nameservers: Some(vec![dns.addr]),
        timeout: std::time::Duration::from_millis(500),
        attempts: std::num::NonZeroUsize::MIN,
        cache_entries: std::num::NonZeroU64::new(100).expect("not 0"),
        ..Default::default()
    };
    let (auth, _) = mxgate::auth::Authenticator::new(&config, "mx.example.test").unwrap();
    let check = auth
        .spf_mail_from(
            "192.0.2.5".parse().unwrap(),
            "mail.test",
            "alice@bücher.test",
        )
        .await;
    assert_eq!(check.result.as_str(), "pass", "{check:?}");
    assert_eq!(check.identity, "alice@bücher.test");
    let check = auth
        .spf_mail_from(
            "192.0.2.6".parse().unwrap(),
            "mail.test",
            "alice@bücher.test",
        )
        .await;
    assert_eq!(check.result.as_str(), "fail", "{check:?}");
}
