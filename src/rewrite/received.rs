//! The `Received:` trace header field we prepend (RFC 5321 section 4.4).
//!
//! It names the real client IP in the standard `(name [ip])` form, which is what
//! Exchange Online's Enhanced Filtering for Connectors and Google's inbound gateway
//! setting read to find the original sender behind us. TLS version and cipher are
//! recorded as a comment, the protocol keyword follows RFC 3848 / RFC 6531.

use super::headers::{sanitize, write_folded};
use crate::tls::TlsInfo;
use std::net::IpAddr;

pub struct ReceivedFields<'a> {
    pub helo: Option<&'a str>,
    /// Forward-confirmed reverse DNS name, if any.
    pub client_name: Option<&'a str>,
    pub client_ip: IpAddr,
    pub by: &'a str,
    pub esmtp: bool,
    pub smtputf8: bool,
    pub tls: Option<&'a TlsInfo>,
    pub id: &'a str,
    /// Named with `for` only when the transaction has exactly one recipient, so the
    /// header does not disclose the other recipients (RFC 5321 section 7.2).
    pub single_recipient: Option<&'a str>,
    pub timestamp: i64,
}

pub fn write_received(out: &mut Vec<u8>, f: &ReceivedFields<'_>) {
    let helo = f
        .helo
        .map(sanitize_token)
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    let name = f
        .client_name
        .map(sanitize_token)
        .unwrap_or_else(|| "unknown".into());
    let protocol = match (f.smtputf8, f.esmtp, f.tls.is_some()) {
        (true, _, true) => "UTF8SMTPS",
        (true, _, false) => "UTF8SMTP",
        (false, true, true) => "ESMTPS",
        (false, true, false) => "ESMTP",
        (false, false, _) => "SMTP",
    };
    let mut value = format!("from {helo} ({name} [{}])", f.client_ip);
    value.push_str(&format!("\u{0}by {} (mxgate)", f.by));
    if let Some(tls) = f.tls {
        value.push_str(&format!(
            "\u{0}(using {} with cipher {})",
            tls.version,
            sanitize_token(&tls.cipher)
        ));
    }
    value.push_str(&format!("\u{0}with {protocol}\u{0}id {}", f.id));
    if let Some(rcpt) = f.single_recipient {
        value.push_str(&format!(
            "\u{0}for <{}>",
            sanitize(rcpt, 320).replace(['<', '>', ';'], "")
        ));
    }
    value.push_str(";\u{0}");
    push_date(&mut value, f.timestamp);
    write_folded(out, "Received", &value);
}

/// RFC 5322 date for `timestamp`, formatted once per second per thread.
fn push_date(out: &mut String, timestamp: i64) {
    thread_local! {
        static LAST: std::cell::RefCell<(i64, String)> = const { std::cell::RefCell::new((i64::MIN, String::new())) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.0 != timestamp {
            *last = (
                timestamp,
                mail_parser::DateTime::from_timestamp(timestamp).to_rfc822(),
            );
        }
        out.push_str(&last.1);
    });
}

/// A token from outside (EHLO name, PTR name) reduced to characters that cannot break the
/// header's structure.
fn sanitize_token(text: &str) -> String {
    let cleaned: String = sanitize(text, 255)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']') {
                c
            } else {
                '?'
            }
        })
        .collect();
    cleaned
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_names_ip_tls_and_id() {
        let tls = TlsInfo {
            version: "TLSv1.3",
            cipher: "TLS13_AES_256_GCM_SHA384".into(),
        };
        let mut out = Vec::new();
        write_received(
            &mut out,
            &ReceivedFields {
                helo: Some("mail.sender.test\r\nX-Evil: 1"),
                client_name: Some("mail.sender.test"),
                client_ip: "192.0.2.7".parse().unwrap(),
                by: "mx.example.test",
                esmtp: true,
                smtputf8: false,
                tls: Some(&tls),
                id: "ABC123",
                single_recipient: Some("bob@example.test"),
                timestamp: 1_700_000_000,
            },
        );
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with(
                "Received: from mail.sender.test?X-Evil:?1 (mail.sender.test [192.0.2.7])"
            ),
            "{text}"
        );
        assert!(text.contains("with ESMTPS"), "{text}");
        assert!(
            text.contains("(using TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384)"),
            "{text}"
        );
        assert!(text.contains("id ABC123"), "{text}");
        assert!(text.contains("for <bob@example.test>;"), "{text}");
        assert_eq!(
            text.matches("\r\n").count(),
            text.matches("\r\n\t").count() + 1,
            "{text}"
        );
        assert!(text.ends_with("+0000\r\n"), "{text}");
    }
}
