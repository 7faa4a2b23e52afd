//! The shared DNS cache: answers are reused for their TTL, expired ones are asked
//! again, SPF's negative answers are cached too, and the cache is bounded in bytes: an
//! answer over the per-entry cap is asked again, and many large ones evict each other.
//! One test function, because it reads the process-wide metrics.

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
    // Large answers: SPF's raw TXT cache gets 15% of 1 MiB, each answer here is 12 KiB
    // (under the 16 KiB cap) but for huge.test's 40 KiB.
    let padding = "v".repeat(12 * 1024);
    for i in 0..40 {
        dns.txt(&format!("s{i}.big.test"), "v=spf1 ip4:127.0.0.0/8 -all");
        dns.txt(
            &format!("s{i}.big.test"),
            &format!("verification={padding}"),
        );
    }
    dns.txt("huge.test", "v=spf1 ip4:127.0.0.0/8 -all");
    dns.txt(
        "huge.test",
        &format!("verification={}", "v".repeat(40 * 1024)),
    );
    let gw = Gateway::start(TestConfig {
        extra: dns.config() + "  cache_max_bytes: 1048576\n",
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

    // SPF's negative answers are cached too (NXDOMAIN for the HELO name's TXT).
    let reply = send("b@nodmarc.test", message("b@nodmarc.test")).await;
    assert_eq!(reply.code, 250, "{reply}");
    let nx_asked = dns.queries_for("client.test");
    assert!(nx_asked >= 1);
    let reply = send("b@nodmarc.test", message("b@nodmarc.test")).await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(
        dns.queries_for("client.test"),
        nx_asked,
        "HELO's NXDOMAIN re-asked within its negative TTL"
    );

    // An answer over the per-entry cap is used but not kept: asked again.
    // (Each look-up is two queries: UDP, truncated, then TCP.)
    let reply = send("c@huge.test", message("c@huge.test")).await;
    assert_eq!(reply.code, 250, "{reply}");
    let huge_asked = dns.queries_for("huge.test");
    assert!(huge_asked >= 1);
    let reply = send("c@huge.test", message("c@huge.test")).await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(
        dns.queries_for("huge.test"),
        2 * huge_asked,
        "a 40 KiB answer was kept"
    );
    // 40 answers of 12 KiB do not fit SPF's 154 KiB share: asked again, some of them.
    let senders: Vec<&'static str> = (0..40)
        .map(|i| &*format!("d@s{i}.big.test").leak())
        .collect();
    let big_asked = || -> usize {
        (0..40)
            .map(|i| dns.queries_for(&format!("s{i}.big.test")))
            .sum()
    };
    let mut asked = Vec::new();
    for round in 0..2 {
        for from in &senders {
            let reply = send(from, message(from)).await;
            assert_eq!(reply.code, 250, "round {round}: {reply}");
        }
        asked.push(big_asked());
    }
    // About 12 fit: most of the 40 are asked again.
    assert!(
        asked[1] - asked[0] >= asked[0] / 2,
        "queries {asked:?}: the large answers were all kept"
    );
    let metrics = mxgate::metrics::render();
    assert!(
        counter(
            &metrics,
            "mxgate_dns_cache_not_kept_total{cache=\"spf\",reason=\"too_large\"}"
        ) >= 2,
        "{metrics}"
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

/// DKIM and ARC keys are fetched by mxgate before mail-auth verifies, and kept weighed
/// (mail-auth's own look-up gives a parsed key that cannot be weighed): a second message
/// signed or sealed with the same keys asks nothing again, nor does a key that does not
/// exist, nor a missing DMARC record; a key over the cap is asked each time.
#[tokio::test(flavor = "multi_thread")]
async fn keys_and_negative_answers_are_cached() {
    use mxgate::keygen::KeyAlgorithm;
    use support::backend::{Behaviour, FakeBackend};

    let dns = TestDns::start().await;
    dns.txt("sender.test", "v=spf1 ip4:127.0.0.0/8 -all");
    dns.txt("_dmarc.sender.test", "v=DMARC1; p=none");
    // No DMARC record here: NXDOMAIN for _dmarc.nodmarc.test.
    dns.txt("nodmarc.test", "v=spf1 ip4:127.0.0.0/8 -all");
    // DMARC fails here, and the policy's `pct` is read from the raw record.
    dns.txt("pct.test", "v=spf1 -all");
    dns.txt("_dmarc.pct.test", "v=DMARC1; p=quarantine; pct=100");
    let key = DkimKey::rsa("sender.test", "k1", 2048);
    key.publish(&dns);
    // Signs, but its record was never published: NXDOMAIN.
    let gone = DkimKey::rsa("sender.test", "gone", 2048);
    // A valid key with 20 KiB of notes (n=): over the 16 KiB cap.
    let huge = DkimKey::ed25519("sender.test", "huge");
    dns.txt(
        "huge._domainkey.sender.test",
        &format!("{}; n={}", huge.dns_record(), "x".repeat(20 * 1024)),
    );
    let dir = tempfile::tempdir().unwrap();
    let sealing = support::mail::sealing_key(
        &dns,
        dir.path(),
        "edge.test",
        "arc1",
        KeyAlgorithm::Rsa,
        true,
    );
    let backend = FakeBackend::start(Behaviour::default()).await;
    let gw = Gateway::start(TestConfig {
        backends: vec![backend.url()],
        extra: format!(
            "{}relay:\n  tls: off\narc:\n  domain: edge.test\n  selector: arc1\n  private_key: {}\n",
            dns.config(),
            sealing.display()
        ),
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
    let message = |from: &str, subject: &str| {
        format!("From: {from}\r\nTo: bob@example.test\r\nSubject: {subject}\r\n\r\nhello\r\n")
    };
    let k1 = "k1._domainkey.sender.test";

    // DKIM: the second message signed with the same key asks nothing.
    let reply = send("a@sender.test", key.sign(&message("a@sender.test", "one"))).await;
    assert_eq!(reply.code, 250, "{reply}");
    let asked = dns.queries_for(k1);
    assert!(asked >= 1, "the key was never asked");
    let reply = send("a@sender.test", key.sign(&message("a@sender.test", "two"))).await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(dns.queries_for(k1), asked, "DKIM key re-asked");
    let relayed = backend.messages()[1].text();
    assert!(relayed.contains("dkim=pass"), "{relayed}");

    // ARC: the message as sealed by this gateway (i=1, arc1._domainkey.edge.test),
    // received back twice: the seal's key is asked once.
    let sealed = backend.messages()[0].text();
    assert!(sealed.starts_with("ARC-Seal: i=1;"), "{sealed}");
    let arc1 = "arc1._domainkey.edge.test";
    // (The gateway may have checked its own published key at start.)
    let before = dns.queries_for(arc1);
    let reply = send("a@sender.test", sealed.clone()).await;
    assert_eq!(reply.code, 250, "{reply}");
    let arc_asked = dns.queries_for(arc1);
    assert!(arc_asked > before, "the sealer's key was never asked");
    let reply = send("a@sender.test", sealed).await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(dns.queries_for(arc1), arc_asked, "ARC key re-asked");
    assert_eq!(dns.queries_for(k1), asked, "DKIM key re-asked");
    let resealed = backend.messages()[3].text();
    assert!(resealed.starts_with("ARC-Seal: i=2;"), "{resealed}");
    assert!(resealed.contains("arc=pass"), "{resealed}");

    // A key that does not exist: its NXDOMAIN is kept.
    let nx = "gone._domainkey.sender.test";
    for subject in ["three", "four"] {
        let reply = send(
            "a@sender.test",
            gone.sign(&message("a@sender.test", subject)),
        )
        .await;
        assert_eq!(reply.code, 250, "{reply}");
        assert_eq!(dns.queries_for(nx), 1, "missing key re-asked");
    }

    // A key over the cap is used (the signature passes) but asked for every message.
    let big = "huge._domainkey.sender.test";
    let mut asked = Vec::new();
    for subject in ["five", "six"] {
        let reply = send(
            "a@sender.test",
            huge.sign(&message("a@sender.test", subject)),
        )
        .await;
        assert_eq!(reply.code, 250, "{reply}");
        asked.push(dns.queries_for(big));
    }
    assert!(asked[0] >= 1 && asked[1] > asked[0], "queries {asked:?}");
    let relayed = backend.messages().last().unwrap().text();
    assert!(relayed.contains("dkim=pass"), "{relayed}");

    // DMARC's negative answer is kept too.
    let nodmarc = "_dmarc.nodmarc.test";
    for subject in ["seven", "eight"] {
        let reply = send("b@nodmarc.test", message("b@nodmarc.test", subject)).await;
        assert_eq!(reply.code, 250, "{reply}");
        assert_eq!(dns.queries_for(nodmarc), 1, "missing DMARC record re-asked");
        // The tree walk's last step, the top-level domain (RFC 9989 4.10.1).
        assert_eq!(dns.queries_for("_dmarc.test"), 1, "_dmarc.<tld> re-asked");
    }
    // A failing message's `pct`: the raw record comes from the cache the second time.
    // (The first message asks twice: the parsed record and the raw one, for `pct`, are
    // kept in two caches.)
    let mut asked = Vec::new();
    for subject in ["nine", "ten"] {
        let reply = send("c@pct.test", message("c@pct.test", subject)).await;
        assert_eq!(reply.code, 250, "{reply}");
        assert!(
            backend
                .messages()
                .last()
                .unwrap()
                .text()
                .contains("dmarc=fail"),
            "{:?}",
            backend.messages().last().map(|m| m.text())
        );
        asked.push(dns.queries_for("_dmarc.pct.test"));
    }
    assert!(
        asked[0] >= 1 && asked[1] == asked[0],
        "DMARC record re-asked: {asked:?}"
    );
    gw.stop().await;
}
