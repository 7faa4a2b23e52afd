//! The shared DNS cache: answers are reused for their TTL, expired ones are asked
//! again, and negative answers are cached too. One test function, because it reads the
//! process-wide metrics.

use mxgate_test_kit as support;

use std::time::Duration;
use support::client::SmtpClient;
use support::dkim::DkimKey;
use support::dns::TestDns;
use support::gateway::{Gateway, TestConfig};

fn counter(metrics: &str, series: &str) -> u64 {
    support::prom::value(metrics, series).unwrap_or(0.0) as u64
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_are_cached_for_their_ttl_positive_and_negative() {
    let dns = TestDns::start().await;
    dns.txt("sender.test", "v=spf1 ip4:127.0.0.0/8 -all");
    dns.txt("_dmarc.sender.test", "v=DMARC1; p=reject");
    let key = DkimKey::rsa("sender.test", "short", 2048);
    key.publish(&dns);
    dns.ttl("short._domainkey.sender.test", 1);
    // nodmarc.test publishes SPF but no DMARC record (NXDOMAIN for _dmarc).
    dns.txt("nodmarc.test", "v=spf1 ip4:127.0.0.0/8 -all");
    let gw = Gateway::start(TestConfig {
        extra: dns.config(),
        ..Default::default()
    })
    .await;
    let send = |from: &'static str, data: String| {
        let addr = gw.smtp;
        async move {
            let (mut client, _) = SmtpClient::connect(addr).await;
            client.cmd("EHLO client.test").await;
            client.send_mail(from, &["bob@example.test"], &data).await
        }
    };
    let message =
        |from: &str| format!("From: {from}\nTo: bob@example.test\nSubject: cache\n\nhello\n");

    let reply = send("a@sender.test", key.sign(&message("a@sender.test"))).await;
    assert_eq!(reply.code, 250, "{reply}");
    let spf_asked = dns.queries_for("sender.test");
    let dmarc_asked = dns.queries_for("_dmarc.sender.test");
    let key_asked = dns.queries_for("short._domainkey.sender.test");
    assert!(spf_asked >= 1 && dmarc_asked >= 1 && key_asked >= 1);
    let hits_before = counter(
        &mxgate::metrics::render(),
        "mxgate_dns_cache_requests_total{result=\"hit\",type=\"txt\"}",
    );

    // Within the TTL: nothing is asked again, the cache answers.
    let reply = send("a@sender.test", key.sign(&message("a@sender.test"))).await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(
        dns.queries_for("sender.test"),
        spf_asked,
        "SPF record re-asked"
    );
    assert_eq!(
        dns.queries_for("_dmarc.sender.test"),
        dmarc_asked,
        "DMARC record re-asked"
    );
    let hits_after = counter(
        &mxgate::metrics::render(),
        "mxgate_dns_cache_requests_total{result=\"hit\",type=\"txt\"}",
    );
    assert!(
        hits_after >= hits_before + 2,
        "cache hits {hits_before} -> {hits_after}"
    );

    // The DKIM key's TTL was 1 s: after it, the key is asked again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let reply = send("a@sender.test", key.sign(&message("a@sender.test"))).await;
    assert_eq!(reply.code, 250, "{reply}");
    assert!(
        dns.queries_for("short._domainkey.sender.test") > key_asked,
        "an expired answer must be asked again"
    );
    assert_eq!(
        dns.queries_for("sender.test"),
        spf_asked,
        "a live answer must not"
    );

    // Negative answers are cached too (NXDOMAIN for _dmarc.nodmarc.test).
    let reply = send("b@nodmarc.test", message("b@nodmarc.test")).await;
    assert_eq!(reply.code, 250, "{reply}");
    let nx_asked = dns.queries_for("_dmarc.nodmarc.test");
    assert!(nx_asked >= 1);
    let reply = send("b@nodmarc.test", message("b@nodmarc.test")).await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(
        dns.queries_for("_dmarc.nodmarc.test"),
        nx_asked,
        "NXDOMAIN re-asked within its negative TTL"
    );

    let metrics = mxgate::metrics::render();
    assert!(
        counter(
            &metrics,
            "mxgate_dns_lookups_total{result=\"answered\",type=\"txt\"}"
        ) >= 3,
        "{metrics}"
    );
    assert!(
        metrics.contains("mxgate_dns_lookup_duration_seconds_count{type=\"txt\"}"),
        "{metrics}"
    );
    gw.stop().await;
}
