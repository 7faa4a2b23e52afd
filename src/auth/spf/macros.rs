//! SPF macro strings (RFC 7208 section 7): syntax check and expansion.
//!
//! One scanner serves both: the record parser calls [`check`] on every domain-spec and
//! modifier value (a syntax error anywhere in the record is a permerror, section 4.6),
//! the evaluator calls [`expand`] with the values of one evaluation.

use std::fmt::Write as _;
use std::net::IpAddr;

/// Where a macro string appears: `c`, `r` and `t` are explanation-only, and only an
/// explanation may hold spaces (section 7.1, `explain-string`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Context {
    Domain,
    /// Unknown modifiers: the ABNF allows every macro letter.
    Modifier,
    Explanation,
}

/// The values macros expand to for one evaluation.
pub struct Values<'a> {
    pub sender: &'a str,
    pub local: &'a str,
    pub sender_domain: &'a str,
    pub domain: &'a str,
    pub ip: IpAddr,
    pub helo: &'a str,
    pub receiver: &'a str,
    /// `%{p}`: the validated client name, resolved beforehand by the evaluator when
    /// the string uses it ([`uses_ptr`]).
    pub ptr: &'a str,
}

/// The first syntax error of a macro string, for the permerror reason.
#[derive(Debug)]
pub struct MacroError(pub String);

enum Piece<'s> {
    Literal(&'s str),
    Macro {
        letter: u8,
        upper: bool,
        digits: Option<u32>,
        reverse: bool,
        delimiters: &'s str,
    },
}

/// Walks `text`, handing each literal run and macro to `visit`; returns whether the
/// string ends with a macro-expand (a domain-spec may end with one instead of a
/// toplabel).
fn scan<'s>(
    text: &'s str,
    context: Context,
    mut visit: impl FnMut(Piece<'s>),
) -> Result<bool, MacroError> {
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut ends_with_macro = false;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i] != b'%' {
            let b = bytes[i];
            let allowed =
                (0x21..=0x7e).contains(&b) || (b == b' ' && context == Context::Explanation);
            if !allowed {
                return Err(MacroError(format!("character {:?} in {text:?}", b as char)));
            }
            i += 1;
        }
        if i > start {
            visit(Piece::Literal(&text[start..i]));
            ends_with_macro = false;
        }
        if i >= bytes.len() {
            break;
        }
        // bytes[i] == '%'
        match bytes.get(i + 1) {
            Some(b'%') => visit(Piece::Literal("%")),
            Some(b'_') => visit(Piece::Literal(" ")),
            Some(b'-') => visit(Piece::Literal("%20")),
            Some(b'{') => {
                let close = text[i + 2..]
                    .find('}')
                    .ok_or_else(|| MacroError(format!("unterminated macro in {text:?}")))?;
                let body = &text[i + 2..i + 2 + close];
                visit(parse_macro(body, context, text)?);
                i += 2 + close + 1;
                ends_with_macro = true;
                continue;
            }
            _ => return Err(MacroError(format!("lone '%' in {text:?}"))),
        }
        i += 2;
        ends_with_macro = true;
    }
    Ok(ends_with_macro)
}

fn parse_macro<'s>(body: &'s str, context: Context, text: &str) -> Result<Piece<'s>, MacroError> {
    let bad = || MacroError(format!("invalid macro %{{{body}}} in {text:?}"));
    let mut chars = body.bytes();
    let first = chars.next().ok_or_else(bad)?;
    let letter = first.to_ascii_lowercase();
    match letter {
        b's' | b'l' | b'o' | b'd' | b'i' | b'p' | b'h' | b'v' => {}
        b'c' | b'r' | b't' if context != Context::Domain => {}
        _ => return Err(bad()),
    }
    let rest = &body[1..];
    let digits_end = rest.bytes().take_while(u8::is_ascii_digit).count();
    let digits = if digits_end == 0 {
        None
    } else {
        let value = rest[..digits_end].bytes().fold(0u32, |n, d| {
            n.saturating_mul(10).saturating_add(u32::from(d - b'0'))
        });
        // Section 7.3: "If a DIGIT is specified, the value MUST be nonzero."
        if value == 0 {
            return Err(bad());
        }
        Some(value)
    };
    let mut rest = &rest[digits_end..];
    let reverse = rest.starts_with(['r', 'R']);
    if reverse {
        rest = &rest[1..];
    }
    if !rest.bytes().all(|b| b".-+,/_=".contains(&b)) {
        return Err(bad());
    }
    Ok(Piece::Macro {
        letter,
        upper: first.is_ascii_uppercase(),
        digits,
        reverse,
        delimiters: rest,
    })
}

/// Checks the syntax; returns whether the string ends with a macro-expand.
pub fn check(text: &str, context: Context) -> Result<bool, MacroError> {
    scan(text, context, |_| {})
}

/// Whether expanding `text` needs `%{p}` (a DNS look-up the evaluator does first).
pub fn uses_ptr(text: &str) -> bool {
    text.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'{' && w[2].eq_ignore_ascii_case(&b'p'))
}

/// A domain name is at most 253 octets and is cut from the left (section 7.3), so of
/// a longer expansion only the last part matters: past `KEEP_DOMAIN * 2` octets the
/// front is dropped. Without this, a record of 60 KB of `%{s}` with a 500-octet sender
/// would expand to 7.5 MB per term.
const KEEP_DOMAIN: usize = 1024;
/// An explanation longer than this is no explanation (section 6.2 lets a receiver
/// give none).
pub const MAX_EXPLANATION: usize = 1024;

/// Expands `text` (already checked) into `out`. A domain-spec's expansion keeps at
/// least its last [`KEEP_DOMAIN`] octets (all a query name can use); an explanation
/// over [`MAX_EXPLANATION`] octets is an error.
pub fn expand(
    text: &str,
    context: Context,
    values: &Values<'_>,
    out: &mut String,
) -> Result<(), MacroError> {
    let mut scratch = String::new();
    let mut too_long = false;
    scan(text, context, |piece| {
        if too_long {
            return;
        }
        expand_piece(piece, values, out, &mut scratch);
        if context == Context::Explanation {
            too_long = out.len() > MAX_EXPLANATION;
        } else if out.len() > 2 * KEEP_DOMAIN {
            let mut cut = out.len() - KEEP_DOMAIN;
            while !out.is_char_boundary(cut) {
                cut += 1;
            }
            out.drain(..cut);
        }
    })?;
    if too_long {
        return Err(MacroError(format!(
            "the explanation is longer than {MAX_EXPLANATION} octets"
        )));
    }
    Ok(())
}

fn expand_piece(piece: Piece<'_>, values: &Values<'_>, out: &mut String, scratch: &mut String) {
    match piece {
        Piece::Literal(literal) => out.push_str(literal),
        Piece::Macro {
            letter,
            upper,
            digits,
            reverse,
            delimiters,
        } => {
            scratch.clear();
            value(letter, values, scratch);
            let delimiters = if delimiters.is_empty() {
                "."
            } else {
                delimiters
            };
            let parts: Vec<&str> = scratch.split(|c| delimiters.contains(c)).collect();
            let take = digits.map_or(parts.len(), |n| (n as usize).min(parts.len()));
            let start = out.len();
            let mut first = true;
            let mut push = |part: &str, out: &mut String| {
                if !first {
                    out.push('.');
                }
                first = false;
                out.push_str(part);
            };
            if reverse {
                for part in parts.iter().rev().skip(parts.len() - take) {
                    push(part, out);
                }
            } else {
                for part in parts.iter().skip(parts.len() - take) {
                    push(part, out);
                }
            }
            if upper {
                let expanded = out.split_off(start);
                url_escape(&expanded, out);
            }
        }
    }
}

fn value(letter: u8, values: &Values<'_>, out: &mut String) {
    match letter {
        b's' => out.push_str(values.sender),
        b'l' => out.push_str(values.local),
        b'o' => out.push_str(values.sender_domain),
        b'd' => out.push_str(values.domain),
        b'h' => out.push_str(values.helo),
        b'r' => out.push_str(values.receiver),
        b'p' => out.push_str(values.ptr),
        b'v' => out.push_str(match values.ip {
            IpAddr::V4(_) => "in-addr",
            IpAddr::V6(_) => "ip6",
        }),
        b'i' => match values.ip {
            IpAddr::V4(ip) => {
                let _ = write!(out, "{ip}");
            }
            IpAddr::V6(ip) => {
                for (n, byte) in ip.octets().iter().enumerate() {
                    if n > 0 {
                        out.push('.');
                    }
                    let _ = write!(out, "{:x}.{:x}", byte >> 4, byte & 0xf);
                }
            }
        },
        b'c' => {
            let _ = write!(out, "{}", values.ip);
        }
        b't' => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let _ = write!(out, "{now}");
        }
        _ => {}
    }
}

/// Section 7.3: upper-case macro letters are URL-escaped (RFC 3986 unreserved kept).
fn url_escape(text: &str, out: &mut String) {
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(ip: &str) -> Values<'static> {
        Values {
            sender: "strong-bad@email.example.com",
            local: "strong-bad",
            sender_domain: "email.example.com",
            domain: "email.example.com",
            ip: ip.parse().unwrap(),
            helo: "mx.example.org",
            receiver: "receiver.test",
            ptr: "unknown",
        }
    }

    fn x(text: &str, ip: &str) -> String {
        let mut out = String::new();
        check(text, Context::Explanation).unwrap();
        expand(text, Context::Explanation, &values(ip), &mut out).unwrap();
        out
    }

    /// The examples of RFC 7208 section 7.4.
    #[test]
    fn rfc_examples() {
        let v4 = "192.0.2.3";
        assert_eq!(x("%{s}", v4), "strong-bad@email.example.com");
        assert_eq!(x("%{o}", v4), "email.example.com");
        assert_eq!(x("%{d4}", v4), "email.example.com");
        assert_eq!(x("%{d3}", v4), "email.example.com");
        assert_eq!(x("%{d2}", v4), "example.com");
        assert_eq!(x("%{d1}", v4), "com");
        assert_eq!(x("%{dr}", v4), "com.example.email");
        assert_eq!(x("%{d2r}", v4), "example.email");
        assert_eq!(x("%{l}", v4), "strong-bad");
        assert_eq!(x("%{l-}", v4), "strong.bad");
        assert_eq!(x("%{lr}", v4), "strong-bad");
        assert_eq!(x("%{lr-}", v4), "bad.strong");
        assert_eq!(x("%{l1r-}", v4), "strong");
        assert_eq!(
            x("%{ir}.%{v}._spf.%{d2}", v4),
            "3.2.0.192.in-addr._spf.example.com"
        );
        assert_eq!(
            x("%{lr-}.lp._spf.%{d2}", v4),
            "bad.strong.lp._spf.example.com"
        );
        assert_eq!(
            x("%{ir}.%{v}._spf.%{d2}", "2001:db8::cb01"),
            "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com"
        );
        assert_eq!(x("%%%_%-", v4), "% %20");
        assert_eq!(x("%{S}", v4), "strong-bad%40email.example.com");
    }

    /// A hostile record cannot make one expansion large: a domain keeps only the end a
    /// query name can use (the same name results), an explanation has a maximum.
    #[test]
    fn expansions_are_bounded() {
        let sender = format!("{}@email.example.com", "x".repeat(40));
        let values = Values {
            sender: &sender,
            ..values("192.0.2.3")
        };
        let text = format!("{}example.com", "%{s}.".repeat(10_000));
        check(&text, Context::Domain).unwrap();
        let mut out = String::new();
        expand(&text, Context::Domain, &values, &mut out).unwrap();
        assert!(out.len() <= 2 * KEEP_DOMAIN + 100, "{}", out.len());
        let full = format!("{}example.com", format!("{}.", sender).repeat(10_000));
        assert_eq!(
            crate::auth::spf::lookup::query_name(&out),
            crate::auth::spf::lookup::query_name(&full)
        );
        assert!(crate::auth::spf::lookup::query_name(&out).is_some());
        let text = "%{s} ".repeat(100);
        let mut out = String::new();
        assert!(expand(&text, Context::Explanation, &values, &mut out).is_err());
        let mut out = String::new();
        assert!(expand("%{s} ok", Context::Explanation, &values, &mut out).is_ok());
    }

    #[test]
    fn syntax_errors() {
        for bad in ["%", "%{", "%{x}", "%{d0}", "%{d2x}", "%a", "%{}"] {
            assert!(check(bad, Context::Domain).is_err(), "{bad}");
        }
        assert!(check("%{c}", Context::Domain).is_err());
        assert!(check("%{c}", Context::Explanation).is_ok());
        assert!(check("a b", Context::Domain).is_err());
        assert!(check("a b", Context::Explanation).is_ok());
        assert!(check("%{d}", Context::Domain).unwrap());
        assert!(!check("%{d}.com", Context::Domain).unwrap());
    }
}
