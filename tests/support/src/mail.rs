//! Test mail: the message builder every test writes its messages with, the usual
//! sender's DNS zone (sender.test), ARC sealing keys, and one message sent from a given
//! client address. May call the kit's DNS server, DKIM keys and SMTP client, and
//! mxgate's key generator (the keys mxgate itself would generate).

use crate::client::{Reply, SmtpClient};
use crate::dkim::DkimKey;
use crate::dns::TestDns;
use mxgate::keygen::{KeyAlgorithm, generate};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// sender.test's outbound server in [`sender_zone`]: SPF-authorised, with
/// forward-confirmed reverse DNS as mail.sender.test.
pub const SENDER_IP: &str = "192.0.2.5";

/// A plain message (LF line endings, as `DkimKey::sign` and `crlf` take it): From, To,
/// Subject, a fixed Date, `Message-ID: <subject@id_domain>`, a blank line, the body.
/// Fixed values, so the same call gives the same bytes in every run (signatures,
/// `Message-ID`s in assertions).
#[derive(Clone, Debug)]
pub struct Message {
    from_lines: String,
    to: String,
    subject: String,
    id_domain: String,
    body: String,
}

/// A message from `from` (the whole From value: `Alice <alice@sender.test>` or a bare
/// address) to bob@example.test, its Message-ID at sender.test.
pub fn message(from: &str, subject: &str) -> Message {
    Message {
        from_lines: format!("From: {from}\n"),
        to: "bob@example.test".into(),
        subject: subject.into(),
        id_domain: "sender.test".into(),
        body: "Please find the invoice attached.\n".into(),
    }
}

impl Message {
    /// Replaces the From line with `lines` as given: none, two, or a folded one (each
    /// line ending in `\n`), for the tests of what a reader makes of them.
    pub fn from_lines(mut self, lines: &str) -> Self {
        self.from_lines = lines.into();
        self
    }

    pub fn to(mut self, to: &str) -> Self {
        self.to = to.into();
        self
    }

    /// The domain after the `@` of the Message-ID.
    pub fn id_domain(mut self, domain: &str) -> Self {
        self.id_domain = domain.into();
        self
    }

    pub fn body(mut self, body: &str) -> Self {
        self.body = body.into();
        self
    }

    pub fn text(&self) -> String {
        format!(
            "{}To: {}\nSubject: {}\nDate: Mon, 23 Nov 2026 10:00:00 +0000\nMessage-ID: <{}@{}>\n\n{}",
            self.from_lines, self.to, self.subject, self.subject, self.id_domain, self.body
        )
    }
}

/// sender.test as a well-run sender publishes it: SPF allows only [`SENDER_IP`], the
/// DMARC record `dmarc`, mail.sender.test (its own SPF record `a`) with forward-confirmed
/// reverse DNS for [`SENDER_IP`], and two DKIM keys: RSA 2048 (`rsa2026`) and Ed25519
/// (`ed2026`), returned in that order.
pub fn sender_zone(dns: &TestDns, dmarc: &str) -> (DkimKey, DkimKey) {
    dns.txt("sender.test", "v=spf1 ip4:192.0.2.5 -all");
    dns.txt("_dmarc.sender.test", dmarc);
    dns.txt("mail.sender.test", "v=spf1 a -all");
    dns.a("mail.sender.test", SENDER_IP);
    dns.ptr(SENDER_IP, "mail.sender.test");
    let rsa = DkimKey::rsa("sender.test", "rsa2026", 2048);
    rsa.publish(dns);
    let ed = DkimKey::ed25519("sender.test", "ed2026");
    ed.publish(dns);
    (rsa, ed)
}

/// An ARC sealing key for `domain` (RSA 2048 or Ed25519) written to
/// `dir/<selector>.<domain>.pem`, its record published at `<selector>._domainkey.<domain>`
/// unless `publish` is false (a sealer whose key cannot be found).
pub fn sealing_key(
    dns: &TestDns,
    dir: &Path,
    domain: &str,
    selector: &str,
    algorithm: KeyAlgorithm,
    publish: bool,
) -> PathBuf {
    let generated = generate(algorithm, 2048).expect("key generation");
    let path = dir.join(format!("{selector}.{domain}.pem"));
    std::fs::write(&path, &generated.private_pem).expect("writing the sealing key");
    if publish {
        dns.txt(
            &format!("{selector}._domainkey.{domain}"),
            &generated.record,
        );
    }
    path
}

/// One message from client address `source` (added to `lo` when needed) to
/// bob@example.test, in a session of its own (EHLO sender-host.test ... QUIT): the
/// reply to the end of DATA, or the refusal before it (a greeting other than 220).
pub async fn send_from(smtp: SocketAddr, source: &str, from: &str, data: &str) -> Reply {
    assert!(crate::net::source_address(source), "need {source}");
    let (mut client, greeting) = SmtpClient::connect_from(smtp, source).await;
    if greeting.code != 220 {
        return greeting;
    }
    assert_eq!(client.cmd("EHLO sender-host.test").await.code, 250);
    let reply = client.send_mail(from, &["bob@example.test"], data).await;
    // 421 is the one reply after which the server has closed the connection.
    if reply.code != 421 {
        let _ = client.cmd("QUIT").await;
    }
    reply
}
