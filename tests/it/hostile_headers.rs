//! The MX against hostile header sections and signatures (issue 11, items 1-4): one
//! reading of the header section for every decision, with anything two readers could
//! take differently refused; forged Authentication-Results stripped by meaning; bounded
//! DKIM work under one deadline; long lines. Real SMTP over sockets, a real DNS server.

use mxgate_test_kit as support;

use support::client::{Reply, SmtpClient};
use support::dns::TestDns;
use support::gateway::{Gateway, TestConfig};

/// attacker.test authorises 127.0.0.1 (the test client) by SPF and has no DMARC record;
/// netvisor.fi publishes p=reject and authorises nobody.
fn zones(dns: &TestDns) {
    dns.txt("attacker.test", "v=spf1 ip4:127.0.0.1 -all");
    dns.txt("netvisor.fi", "v=spf1 -all");
    dns.txt("_dmarc.netvisor.fi", "v=DMARC1; p=reject");
}

async fn gateway(dns: &TestDns, server_extra: &str, extra: &str) -> Gateway {
    Gateway::start(TestConfig {
        server_extra: server_extra.to_string(),
        extra: format!("{}{extra}", dns.config()),
        ..Default::default()
    })
    .await
}

/// One transaction whose content is sent byte for byte as given (no line-ending
/// conversion), then `.` CRLF.
async fn send_raw(gw: &Gateway, mail_from: &str, content: &[u8]) -> Reply {
    let (mut client, _) = gw.ehlo().await;
    raw_transaction(&mut client, mail_from, content).await
}

async fn raw_transaction(client: &mut SmtpClient, mail_from: &str, content: &[u8]) -> Reply {
    let reply = client.cmd(&format!("MAIL FROM:<{mail_from}>")).await;
    assert_eq!(reply.code, 250, "MAIL: {reply}");
    let reply = client.cmd("RCPT TO:<bob@example.test>").await;
    assert_eq!(reply.code, 250, "RCPT: {reply}");
    let reply = client.cmd("DATA").await;
    assert_eq!(reply.code, 354, "DATA: {reply}");
    let mut data = content.to_vec();
    if !data.ends_with(b"\r\n") {
        data.extend_from_slice(b"\r\n");
    }
    data.extend_from_slice(b".\r\n");
    client.send(&data).await;
    client.read_reply().await
}

fn malformed(reply: &Reply) -> bool {
    reply.code == 550 && reply.status() == "5.6.0" && reply.text().contains("header")
}

const ISSUE_CASE: &[u8] = b"From: x@attacker.test\r\nX-Junk\r\nFrom: Netvisor <noreply@netvisor.fi>\r\nTo: bob@example.test\r\nSubject: invoice\r\n\r\nPay now.\r\n";

/// Issue 11 item 1: a colon-less line between two From fields made mail-auth judge
/// DMARC on the first From alone (attacker.test, pass) while the relayed message
/// showed both.
#[tokio::test(flavor = "multi_thread")]
async fn a_line_without_colon_between_two_froms_is_refused() {
    let dns = TestDns::start().await;
    zones(&dns);
    let gw = gateway(&dns, "", "").await;
    let reply = send_raw(&gw, "x@attacker.test", ISSUE_CASE).await;
    assert!(malformed(&reply), "{reply}");
    assert!(reply.text().contains("line 2"), "{reply}");
    // The same message without the junk line has two From fields: 550 5.7.1.
    let without = b"From: x@attacker.test\r\nFrom: Netvisor <noreply@netvisor.fi>\r\nTo: bob@example.test\r\nSubject: invoice\r\n\r\nPay now.\r\n";
    let reply = send_raw(&gw, "x@attacker.test", without).await;
    assert_eq!((reply.code, reply.status()), (550, "5.7.1"), "{reply}");
    // And a well-formed message from attacker.test passes: the refusals above are about
    // the header section, not the sender.
    let fine = b"From: x@attacker.test\r\nTo: bob@example.test\r\nSubject: hi\r\n\r\nHello.\r\n";
    let reply = send_raw(&gw, "x@attacker.test", fine).await;
    assert_eq!(reply.code, 250, "{reply}");
    let delivered = gw.delivered();
    assert_eq!(
        delivered.len(),
        1,
        "only the well-formed message is relayed"
    );
    assert!(!delivered[0].contains("netvisor"), "{}", delivered[0]);
    gw.stop().await;
}

/// Issue 11 item 2: `From :` is a From field to mail-auth (obsolete syntax) but was not
/// counted as one. Every spelling of a field name with white space in it is refused.
#[tokio::test(flavor = "multi_thread")]
async fn white_space_before_the_colon_is_refused() {
    let dns = TestDns::start().await;
    zones(&dns);
    let gw = gateway(&dns, "", "").await;
    for content in [
        &b"From: x@attacker.test\r\nFrom : Netvisor <noreply@netvisor.fi>\r\nSubject: a\r\n\r\nb\r\n"[..],
        b"From : Netvisor <noreply@netvisor.fi>\r\nFrom: x@attacker.test\r\nSubject: a\r\n\r\nb\r\n",
        b"From: x@attacker.test\r\nFrom\t: noreply@netvisor.fi\r\n\r\nb\r\n",
        b"From: x@attacker.test\r\nFr om: noreply@netvisor.fi\r\n\r\nb\r\n",
        b"From : x@attacker.test\r\nSubject: only one From\r\n\r\nb\r\n",
    ] {
        let reply = send_raw(&gw, "x@attacker.test", content).await;
        assert!(
            malformed(&reply),
            "{}: {reply}",
            String::from_utf8_lossy(content)
        );
    }
    // Other ambiguities: a folded first line, an 8-bit or empty field name.
    for content in [
        &b" From: noreply@netvisor.fi\r\nFrom: x@attacker.test\r\n\r\nb\r\n"[..],
        b"From: x@attacker.test\r\nFr\xc3\xb6m: noreply@netvisor.fi\r\n\r\nb\r\n",
        b"From: x@attacker.test\r\n: noreply@netvisor.fi\r\n\r\nb\r\n",
    ] {
        let reply = send_raw(&gw, "x@attacker.test", content).await;
        assert!(
            malformed(&reply),
            "{}: {reply}",
            String::from_utf8_lossy(content)
        );
    }
    assert!(gw.delivered().is_empty());
    gw.stop().await;
}

/// A continuation line of white space only is the empty line that ends the header
/// section to some readers: what we and mail-auth read as header fields (DKIM's `h=`,
/// the Subject, a second From) would be body to them. Refused, like every line two
/// readers could take differently.
#[tokio::test(flavor = "multi_thread")]
async fn a_continuation_line_of_white_space_only_is_refused() {
    let dns = TestDns::start().await;
    zones(&dns);
    let gw = gateway(&dns, "", "").await;
    for content in [
        &b"From: x@attacker.test\r\nSubject: hi\r\n \r\nTo: bob@example.test\r\n\r\nb\r\n"[..],
        b"Subject: hi\r\n\t \r\nFrom: x@attacker.test\r\n\r\nb\r\n",
    ] {
        let reply = send_raw(&gw, "x@attacker.test", content).await;
        assert!(
            malformed(&reply),
            "{}: {reply}",
            String::from_utf8_lossy(content)
        );
        assert!(reply.text().contains("line"), "{reply}");
    }
    // Folding with text on the continuation line is fine.
    let folded = b"From: x@attacker.test\r\nSubject: hi\r\n there\r\n\r\nb\r\n";
    assert_eq!(send_raw(&gw, "x@attacker.test", folded).await.code, 250);
    assert_eq!(gw.delivered().len(), 1);
    gw.stop().await;
}

/// Messages from a trusted network are read the same way: the strip of forged
/// Authentication-Results and the relayed fields come from the same reading.
#[tokio::test(flavor = "multi_thread")]
async fn trusted_clients_get_the_same_reading() {
    let dns = TestDns::start().await;
    zones(&dns);
    let gw = Gateway::start(TestConfig {
        trusted: vec!["127.0.0.0/8".into()],
        extra: dns.config(),
        ..Default::default()
    })
    .await;
    let reply = send_raw(&gw, "x@attacker.test", ISSUE_CASE).await;
    assert!(malformed(&reply), "{reply}");
    assert!(gw.delivered().is_empty());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn header_section_limits() {
    let dns = TestDns::start().await;
    zones(&dns);
    let gw = gateway(
        &dns,
        "  max_header_size: 4096\n  max_header_fields: 20\n",
        "",
    )
    .await;
    let mut many = String::from("From: x@attacker.test\r\n");
    for n in 0..20 {
        many.push_str(&format!("X-Field-{n}: v\r\n"));
    }
    many.push_str("\r\nbody\r\n");
    let reply = send_raw(&gw, "x@attacker.test", many.as_bytes()).await;
    assert_eq!((reply.code, reply.status()), (552, "5.3.4"), "{reply}");
    assert!(reply.text().contains("more than 20 fields"), "{reply}");

    let big = format!(
        "From: x@attacker.test\r\nSubject: {}\r\n\r\nbody\r\n",
        "x".repeat(5000)
    );
    let reply = send_raw(&gw, "x@attacker.test", big.as_bytes()).await;
    assert_eq!((reply.code, reply.status()), (552, "5.3.4"), "{reply}");
    assert!(reply.text().contains("4096 bytes"), "{reply}");

    // A large body is not a large header section.
    let fine = format!(
        "From: x@attacker.test\r\nSubject: s\r\n\r\n{}\r\n",
        "y\r\n".repeat(5000)
    );
    let reply = send_raw(&gw, "x@attacker.test", fine.as_bytes()).await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(gw.delivered().len(), 1);
    gw.stop().await;
}

/// Issue 11 item 3: an Authentication-Results field that claims our authserv-id in
/// another spelling is removed like any other forged one.
#[tokio::test(flavor = "multi_thread")]
async fn forged_results_are_stripped_by_meaning() {
    let dns = TestDns::start().await;
    zones(&dns);
    let gw = gateway(&dns, "", "").await;
    let forged = [
        "mx.example.test.; dmarc=pass header.from=netvisor.fi",
        "\"mx.example.test\"; dmarc=pass header.from=netvisor.fi",
        "(c) MX.Example.Test. (c); dmarc=pass header.from=netvisor.fi",
        "\"mx.example.test.\"; dmarc=pass header.from=netvisor.fi",
    ];
    let kept = "mx.example.test.evil; dmarc=pass header.from=kept.test";
    let mut content = String::new();
    for value in forged {
        content.push_str(&format!("Authentication-Results: {value}\r\n"));
    }
    content.push_str(&format!("Authentication-Results: {kept}\r\n"));
    content.push_str("From: x@attacker.test\r\nSubject: s\r\n\r\nbody\r\n");
    let reply = send_raw(&gw, "x@attacker.test", content.as_bytes()).await;
    assert_eq!(reply.code, 250, "{reply}");
    let delivered = &gw.delivered()[0];
    assert!(!delivered.contains("netvisor"), "{delivered}");
    assert!(
        delivered.contains(&format!("Authentication-Results: {kept}")),
        "{delivered}"
    );
    // Ours is there, once.
    assert_eq!(
        delivered
            .matches("Authentication-Results: mx.example.test;")
            .count(),
        1,
        "{delivered}"
    );
    gw.stop().await;
}

/// The body hash a DKIM-Signature with `c=relaxed/relaxed` needs for `body`.
fn relaxed_body_hash(body: &str) -> String {
    use base64::Engine;
    let digest = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// `count` signatures under `domain`, each with its own selector, whose body hash
/// matches (so each needs its key from DNS) and whose `b=` is garbage.
fn signed(count: usize, domain: &str, body: &str) -> String {
    let bh = relaxed_body_hash(body);
    let mut message = String::new();
    for n in 0..count {
        message.push_str(&format!(
            "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d={domain}; s=s{n};\r\n h=from:subject; bh={bh};\r\n b=dGhpcyBpcyBub3QgYSBzaWduYXR1cmU=\r\n"
        ));
    }
    message.push_str(&format!(
        "From: x@attacker.test\r\nSubject: many signatures\r\n\r\n{body}"
    ));
    message
}

/// Our Authentication-Results field, unfolded.
fn our_results(message: &str) -> String {
    let start = message
        .find("Authentication-Results: mx.example.test;")
        .unwrap_or_else(|| panic!("no Authentication-Results of ours in\n{message}"));
    let mut lines = message[start..].lines();
    let mut field = lines.next().unwrap().trim_end().to_string();
    for line in lines {
        if !line.starts_with([' ', '\t']) {
            break;
        }
        field.push(' ');
        field.push_str(line.trim());
    }
    field
}

fn ignored_signatures_metric() -> u64 {
    prometheus::gather()
        .iter()
        .find(|family| family.name() == "mxgate_dkim_signatures_ignored_total")
        .map(|family| family.get_metric()[0].get_counter().get_value() as u64)
        .unwrap_or(0)
}

/// Issue 11 item 4: 400 signatures were 400 look-ups and 400 results in our header.
#[tokio::test(flavor = "multi_thread")]
async fn only_the_first_signatures_are_verified() {
    let dns = TestDns::start().await;
    zones(&dns);
    let gw = gateway(&dns, "", "").await;
    let before = ignored_signatures_metric();
    let message = signed(400, "sig.test", "Hello.\r\n");
    let reply = send_raw(&gw, "x@attacker.test", message.as_bytes()).await;
    assert_eq!(reply.code, 250, "{reply}");
    let lookups: usize = (0..400)
        .map(|n| dns.queries_for(&format!("s{n}._domainkey.sig.test")))
        .sum();
    assert!(lookups <= 10, "{lookups} key look-ups");
    assert!(lookups >= 1, "the first signatures are verified");
    for n in 10..400 {
        assert_eq!(dns.queries_for(&format!("s{n}._domainkey.sig.test")), 0);
    }
    let ours = our_results(&gw.delivered()[0]);
    let results = ours.matches("dkim=").count();
    assert!(
        (1..=10).contains(&results),
        "{results} dkim results in\n{ours}"
    );
    assert!(ignored_signatures_metric() >= before + 390);
    gw.stop().await;
}

/// A gateway whose DNS queries wait 10 s for an answer and whose end-of-data checks
/// have 2 s: only the deadline can end the checks soon.
async fn gateway_with_a_short_deadline(dns: &TestDns) -> Gateway {
    let dns_config = format!(
        "dns:\n  nameservers: [\"{}\"]\n  timeout: 10s\n  attempts: 1\n",
        dns.addr
    );
    Gateway::start(TestConfig {
        extra: format!("{dns_config}auth:\n  timeouts:\n    end_of_data: 2s\n"),
        ..Default::default()
    })
    .await
}

/// Issue 11 item 4: signatures whose keys never come were looked up one after another
/// (10 signatures, 20 s). Now they share one deadline and end as temperror.
#[tokio::test(flavor = "multi_thread")]
async fn unanswered_key_lookups_end_at_the_deadline() {
    let dns = TestDns::start().await;
    zones(&dns);
    for n in 0..10 {
        dns.timeout(&format!("s{n}._domainkey.slow.test"));
    }
    let gw = gateway_with_a_short_deadline(&dns).await;
    let message = signed(10, "slow.test", "Hello.\r\n");
    let started = std::time::Instant::now();
    let reply = send_raw(&gw, "x@attacker.test", message.as_bytes()).await;
    let took = started.elapsed();
    assert_eq!(reply.code, 250, "{reply}");
    // Generous: one after another, the look-ups alone would take 100 s.
    assert!(took < std::time::Duration::from_secs(9), "took {took:?}");
    let ours = our_results(&gw.delivered()[0]);
    assert_eq!(ours.matches("dkim=temperror").count(), 10, "{ours}");
    // One signature alone (verified without the per-signature copies) likewise.
    let message = signed(1, "slow.test", "Hello.\r\n");
    let started = std::time::Instant::now();
    let reply = send_raw(&gw, "x@attacker.test", message.as_bytes()).await;
    assert_eq!(reply.code, 250, "{reply}");
    assert!(started.elapsed() < std::time::Duration::from_secs(9));
    let ours = our_results(&gw.delivered()[1]);
    assert_eq!(ours.matches("dkim=temperror").count(), 1, "{ours}");
    gw.stop().await;
}

/// The same deadline for ARC and DMARC: an ARC set whose key never comes, and a From
/// domain whose DMARC record never comes, end as temperror well before the DNS timeout.
#[tokio::test(flavor = "multi_thread")]
async fn unanswered_arc_and_dmarc_lookups_end_at_the_deadline() {
    let dns = TestDns::start().await;
    zones(&dns);
    dns.timeout("seal._domainkey.slowarc.test");
    dns.txt("slowdmarc.test", "v=spf1 ip4:127.0.0.1 -all");
    dns.timeout("_dmarc.slowdmarc.test");
    let gw = gateway_with_a_short_deadline(&dns).await;

    // Tags as a sealer writes them, signatures garbage: the key look-up comes first.
    let body = "Hello.\r\n";
    let bh = relaxed_body_hash(body);
    let sealed = format!(
        "ARC-Seal: i=1; a=rsa-sha256; cv=none; d=slowarc.test; s=seal; t=1700000000;\r\n b=dGhpcyBpcyBub3QgYSBzaWduYXR1cmU=\r\n\
ARC-Message-Signature: i=1; a=rsa-sha256; c=relaxed/relaxed; d=slowarc.test; s=seal;\r\n t=1700000000; h=from:subject; bh={bh};\r\n b=dGhpcyBpcyBub3QgYSBzaWduYXR1cmU=\r\n\
ARC-Authentication-Results: i=1; mx.slowarc.test; spf=pass smtp.mailfrom=x@attacker.test\r\n\
From: x@attacker.test\r\nSubject: sealed\r\n\r\n{body}"
    );
    let started = std::time::Instant::now();
    let reply = send_raw(&gw, "x@attacker.test", sealed.as_bytes()).await;
    let took = started.elapsed();
    assert_eq!(reply.code, 250, "{reply}");
    assert!(took < std::time::Duration::from_secs(9), "took {took:?}");
    assert!(dns.queries_for("seal._domainkey.slowarc.test") >= 1);
    let ours = our_results(&gw.delivered()[0]);
    assert!(ours.contains("arc=temperror"), "{ours}");

    let message = "From: x@slowdmarc.test\r\nSubject: s\r\n\r\nHello.\r\n";
    let started = std::time::Instant::now();
    let reply = send_raw(&gw, "x@slowdmarc.test", message.as_bytes()).await;
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(9), "took {took:?}");
    assert!(dns.queries_for("_dmarc.slowdmarc.test") >= 1);
    // A DMARC result we could not get is uncertain: the sender retries.
    assert_eq!(reply.code / 100, 4, "{reply}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn long_lines_pass_by_default_and_can_be_refused() {
    let dns = TestDns::start().await;
    zones(&dns);
    let long = format!(
        "From: x@attacker.test\r\nSubject: s\r\n\r\n{}\r\nshort\r\n",
        "z".repeat(5000)
    );
    let exact = format!(
        "From: x@attacker.test\r\nSubject: s\r\n\r\n{}\r\n",
        "z".repeat(998)
    );

    let gw = gateway(&dns, "", "").await;
    let reply = send_raw(&gw, "x@attacker.test", long.as_bytes()).await;
    assert_eq!(reply.code, 250, "{reply}");
    assert!(gw.delivered()[0].contains(&"z".repeat(5000)));
    gw.stop().await;

    let gw = gateway(&dns, "  long_lines: reject\n", "").await;
    let (mut client, _) = gw.ehlo().await;
    let reply = raw_transaction(&mut client, "x@attacker.test", long.as_bytes()).await;
    assert_eq!((reply.code, reply.status()), (550, "5.6.0"), "{reply}");
    assert!(
        reply.text().contains("5000 octets") && reply.text().contains("998"),
        "{reply}"
    );
    // The session goes on, and a line of exactly 998 octets is fine.
    let reply = raw_transaction(&mut client, "x@attacker.test", exact.as_bytes()).await;
    assert_eq!(reply.code, 250, "{reply}");
    // BDAT is measured the same way.
    assert_eq!(client.cmd("MAIL FROM:<x@attacker.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<bob@example.test>").await.code, 250);
    client
        .send(format!("BDAT {} LAST\r\n", long.len()).as_bytes())
        .await;
    client.send(long.as_bytes()).await;
    let reply = client.read_reply().await;
    assert_eq!((reply.code, reply.status()), (550, "5.6.0"), "{reply}");
    let delivered = gw.delivered();
    assert_eq!(delivered.len(), 1);
    assert!(!delivered[0].contains(&"z".repeat(999)));
    gw.stop().await;
}
