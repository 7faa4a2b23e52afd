//! SPF record syntax (RFC 7208 sections 4.5, 4.6.1, 5, 6 and 12), strictly: any term
//! that does not follow the ABNF makes the whole record a syntax error (section 4.6:
//! permerror, "without further interpretation or evaluation"). The parsed record
//! borrows the TXT text; parsing allocates only the list of directives.

use super::macros::{self, Context};
use std::net::{Ipv4Addr, Ipv6Addr};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qualifier {
    Pass,
    Fail,
    SoftFail,
    Neutral,
}

/// A domain-spec whose syntax was checked (macro-string, then a toplabel or a macro).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainSpec<'r>(pub &'r str);

/// `a` and `mx` prefix lengths (`dual-cidr-length`); 32 and 128 when absent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DualCidr {
    pub v4: u8,
    pub v6: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism<'r> {
    All,
    Include(DomainSpec<'r>),
    A(Option<DomainSpec<'r>>, DualCidr),
    Mx(Option<DomainSpec<'r>>, DualCidr),
    Ptr(Option<DomainSpec<'r>>),
    Ip4(Ipv4Addr, u8),
    Ip6(Ipv6Addr, u8),
    Exists(DomainSpec<'r>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Directive<'r> {
    pub qualifier: Qualifier,
    pub mechanism: Mechanism<'r>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Record<'r> {
    pub directives: Vec<Directive<'r>>,
    pub redirect: Option<DomainSpec<'r>>,
    pub exp: Option<DomainSpec<'r>>,
}

/// Section 4.5: a record is a TXT string starting with `v=spf1` followed by a space or
/// its end (case-insensitively; `v=spf10` is not one).
pub fn is_spf(txt: &[u8]) -> bool {
    txt.len() >= 6
        && txt[..6].eq_ignore_ascii_case(b"v=spf1")
        && txt.get(6).is_none_or(|&b| b == b' ')
}

/// Parses a record already selected by [`is_spf`]. The error names the offending term.
pub fn parse(txt: &[u8]) -> Result<Record<'_>, String> {
    if let Some(&bad) = txt.iter().find(|&&b| !(0x20..=0x7e).contains(&b)) {
        return Err(format!(
            "the record holds a byte that is not printable ASCII (0x{bad:02x})"
        ));
    }
    // Printable ASCII only, so this cannot fail.
    let text = std::str::from_utf8(txt).map_err(|_| "not ASCII".to_string())?;
    let mut record = Record::default();
    for term in text[6..].split(' ').filter(|t| !t.is_empty()) {
        parse_term(term, &mut record).map_err(|why| format!("term {term:?}: {why}"))?;
    }
    Ok(record)
}

fn parse_term<'r>(term: &'r str, record: &mut Record<'r>) -> Result<(), &'static str> {
    let name_end = term.find([':', '/', '=']).unwrap_or(term.len());
    if term[name_end..].starts_with('=') {
        let (name, value) = (&term[..name_end], &term[name_end + 1..]);
        let valid_name = name.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !valid_name {
            return Err("invalid modifier name");
        }
        let slot = if name.eq_ignore_ascii_case("redirect") {
            &mut record.redirect
        } else if name.eq_ignore_ascii_case("exp") {
            &mut record.exp
        } else {
            macros::check(value, Context::Modifier).map_err(|_| "invalid macro string")?;
            return Ok(());
        };
        if slot.is_some() {
            return Err("modifier given twice");
        }
        *slot = Some(domain_spec(value)?);
        return Ok(());
    }
    let (qualifier, body) = match term.as_bytes()[0] {
        b'+' => (Qualifier::Pass, &term[1..]),
        b'-' => (Qualifier::Fail, &term[1..]),
        b'~' => (Qualifier::SoftFail, &term[1..]),
        b'?' => (Qualifier::Neutral, &term[1..]),
        _ => (Qualifier::Pass, term),
    };
    let name_end = body.find([':', '/']).unwrap_or(body.len());
    let (name, rest) = body.split_at(name_end);
    let argument = rest.strip_prefix(':');
    let mechanism = match name.to_ascii_lowercase().as_str() {
        "all" if rest.is_empty() => Mechanism::All,
        "include" => Mechanism::Include(domain_spec(argument.ok_or("include needs a domain")?)?),
        "exists" => Mechanism::Exists(domain_spec(argument.ok_or("exists needs a domain")?)?),
        "ptr" => match argument {
            Some(domain) => Mechanism::Ptr(Some(domain_spec(domain)?)),
            None if rest.is_empty() => Mechanism::Ptr(None),
            None => return Err("invalid ptr"),
        },
        "a" | "mx" => {
            let (domain, cidr) = match argument {
                Some(argument) => {
                    let (domain, cidr) = dual_cidr(argument)?;
                    (Some(domain_spec(domain)?), cidr)
                }
                None => {
                    let (domain, cidr) = dual_cidr(rest)?;
                    if !domain.is_empty() {
                        return Err("invalid prefix length");
                    }
                    (None, cidr)
                }
            };
            if name.eq_ignore_ascii_case("a") {
                Mechanism::A(domain, cidr)
            } else {
                Mechanism::Mx(domain, cidr)
            }
        }
        "ip4" => {
            let argument = argument.ok_or("ip4 needs a network")?;
            let (network, length) = match argument.split_once('/') {
                Some((network, length)) => (network, cidr_length(length, 32)?),
                None => (argument, 32),
            };
            Mechanism::Ip4(network.parse().map_err(|_| "invalid IPv4 network")?, length)
        }
        "ip6" => {
            let argument = argument.ok_or("ip6 needs a network")?;
            let (network, length) = match argument.split_once('/') {
                Some((network, length)) => (network, cidr_length(length, 128)?),
                None => (argument, 128),
            };
            Mechanism::Ip6(network.parse().map_err(|_| "invalid IPv6 network")?, length)
        }
        _ => return Err("unknown mechanism"),
    };
    record.directives.push(Directive {
        qualifier,
        mechanism,
    });
    Ok(())
}

/// `ip4-cidr-length` / `ip6-cidr-length`: no leading zero, within the address size.
fn cidr_length(digits: &str, max: u8) -> Result<u8, &'static str> {
    let valid = !digits.is_empty()
        && digits.len() <= 3
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    let value: u16 = if valid {
        digits.parse().map_err(|_| "invalid prefix length")?
    } else {
        return Err("invalid prefix length");
    };
    if value > u16::from(max) {
        return Err("prefix length too long");
    }
    Ok(value as u8)
}

/// Splits `domain/v4//v6` at the end of an `a`/`mx` argument. A domain-spec may hold
/// '/' itself (`foo:bar/baz.example.com`), so only a trailing run of digits is a length.
fn dual_cidr(argument: &str) -> Result<(&str, DualCidr), &'static str> {
    let mut cidr = DualCidr { v4: 32, v6: 128 };
    let trailing = |text: &str| -> Option<usize> {
        let digits = text.bytes().rev().take_while(u8::is_ascii_digit).count();
        let at = text.len() - digits;
        (digits > 0 && text[..at].ends_with('/')).then_some(at)
    };
    let mut rest = argument;
    if let Some(at) = trailing(rest)
        && rest[..at].ends_with("//")
    {
        cidr.v6 = cidr_length(&rest[at..], 128)?;
        rest = &rest[..at - 2];
    }
    if let Some(at) = trailing(rest)
        && !rest[..at].ends_with("//")
    {
        cidr.v4 = cidr_length(&rest[at..], 32)?;
        rest = &rest[..at - 1];
    }
    Ok((rest, cidr))
}

/// `domain-spec = macro-string domain-end`, `domain-end = ( "." toplabel [ "." ] ) /
/// macro-expand` (section 7.1).
fn domain_spec(text: &str) -> Result<DomainSpec<'_>, &'static str> {
    let ends_with_macro =
        macros::check(text, Context::Domain).map_err(|_| "invalid macro in domain")?;
    if ends_with_macro {
        return Ok(DomainSpec(text));
    }
    let trimmed = text.strip_suffix('.').unwrap_or(text);
    let (_, top) = trimmed
        .rsplit_once('.')
        .ok_or("domain without a top label")?;
    if !toplabel(top) {
        return Err("invalid top label");
    }
    Ok(DomainSpec(text))
}

/// `toplabel = ( *alphanum ALPHA *alphanum ) / ( 1*alphanum "-" *( alphanum / "-" ) alphanum )`
fn toplabel(label: &str) -> bool {
    let bytes = label.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        && first.is_ascii_alphanumeric()
        && last.is_ascii_alphanumeric()
        && bytes.iter().any(|b| b.is_ascii_alphabetic() || *b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Record<'_> {
        parse(text.as_bytes()).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn err(text: &str) {
        assert!(parse(text.as_bytes()).is_err(), "{text} should not parse");
    }

    #[test]
    fn selection() {
        assert!(is_spf(b"v=spf1"));
        assert!(is_spf(b"V=SPF1 -all"));
        assert!(!is_spf(b"v=spf10"));
        assert!(!is_spf(b"v=spf1\t-all"));
    }

    #[test]
    fn mechanisms() {
        let r = ok(
            "v=spf1 a mx/24 a:foo:bar/baz.example.com a:%{d}/24//64 ip4:192.0.2.0/24 ip6:2001:db8::/32 -ptr ~exists:%{i}.x.example ?include:a.example redirect=r.example exp=e.example  ",
        );
        assert_eq!(r.directives.len(), 9);
        assert_eq!(
            r.directives[1].mechanism,
            Mechanism::Mx(None, DualCidr { v4: 24, v6: 128 })
        );
        assert_eq!(
            r.directives[2].mechanism,
            Mechanism::A(
                Some(DomainSpec("foo:bar/baz.example.com")),
                DualCidr { v4: 32, v6: 128 }
            )
        );
        assert_eq!(
            r.directives[3].mechanism,
            Mechanism::A(Some(DomainSpec("%{d}")), DualCidr { v4: 24, v6: 64 })
        );
        assert_eq!(r.directives[6].qualifier, Qualifier::Fail);
        assert_eq!(r.redirect, Some(DomainSpec("r.example")));
        assert_eq!(r.exp, Some(DomainSpec("e.example")));
    }

    #[test]
    fn syntax_errors() {
        for bad in [
            "v=spf1 a:foo-bar",
            "v=spf1 a:111.222.33.44",
            "v=spf1 a:museum",
            "v=spf1 a:museum.",
            "v=spf1 a/33",
            "v=spf1 a//129",
            "v=spf1 a/24/64",
            "v=spf1 ip4:1.2.3.4/032",
            "v=spf1 ip4:1.2.3.4/33",
            "v=spf1 ip6::1/129",
            "v=spf1 =foo",
            "v=spf1 1up=foo",
            "v=spf1 exp=",
            "v=spf1 redirect=-all",
            "v=spf1 exp=a.example exp=b.example",
            "v=spf1 include:",
            "v=spf1 all:foo",
            "v=spf1 foo",
            "v=spf1 a:%{x}.example",
            "v=spf1 ip4:192.0.2.1\n",
            "v=spf1 exists:%{c}.example",
        ] {
            err(bad);
        }
    }
}
