//! What the checks know of the header section comes from our one reading of it
//! (`rewrite::section`), and mail-auth must have read the same thing.
//!
//! mail-auth parses the message again for DKIM, ARC and DMARC. Its reader is more
//! lenient than ours, and ours refuses every case where they could differ; this module
//! proves it for each message: the same fields at the same offsets, the same body, the
//! same From addresses. A message where they differ anyway is refused, never judged by
//! one reading and relayed by another.

use crate::findings::FromHeader;
use crate::rewrite::section::HeaderSection;
use mail_auth::AuthenticatedMessage;
use mail_parser::{Address, HeaderValue};

/// The From header fields as DMARC and the policy see them, from our reading.
pub fn from_header(section: &HeaderSection<'_>, message: &[u8]) -> FromHeader {
    let mut fields = 0;
    let mut addresses = Vec::new();
    let mut unusable = Vec::new();
    for field in section.named("From") {
        fields += 1;
        // The value with its CRLF, as mail-auth hands it to the same address parser.
        let value = &message[field.value_start..field.range.end];
        for address in from_addresses(value) {
            match super::author_address(&address) {
                Some(normal) => addresses.push(normal),
                None => unusable.push(address),
            }
        }
    }
    let mut domains: Vec<String> = addresses
        .iter()
        .filter_map(|a| a.rsplit_once('@'))
        .map(|(_, d)| d.to_string())
        .collect();
    domains.sort();
    domains.dedup();
    FromHeader {
        fields,
        addresses,
        domains,
        unusable,
    }
}

/// The addresses of one From value, lowercased (what mail-auth 0.13 collects).
fn from_addresses(value: &[u8]) -> Vec<String> {
    let parsed = mail_parser::parsers::MessageStream::new(value).parse_address();
    let lower = |a: &mail_parser::Addr<'_>| a.address.as_ref().map(|a| a.to_lowercase());
    match parsed {
        HeaderValue::Address(Address::List(list)) => list.iter().filter_map(lower).collect(),
        HeaderValue::Address(Address::Group(groups)) => groups
            .iter()
            .flat_map(|g| g.addresses.iter().filter_map(lower))
            .collect(),
        _ => Vec::new(),
    }
}

/// Whether mail-auth read the header section exactly as we did: every field's name and
/// value at the same offsets, the body at the same offset, and the From addresses of
/// `from` (our reading, [`from_header`]) in the same order.
pub fn reads_alike(
    section: &HeaderSection<'_>,
    message: &[u8],
    parsed: Option<&AuthenticatedMessage<'_>>,
    from: &FromHeader,
) -> bool {
    let Some(parsed) = parsed else {
        return section.fields.is_empty();
    };
    let base = message.as_ptr() as usize;
    let offset = |bytes: &[u8]| (bytes.as_ptr() as usize).wrapping_sub(base);
    let same_fields = parsed.raw_message.as_ptr() == message.as_ptr()
        && parsed.body_offset() == section.body_offset
        && parsed.headers.len() == section.fields.len()
        && parsed
            .headers
            .iter()
            .zip(&section.fields)
            .all(|((name, value), field)| {
                offset(name) == field.range.start
                    && name.len() == field.name.len()
                    && offset(value) == field.value_start
                    && offset(value) + value.len() == field.range.end
            });
    same_fields && same_froms(parsed.froms(), from)
}

/// mail-auth's From addresses (as written, lowercased) against ours, which are split
/// into usable (normalised) and unusable ones, each list in order.
fn same_froms(theirs: &[String], ours: &FromHeader) -> bool {
    let (mut usable, mut unusable) = (ours.addresses.iter(), ours.unusable.iter());
    theirs.len() == ours.addresses.len() + ours.unusable.len()
        && theirs.iter().all(|a| match super::author_address(a) {
            Some(normal) => usable.next() == Some(&normal),
            None => unusable.next() == Some(a),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::section::{SectionLimits, read_section};

    const LIMITS: SectionLimits = SectionLimits {
        max_size: 100_000,
        max_fields: 1000,
    };

    #[test]
    fn well_formed_sections_read_alike() {
        for msg in [
            &b"From: A <a@x.test>\r\nTo: b@y.test\r\nSubject: s\r\n t\r\n\r\nbody\r\n"[..],
            b"From: a@x.test, B <b@Y.test>\r\n\r\n",
            b"From: a@x.test\r\n",
            b"Subject: no from\r\n\r\n",
            b"From: group: a@x.test, b@x.test;\r\n\r\nbody",
        ] {
            let section = read_section(msg, LIMITS).unwrap();
            let parsed = AuthenticatedMessage::parse(msg);
            let from = from_header(&section, msg);
            assert!(
                reads_alike(&section, msg, parsed.as_ref(), &from),
                "{}",
                String::from_utf8_lossy(msg)
            );
        }
    }

    #[test]
    fn different_from_addresses_do_not_read_alike() {
        let msg = b"From: a@x.test\r\n\r\n";
        let section = read_section(msg, LIMITS).unwrap();
        let parsed = AuthenticatedMessage::parse(msg);
        let mut from = from_header(&section, msg);
        assert!(reads_alike(&section, msg, parsed.as_ref(), &from));
        from.addresses = vec!["a@other.test".into()];
        assert!(!reads_alike(&section, msg, parsed.as_ref(), &from));
        from.addresses.clear();
        assert!(!reads_alike(&section, msg, parsed.as_ref(), &from));
    }

    #[test]
    fn from_header_counts_and_normalises() {
        let msg = b"From: A <a@X.Test.>\r\nfrom: b@y.test\r\n\r\n";
        let section = read_section(msg, LIMITS).unwrap();
        let from = from_header(&section, msg);
        assert_eq!(from.fields, 2);
        assert_eq!(from.addresses, ["a@x.test", "b@y.test"]);
        assert_eq!(from.domains, ["x.test", "y.test"]);
    }
}
