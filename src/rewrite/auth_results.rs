//! Writing Authentication-Results (RFC 8601) from the checks' results.
//!
//! Every value that came from outside (EHLO name, MAIL FROM, DKIM `d=`/`s=`, From
//! domain) is written either as a plain token it provably is, or as a quoted string with
//! control characters removed: no header injection is possible through them. Comments
//! are optional (`auth.comments: false` for Exchange Online) and never contain `;`.

use crate::findings::{AuthReport, AuthResult};
use std::fmt::Write;
use std::net::IpAddr;

/// A DMARC failure that was not enforced, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverrideNote {
    /// Human-readable reason, e.g. `trusted ARC sealer google.com`.
    pub reason: String,
    /// RFC 7489 PolicyOverrideType word: `local_policy`, `trusted_forwarder`, ...
    pub kind: &'static str,
    /// The ARC sealer the override relied on, if any.
    pub sealer: Option<String>,
}

pub struct ResultsInput<'a> {
    pub authserv_id: &'a str,
    pub comments: bool,
    pub client_ip: IpAddr,
    pub report: &'a AuthReport,
    pub dmarc_override: Option<&'a OverrideNote>,
}

/// The field value (after `Authentication-Results:`), with `\0` marking the places
/// where it may be folded.
pub fn results_value(input: &ResultsInput<'_>) -> String {
    let r = input.report;
    let c = input.comments;
    let mut out = String::with_capacity(512);
    out.push_str(input.authserv_id);

    // iprev (RFC 8601 section 2.7.3)
    out.push_str(";\u{0}iprev=");
    out.push_str(r.iprev.result.as_str());
    if c && let Some(name) = r.iprev.confirmed.first().or(r.iprev.ptr.first()) {
        let _ = write!(out, " ({})", comment_text(name));
    }
    let _ = write!(out, " policy.iprev={}", ip_value(input.client_ip));

    // SPF, MAIL FROM identity
    out.push_str(";\u{0}spf=");
    out.push_str(r.spf.result.as_str());
    if c {
        let _ = write!(
            out,
            " ({})",
            spf_comment(r.spf.result, &r.spf.domain, input.client_ip)
        );
    }
    let _ = write!(out, " smtp.mailfrom={}", address_value(&r.spf.identity));

    // SPF, HELO identity
    out.push_str(";\u{0}spf=");
    out.push_str(r.helo_spf.result.as_str());
    let helo = r
        .helo_spf
        .identity
        .strip_prefix("postmaster@")
        .unwrap_or(&r.helo_spf.identity);
    let _ = write!(out, " smtp.helo={}", domain_value(helo));

    // DKIM, one per signature (RFC 6376 section 7.1, RFC 6008 header.b)
    if r.dkim.is_empty() {
        out.push_str(";\u{0}dkim=none");
    }
    for dkim in &r.dkim {
        out.push_str(";\u{0}dkim=");
        out.push_str(dkim.result.as_str());
        if c && let Some(reason) = &dkim.reason {
            let _ = write!(out, " ({})", comment_text(reason));
        }
        if !dkim.domain.is_empty() {
            let _ = write!(out, " header.d={}", domain_value(&dkim.domain));
        }
        if !dkim.selector.is_empty() {
            let _ = write!(out, " header.s={}", domain_value(&dkim.selector));
        }
        if !dkim.b.is_empty() {
            let _ = write!(out, " header.b={}", token_value(&dkim.b));
        }
    }

    // ARC (RFC 8617 section 10.2)
    out.push_str(";\u{0}arc=");
    out.push_str(r.arc.result.as_str());
    if c && r.arc.instances > 0 {
        let sealer = r.arc.sealer.as_deref().unwrap_or("unknown");
        let _ = write!(
            out,
            " (i={} sealer {})",
            r.arc.instances,
            comment_text(sealer)
        );
    }
    let _ = write!(out, " smtp.remote-ip={}", ip_value(input.client_ip));

    // DMARC (RFC 7489 section 11.2)
    out.push_str(";\u{0}dmarc=");
    out.push_str(r.dmarc.result.as_str());
    if c {
        let mut notes = Vec::new();
        if r.dmarc.result != AuthResult::None {
            notes.push(format!("p={}", r.dmarc.policy.as_str()));
        }
        if let Some(pct) = r.dmarc.pct {
            notes.push(format!("pct={pct}"));
            if r.dmarc.applied_policy != r.dmarc.policy {
                notes.push("sampled out".into());
            }
        }
        if let Some(note) = input.dmarc_override {
            notes.push(format!("overridden by local policy: {}", note.reason));
        }
        if !notes.is_empty() {
            let _ = write!(out, " ({})", comment_text(&notes.join(", ")));
        }
    }
    if !r.dmarc.domain.is_empty() {
        let _ = write!(out, " header.from={}", domain_value(&r.dmarc.domain));
    }
    if r.dmarc.result != AuthResult::None {
        let _ = write!(out, " policy.dmarc={}", r.dmarc.applied_policy.as_str());
    }
    if let Some(note) = input.dmarc_override {
        let _ = write!(out, " policy.override={}", note.kind);
        if let Some(sealer) = &note.sealer {
            let _ = write!(out, " policy.arc-sealer={}", domain_value(sealer));
        }
    }
    out
}

/// The value with every fold point turned into a single space (for ARC, whose
/// signature is over the relaxed form).
pub fn unfolded(value: &str) -> String {
    value.replace('\u{0}', " ")
}

fn spf_comment(result: AuthResult, domain: &str, ip: IpAddr) -> String {
    let domain = comment_text(domain);
    match result {
        AuthResult::Pass => format!("domain of {domain} designates {ip} as permitted sender"),
        AuthResult::Fail => {
            format!("domain of {domain} does not designate {ip} as permitted sender")
        }
        AuthResult::SoftFail => format!("domain of {domain} reports soft fail for {ip}"),
        AuthResult::Neutral => format!("domain of {domain} reports neutral for {ip}"),
        AuthResult::None => format!("no SPF record for {domain}"),
        AuthResult::TempError => format!("temporary DNS error evaluating {domain}"),
        AuthResult::PermError => format!("invalid SPF record for {domain}"),
    }
}

/// Text safe inside a comment: no parentheses, backslashes, `;` or control characters.
fn comment_text(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|ch| match ch {
            '(' | ')' | '\\' | ';' => ' ',
            ch if ch.is_control() => ' ',
            ch => ch,
        })
        .collect();
    out.truncate(out.char_indices().nth(200).map_or(out.len(), |(at, _)| at));
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn is_domain_like(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 255
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b)
}

fn is_dot_atom(text: &str) -> bool {
    !text.is_empty()
        && text
            .split('.')
            .all(|part| !part.is_empty() && part.bytes().all(is_atext))
}

/// A domain (or selector) as a pvalue; anything else is quoted.
fn domain_value(text: &str) -> String {
    if is_domain_like(text) {
        text.to_string()
    } else {
        quoted(text)
    }
}

/// `local-part@domain` as RFC 8601 allows it unquoted, else a quoted string.
fn address_value(address: &str) -> String {
    match address.rsplit_once('@') {
        Some((local, domain)) if is_dot_atom(local) && is_domain_like(domain) => {
            address.to_string()
        }
        _ => quoted(address),
    }
}

/// An RFC 2045 token, else a quoted string (base64 `header.b` values with `/` or `=`
/// get quoted).
fn token_value(text: &str) -> String {
    if !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?=".contains(&b))
    {
        text.to_string()
    } else {
        quoted(text)
    }
}

fn ip_value(ip: IpAddr) -> String {
    ip.to_string()
}

fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for ch in text.chars().take(255) {
        match ch {
            '"' | '\\' => {
                out.push('\\');
                out.push(ch);
            }
            ch if ch.is_control() => out.push(' '),
            ch => out.push(ch),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::findings::*;

    fn report() -> AuthReport {
        AuthReport {
            iprev: IprevCheck {
                result: AuthResult::Pass,
                ptr: vec!["mail.sender.test".into()],
                confirmed: vec!["mail.sender.test".into()],
                unsure: vec![],
            },
            helo_spf: SpfCheck {
                result: AuthResult::None,
                domain: "evil\r\nX-Injected: yes".into(),
                identity: "postmaster@evil\r\nX-Injected: yes".into(),
                explanation: None,
                reason: None,
                reason_kind: None,
            },
            spf: SpfCheck {
                result: AuthResult::Pass,
                domain: "sender.test".into(),
                identity: "alice@sender.test".into(),
                explanation: None,
                reason: None,
                reason_kind: None,
            },
            dkim: vec![DkimCheck {
                result: AuthResult::Pass,
                domain: "sender.test".into(),
                selector: "sel;\r\nX-Bad: 1".into(),
                b: "AbCd+/9=".into(),
                algorithm: "rsa-sha256".into(),
                reason: None,
            }],
            arc: ArcCheck {
                result: AuthResult::None,
                instances: 0,
                sealer: None,
                sealer_results: None,
                signer: None,
                reason: None,
            },
            dmarc: DmarcCheck {
                result: AuthResult::Pass,
                domain: "sender.test".into(),
                policy: DmarcPolicy::Reject,
                applied_policy: DmarcPolicy::Reject,
                spf_aligned: true,
                dkim_aligned: true,
                pct: None,
                reason: None,
            },
            from: FromHeader {
                fields: 1,
                addresses: vec!["alice@sender.test".into()],
                domains: vec!["sender.test".into()],
                unusable: Vec::new(),
            },
        }
    }

    fn input(report: &AuthReport, comments: bool) -> ResultsInput<'_> {
        ResultsInput {
            authserv_id: "mx.example.test",
            comments,
            client_ip: "192.0.2.1".parse().unwrap(),
            report,
            dmarc_override: None,
        }
    }

    #[test]
    fn writes_every_method() {
        let report = report();
        let value = unfolded(&results_value(&input(&report, true)));
        assert_eq!(
            value,
            "mx.example.test; iprev=pass (mail.sender.test) policy.iprev=192.0.2.1; \
spf=pass (domain of sender.test designates 192.0.2.1 as permitted sender) smtp.mailfrom=alice@sender.test; \
spf=none smtp.helo=\"evil  X-Injected: yes\"; \
dkim=pass header.d=sender.test header.s=\"sel;  X-Bad: 1\" header.b=\"AbCd+/9=\"; \
arc=none smtp.remote-ip=192.0.2.1; \
dmarc=pass (p=reject) header.from=sender.test policy.dmarc=reject"
        );
    }

    #[test]
    fn no_comments_mode_has_no_parentheses() {
        let report = report();
        let mut value = unfolded(&results_value(&input(&report, false)));
        value = value.replace("\"evil  X-Injected: yes\"", "");
        assert!(!value.contains('('), "{value}");
    }

    #[test]
    fn override_is_recorded() {
        let mut report = report();
        report.dmarc.result = AuthResult::Fail;
        let note = OverrideNote {
            reason: "trusted ARC sealer google.com".into(),
            kind: "local_policy",
            sealer: Some("google.com".into()),
        };
        let mut input = input(&report, true);
        input.dmarc_override = Some(&note);
        let value = unfolded(&results_value(&input));
        assert!(value.ends_with("dmarc=fail (p=reject, overridden by local policy: trusted ARC sealer google.com) header.from=sender.test policy.dmarc=reject policy.override=local_policy policy.arc-sealer=google.com"), "{value}");
        input.comments = false;
        let value = unfolded(&results_value(&input));
        assert!(value.ends_with("dmarc=fail header.from=sender.test policy.dmarc=reject policy.override=local_policy policy.arc-sealer=google.com"), "{value}");
    }

    #[test]
    fn no_line_breaks_anywhere() {
        let report = report();
        let value = results_value(&input(&report, true));
        assert!(!value.contains('\r') && !value.contains('\n'));
    }
}
