//! Header fields of a raw message (read by `section`) and writing safe header values.
//!
//! The message is never modified in place; rewriting is a plan of fields to add and
//! byte ranges to leave out (see `relay::OutboundMessage`).

use std::ops::Range;

/// One header field of a raw message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderField<'a> {
    /// The field name as written (compare case-insensitively).
    pub name: &'a [u8],
    /// The value after the colon, folded lines included, without the final CRLF.
    pub value: &'a [u8],
    /// The whole field including its final CRLF.
    pub range: Range<usize>,
    /// Where the value starts in the message (just after the colon).
    pub value_start: usize,
}

impl HeaderField<'_> {
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name.as_bytes())
    }
}

/// Parses a configured `Name: value` header line. The name must be a valid field name
/// and the value must not contain line breaks.
pub fn parse_header_line(line: &str) -> Option<(String, String)> {
    let (name, value) = line.split_once(':')?;
    let name = name.trim();
    if name.is_empty() || !name.bytes().all(|b| (33..=126).contains(&b) && b != b':') {
        return None;
    }
    if value.contains(['\r', '\n']) {
        return None;
    }
    Some((name.to_string(), value.trim().to_string()))
}

/// Makes outside text safe inside a header field: control characters become spaces, and
/// runs of whitespace collapse. This is what stops header injection through EHLO names,
/// addresses or DKIM tags.
pub fn sanitize(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    let mut last_space = false;
    for ch in text.chars() {
        let ch = if ch.is_control() || ch.is_whitespace() {
            ' '
        } else {
            ch
        };
        if ch == ' ' {
            if last_space {
                continue;
            }
            last_space = true;
        } else {
            last_space = false;
        }
        if out.len() + ch.len_utf8() > max {
            break;
        }
        out.push(ch);
    }
    out.trim().to_string()
}

/// Appends `name: value` to `out`, folding at the given break points (`\u{0}` markers in
/// `value` are fold opportunities) so lines stay under 78 characters where possible.
pub fn write_folded(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b":");
    let mut line_len = name.len() + 1;
    for (n, piece) in value.split('\u{0}').enumerate() {
        let piece = if n == 0 { piece } else { piece.trim_start() };
        if piece.is_empty() {
            continue;
        }
        if n > 0 && line_len + 1 + piece.len() > 78 {
            out.extend_from_slice(b"\r\n\t");
            line_len = 8;
        } else {
            out.push(b' ');
            line_len += 1;
        }
        out.extend_from_slice(piece.as_bytes());
        line_len += piece.len();
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_removes_line_breaks() {
        assert_eq!(sanitize("evil\r\nX-Injected: 1", 100), "evil X-Injected: 1");
        assert_eq!(sanitize("a\t\tb", 100), "a b");
        assert_eq!(sanitize("abcdef", 3), "abc");
    }

    #[test]
    fn header_lines() {
        assert_eq!(
            parse_header_line("X-Spam-Flag: YES"),
            Some(("X-Spam-Flag".into(), "YES".into()))
        );
        assert_eq!(parse_header_line("nonsense"), None);
        assert_eq!(parse_header_line("Bad Name: x"), None);
    }

    #[test]
    fn folding_keeps_lines_short() {
        let mut out = Vec::new();
        let long = format!("a;\u{0}{};\u{0}{}", "b".repeat(40), "c".repeat(40));
        write_folded(&mut out, "X-Test", &long);
        let text = String::from_utf8(out).unwrap();
        assert!(text.lines().all(|l| l.len() <= 78), "{text}");
        assert!(text.contains("\r\n\t"));
    }
}
