//! DNS trouble on the evidence that would have let a message through: an `accept` rule's
//! forward-confirmed host, SPF record or DKIM key, or an aligned pass for our own domain
//! without a DMARC record. A refusal for good that the evidence would have spared is a
//! `451 4.7.5` (the sender retries); a clean failure of the same evidence stays a 5xx.
//! Over SMTP, with the test DNS server answering SERVFAIL or staying silent.

use mxgate_test_kit as support;

use support::client::{Reply, SmtpClient};
use support::dkim::DkimKey;
use support::dns::{TestDns, reverse_name};
use support::gateway::{Gateway, TestConfig};
use support::mail;

/// customer.test publishes p=reject; the SaaS senders fail its DMARC and need a rule.
/// example.test is ours (`server.domains`) and publishes no DMARC record.
fn zone(dns: &TestDns) {
    dns.txt("customer.test", "v=spf1 ip4:198.51.100.1 -all");
    dns.txt("_dmarc.customer.test", "v=DMARC1; p=reject");
    dns.txt("netvisor.fi", "v=spf1 ip4:198.51.100.2 -all");
    dns.txt("_dmarc.netvisor.fi", "v=DMARC1; p=reject");
    // Visma's ERP host; its addresses include .52, whose reverse zone is broken.
    dns.a("smtp.od.visma.fi", "192.0.2.50");
    dns.a("smtp.od.visma.fi", "192.0.2.52");
    dns.ptr("192.0.2.50", "smtp.od.visma.fi");
    dns.servfail(&reverse_name("192.0.2.52".parse().unwrap()));
    // A client whose reverse zone is broken but which is no address of Visma's.
    dns.servfail(&reverse_name("192.0.2.53".parse().unwrap()));
    // A second ERP host: its PTR answers, but its own name's addresses time out.
    dns.ptr("192.0.2.54", "erp2.visma.fi");
    dns.timeout("erp2.visma.fi");
    // The reverse zone of .55 never answers (a timeout, not a SERVFAIL).
    dns.timeout(&reverse_name("192.0.2.55".parse().unwrap()));
    dns.a("smtp.od.visma.fi", "192.0.2.55");
    // Netigate's record includes one whose servers SERVFAIL.
    dns.txt(
        "_spf.netigate.se",
        "v=spf1 ip4:192.0.2.30 include:_spf2.netigate.se -all",
    );
    dns.servfail("_spf2.netigate.se");
}

const POLICY: &str = r#"rules:
  - name: netvisor-invoices
    match:
      header_from: noreply@netvisor.fi
      dkim_domain: [netvisor.fi, amazonses.com]
    action: accept
  - name: visma-erp
    match:
      client_host: [smtp.od.visma.fi, erp2.visma.fi]
    action: accept
  - name: netigate-surveys
    match:
      spf_record: _spf.netigate.se
      envelope_from: survey@netigate.se
    action: accept
"#;

async fn gateway(dns: &TestDns) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("allowlist.yaml"), POLICY).unwrap();
    let config = TestConfig {
        extra: format!("{}policy:\n  files: [\"allowlist.yaml\"]\n", dns.config()),
        ..Default::default()
    };
    let yaml = config.yaml(dir.path());
    Gateway::start_yaml(dir, &yaml).await
}

async fn send(gw: &Gateway, source: &str, mail_from: &str, data: &str) -> Reply {
    assert!(support::net::source_address(source), "need {source}");
    let (mut client, _) = SmtpClient::connect_from(gw.smtp, source).await;
    assert_eq!(client.cmd("EHLO sender.host.test").await.code, 250);
    client
        .send_mail(mail_from, &["bob@example.test"], data)
        .await
}

fn message(from: &str, subject: &str) -> String {
    mail::message(from, subject)
        .id_domain("x.test")
        .body("hello\n")
        .text()
}

fn deferred(reply: &Reply, what: &str) {
    assert_eq!(
        (reply.code, reply.status()),
        (451, "4.7.5"),
        "{what}: {reply}"
    );
}

fn refused(reply: &Reply, what: &str) {
    assert_eq!(
        (reply.code, reply.status()),
        (550, "5.7.1"),
        "{what}: {reply}"
    );
}

/// The README's scenario: Visma's host sends as a customer's own address, and its PTR
/// look-up fails. The allowlist could have matched, so p=reject must not bounce it. A
/// client with a broken reverse zone that is no address of Visma's gets no such favour.
#[tokio::test(flavor = "multi_thread")]
async fn an_allowlisted_host_whose_reverse_dns_fails_is_deferred() {
    let dns = TestDns::start().await;
    zone(&dns);
    let gw = gateway(&dns).await;
    let erp = |s: &str| message("jane.doe@customer.test", s);
    let reply = send(&gw, "192.0.2.50", "jane.doe@customer.test", &erp("ok")).await;
    assert_eq!(reply.code, 250, "forward-confirmed: {reply}");
    let reply = send(
        &gw,
        "192.0.2.52",
        "jane.doe@customer.test",
        &erp("servfail"),
    )
    .await;
    deferred(&reply, "PTR SERVFAIL, an address of smtp.od.visma.fi");
    let reply = send(&gw, "192.0.2.55", "jane.doe@customer.test", &erp("silent")).await;
    deferred(&reply, "PTR timeout, an address of smtp.od.visma.fi");
    let reply = send(&gw, "192.0.2.54", "jane.doe@customer.test", &erp("fwd")).await;
    deferred(&reply, "PTR names erp2.visma.fi, whose addresses time out");
    // While erp2.visma.fi's own addresses cannot be looked up, any client whose PTR
    // fails may be it; once they answer, a client not among them is refused.
    dns.remove("erp2.visma.fi");
    dns.a("erp2.visma.fi", "192.0.2.57");
    let reply = send(&gw, "192.0.2.53", "jane.doe@customer.test", &erp("other")).await;
    refused(
        &reply,
        "PTR SERVFAIL, but no address of an allowlisted host",
    );
    // A clean iprev failure (the PTR names Visma, the name does not lead back) is a
    // forgery as before.
    dns.ptr("192.0.2.58", "smtp.od.visma.fi");
    let reply = send(&gw, "192.0.2.58", "jane.doe@customer.test", &erp("lie")).await;
    refused(&reply, "a PTR that does not lead back");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_spf_record_that_servfails_defers_the_survey() {
    let dns = TestDns::start().await;
    zone(&dns);
    let gw = gateway(&dns).await;
    let survey = message("first.last@customer.test", "survey");
    let reply = send(&gw, "192.0.2.30", "survey@netigate.se", &survey).await;
    assert_eq!(reply.code, 250, "listed before the include: {reply}");
    let reply = send(&gw, "192.0.2.31", "survey@netigate.se", &survey).await;
    deferred(&reply, "the include SERVFAILs");
    // The rule is false on another condition: DNS trouble does not matter.
    let reply = send(&gw, "192.0.2.31", "someone@netigate.se", &survey).await;
    refused(&reply, "another envelope sender");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dkim_key_that_times_out_defers_the_invoice() {
    let dns = TestDns::start().await;
    zone(&dns);
    let ses = DkimKey::rsa("amazonses.com", "ug7nbtf4", 2048);
    let signed = ses.sign(&message("noreply@netvisor.fi", "invoice"));
    dns.timeout("ug7nbtf4._domainkey.amazonses.com");
    let gw = gateway(&dns).await;
    let reply = send(&gw, "192.0.2.40", "0100018f@amazonses.com", &signed).await;
    deferred(&reply, "SES's key look-up times out");
    // No signature at all: nothing could have vouched for it.
    let unsigned = message("noreply@netvisor.fi", "spoof");
    let reply = send(&gw, "192.0.2.41", "noreply@netvisor.fi", &unsigned).await;
    refused(&reply, "unsigned");
    gw.stop().await;
}

/// Our own domain publishes no DMARC record: an aligned SPF pass lets mail From it
/// through the own-domain guard. When that SPF look-up fails, the guard defers.
#[tokio::test(flavor = "multi_thread")]
async fn own_domain_without_dmarc_defers_when_its_spf_fails() {
    let dns = TestDns::start().await;
    zone(&dns);
    dns.servfail("example.test");
    let gw = gateway(&dns).await;
    let own = message("hr@example.test", "own");
    let reply = send(&gw, "192.0.2.56", "hr@example.test", &own).await;
    deferred(&reply, "SPF of our own domain SERVFAILs");
    // Another envelope domain: SPF for it proves nothing about ours.
    let reply = send(&gw, "192.0.2.56", "hr@customer.test", &own).await;
    assert_eq!((reply.code, reply.status()), (550, "5.7.1"), "{reply}");
    gw.stop().await;
}
