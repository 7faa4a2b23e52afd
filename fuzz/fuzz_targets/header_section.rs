//! The header-section reader (`rewrite::section::read_section`) against the readers
//! that judge or carry the same message: mail-auth's (DKIM, ARC, DMARC) and
//! mail-parser's (a backend built on it).
//!
//! Invariants, beyond "no panic": whenever our reader accepts a header section and the
//! gateway's per-message cross-check (`auth::reading::reads_alike`) agrees, mail-auth
//! counts exactly our From fields and reads exactly our From addresses, and mail-parser
//! finds the same From addresses in the fields we read as From. So no From survives
//! on which the readers disagree: the gateway refuses every such message (550 5.6.0).
//! Accepted fields tile the header section in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mail_auth::AuthenticatedMessage;
use mxgate::auth::reading::{reads_alike, written_froms};
use mxgate::rewrite::section::{SectionLimits, read_section};

const LIMITS: SectionLimits = SectionLimits {
    max_size: 256 * 1024,
    max_fields: 1000,
};

fuzz_target!(|message: &[u8]| {
    let Ok(section) = read_section(message, LIMITS) else {
        return;
    };
    let mut at = 0;
    for field in &section.fields {
        assert_eq!(field.range.start, at, "fields tile the header section");
        assert!(field.range.end > field.range.start);
        at = field.range.end;
    }
    assert!(at <= section.body_offset && section.body_offset <= message.len());

    let parsed = AuthenticatedMessage::parse(message);
    let froms = written_froms(&section, message);
    if !reads_alike(&section, message, parsed.as_ref(), &froms) {
        return; // refused at end of data
    }
    let ours = froms.header();
    let mut mine: Vec<String> = ours
        .addresses
        .iter()
        .chain(&ours.unusable)
        .cloned()
        .collect();
    mine.sort();
    match &parsed {
        Some(parsed) => {
            assert_eq!(mail_auth_from_count(parsed), ours.fields);
            let mut theirs: Vec<String> = parsed
                .froms()
                .iter()
                .map(|a| mxgate_normal(a).unwrap_or_else(|| a.clone()))
                .collect();
            theirs.sort();
            assert_eq!(theirs, mine, "mail-auth reads other From addresses");
        }
        None => assert_eq!(ours.fields, 0),
    }
    let mut backend = mail_parser_froms(message);
    backend.sort();
    let mut raw: Vec<String> = section
        .named("From")
        .flat_map(|f| raw_addresses(&message[f.value_start..f.range.end]))
        .collect();
    raw.sort();
    assert_eq!(backend, raw, "mail-parser reads other From addresses");
});

/// Which fields mail-auth 0.13 treats as From (its name classification: white space
/// and folding ignored, letters, digits and `-` only).
fn mail_auth_from_count(parsed: &AuthenticatedMessage<'_>) -> usize {
    parsed
        .raw_parsed_headers()
        .iter()
        .filter(|(name, _)| {
            let kept: Vec<u8> = name
                .iter()
                .copied()
                .filter(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
                .collect();
            kept.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
                && kept.eq_ignore_ascii_case(b"from")
        })
        .count()
}

/// mxgate's normal form of an author address; `None` when it has none.
fn mxgate_normal(address: &str) -> Option<String> {
    let (local, domain) = address.rsplit_once('@')?;
    let compact: String = domain.chars().filter(|c| !c.is_whitespace()).collect();
    let domain = mxgate::config::DomainName::parse(&compact).ok()?;
    (!local.is_empty()).then(|| format!("{local}@{}", domain.as_str()))
}

fn mail_parser_froms(message: &[u8]) -> Vec<String> {
    let Some(parsed) = mail_parser::MessageParser::new().parse_headers(message) else {
        return Vec::new();
    };
    parsed
        .header_values(mail_parser::HeaderName::From)
        .filter_map(|value| value.as_address())
        .flat_map(|address| {
            address
                .iter()
                .filter_map(|a| a.address.as_ref().map(|a| a.to_lowercase()))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn raw_addresses(value: &[u8]) -> Vec<String> {
    use mail_parser::{Address, HeaderValue};
    match mail_parser::parsers::MessageStream::new(value).parse_address() {
        HeaderValue::Address(Address::List(list)) => list
            .iter()
            .filter_map(|a| a.address.as_ref().map(|a| a.to_lowercase()))
            .collect(),
        HeaderValue::Address(Address::Group(groups)) => groups
            .iter()
            .flat_map(|g| {
                g.addresses
                    .iter()
                    .filter_map(|a| a.address.as_ref().map(|a| a.to_lowercase()))
            })
            .collect(),
        _ => Vec::new(),
    }
}
