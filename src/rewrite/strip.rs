//! Forged Authentication-Results: any incoming field that claims our authserv-id is
//! removed before ours is added (RFC 8601 section 5), so a verdict written by the sender
//! never survives as if we had written it.

use super::headers::HeaderField;
use std::ops::Range;

/// Byte ranges of the Authentication-Results fields that carry `authserv_id`.
pub fn forged_results(fields: &[HeaderField<'_>], authserv_id: &str) -> Vec<Range<usize>> {
    fields
        .iter()
        .filter(|f| f.is("Authentication-Results"))
        .filter(|f| {
            authserv_id_of(f.value)
                .is_some_and(|id| id.eq_ignore_ascii_case(authserv_id.as_bytes()))
        })
        .map(|f| f.range.clone())
        .collect()
}

/// The authserv-id of an Authentication-Results value: the first token after any
/// comments and folding white space.
pub fn authserv_id_of(value: &[u8]) -> Option<&[u8]> {
    let mut at = skip_cfws(value, 0);
    let start = at;
    while at < value.len() && !matches!(value[at], b';' | b'(' | b' ' | b'\t' | b'\r' | b'\n') {
        at += 1;
    }
    let id = &value[start..at];
    // A quoted authserv-id: compare what is inside the quotes.
    let id = id
        .strip_prefix(b"\"")
        .and_then(|i| i.strip_suffix(b"\""))
        .unwrap_or(id);
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
    use crate::rewrite::headers::header_fields;

    #[test]
    fn finds_forged_fields_only() {
        let msg = b"Authentication-Results: MX.Example.Test; dmarc=pass\r\n\
Authentication-Results: other.test; spf=pass\r\n\
Authentication-Results:\r\n (sneaky comment)\r\n  mx.example.test 1; dkim=pass\r\n\
Subject: x\r\n\r\nbody";
        let (fields, _) = header_fields(msg);
        let ranges = forged_results(&fields, "mx.example.test");
        assert_eq!(ranges.len(), 2);
        assert!(msg[ranges[0].clone()].starts_with(b"Authentication-Results: MX.Example.Test"));
        assert!(msg[ranges[1].clone()].ends_with(b"dkim=pass\r\n"));
    }

    #[test]
    fn authserv_id_parsing() {
        assert_eq!(authserv_id_of(b" mx.test; none"), Some(&b"mx.test"[..]));
        assert_eq!(
            authserv_id_of(b" (c (nested)) mx.test;"),
            Some(&b"mx.test"[..])
        );
        assert_eq!(authserv_id_of(b" \"mx.test\"; none"), Some(&b"mx.test"[..]));
        assert_eq!(authserv_id_of(b"   "), None);
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
