//! Forged Authentication-Results: any incoming field that claims our authserv-id is
//! removed before ours is added (RFC 8601 section 5), so a verdict written by the sender
//! never survives as if we had written it.

use super::headers::HeaderField;
use std::ops::Range;

/// Byte ranges of the Authentication-Results fields that carry `authserv_id`. The
/// authserv-id is compared as the domain it names, not as it is spelled: case, one
/// trailing dot, the quoted-string form (RFC 8601 section 2.2 allows `value`, so a
/// quoted-string with quoted-pairs) and comments around it do not change which host
/// it claims to be.
pub fn forged_results(fields: &[HeaderField<'_>], authserv_id: &str) -> Vec<Range<usize>> {
    let ours = domain_key(authserv_id.as_bytes());
    fields
        .iter()
        .filter(|f| f.is("Authentication-Results"))
        .filter(|f| authserv_id_of(f.value).is_some_and(|id| domain_key(&id) == ours))
        .map(|f| f.range.clone())
        .collect()
}

/// An authserv-id as a comparable domain: lowercase, without one trailing dot.
fn domain_key(id: &[u8]) -> Vec<u8> {
    let id = id.strip_suffix(b".").unwrap_or(id);
    id.to_ascii_lowercase()
}

/// The authserv-id of an Authentication-Results value: the first token (or the content
/// of a quoted-string, quoted-pairs undone) after any comments and folding white space.
pub fn authserv_id_of(value: &[u8]) -> Option<Vec<u8>> {
    let mut at = skip_cfws(value, 0);
    let mut id = Vec::new();
    if value.get(at) == Some(&b'"') {
        at += 1;
        loop {
            match value.get(at)? {
                b'"' => break,
                b'\\' => {
                    id.push(*value.get(at + 1)?);
                    at += 2;
                }
                // Folding inside the quotes is not part of the value.
                b'\r' | b'\n' => at += 1,
                &byte => {
                    id.push(byte);
                    at += 1;
                }
            }
        }
    } else {
        let start = at;
        while at < value.len()
            && !matches!(value[at], b';' | b'(' | b'"' | b' ' | b'\t' | b'\r' | b'\n')
        {
            at += 1;
        }
        id.extend_from_slice(&value[start..at]);
    }
    (!id.is_empty()).then_some(id)
}

fn skip_cfws(value: &[u8], mut at: usize) -> usize {
    loop {
        while at < value.len() && value[at].is_ascii_whitespace() {
            at += 1;
        }
        if at < value.len() && value[at] == b'(' {
            let mut depth = 0usize;
            while at < value.len() {
                match value[at] {
                    b'\\' => at += 1,
                    b'(' => depth += 1,
                    b')' => {
                        depth -= 1;
                        if depth == 0 {
                            at += 1;
                            break;
                        }
                    }
                    _ => {}
                }
                at += 1;
            }
        } else {
            // A quoted-pair cut short at the end of an unclosed comment steps past it.
            return at.min(value.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::section::{SectionLimits, read_section};

    fn forged(msg: &[u8]) -> Vec<Range<usize>> {
        let limits = SectionLimits {
            max_size: 10_000,
            max_fields: 100,
        };
        let section = read_section(msg, limits).unwrap();
        forged_results(&section.fields, "mx.example.test")
    }

    #[test]
    fn finds_forged_fields_only() {
        let msg = b"Authentication-Results: MX.Example.Test; dmarc=pass\r\n\
Authentication-Results: other.test; spf=pass\r\n\
Authentication-Results:\r\n (sneaky comment)\r\n  mx.example.test 1; dkim=pass\r\n\
Subject: x\r\n\r\nbody";
        let ranges = forged(msg);
        assert_eq!(ranges.len(), 2);
        assert!(msg[ranges[0].clone()].starts_with(b"Authentication-Results: MX.Example.Test"));
        assert!(msg[ranges[1].clone()].ends_with(b"dkim=pass\r\n"));
    }

    #[test]
    fn the_authserv_id_is_compared_as_a_domain() {
        for value in [
            " mx.example.test.; dmarc=pass",
            " \"mx.example.test\"; dmarc=pass",
            " (c) MX.Example.Test. (c); dmarc=pass",
            " \"mx.example.test.\"; dmarc=pass",
            " \"mx.exa\\mple.test\" 1; dmarc=pass",
            " (a (nested) comment) \"MX.EXAMPLE.TEST\"(c); dmarc=pass",
        ] {
            let msg = format!("Authentication-Results:{value}\r\nSubject: x\r\n\r\n");
            assert_eq!(forged(msg.as_bytes()).len(), 1, "{value}");
        }
        for value in [
            " mx.example.test.evil; dmarc=pass",
            " \"mx.example.test.evil\"; dmarc=pass",
            " evil.mx.example.test; dmarc=pass",
            " mx.example.test..; dmarc=pass",
            " (mx.example.test) other.test; dmarc=pass",
        ] {
            let msg = format!("Authentication-Results:{value}\r\nSubject: x\r\n\r\n");
            assert!(forged(msg.as_bytes()).is_empty(), "{value}");
        }
    }

    #[test]
    fn authserv_id_parsing() {
        assert_eq!(
            authserv_id_of(b" mx.test; none").as_deref(),
            Some(&b"mx.test"[..])
        );
        assert_eq!(
            authserv_id_of(b" (c (nested)) mx.test;").as_deref(),
            Some(&b"mx.test"[..])
        );
        assert_eq!(
            authserv_id_of(b" \"mx.test\"; none").as_deref(),
            Some(&b"mx.test"[..])
        );
        assert_eq!(authserv_id_of(b"   "), None);
        assert_eq!(authserv_id_of(b" \"mx.test"), None);
    }

    /// Found while writing the `auth_results` fuzz target: a comment cut short after a
    /// backslash ran the position past the end of the value and the slice panicked.
    #[test]
    fn unterminated_comment_ending_in_a_backslash() {
        assert_eq!(authserv_id_of(b" (\\"), None);
        assert_eq!(authserv_id_of(b"(a\\"), None);
        assert_eq!(authserv_id_of(b"(\\)"), None);
    }
}
