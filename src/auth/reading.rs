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

/// The From header fields as written: how many, and their addresses lowercased, in
/// order (what mail-auth 0.13 collects). Everything DMARC and the policy know of the
/// author is derived from this, once [`reads_alike`] has shown mail-auth read the same.
#[derive(Debug)]
pub struct WrittenFroms {
    fields: usize,
    addresses: Vec<String>,
}

/// The From header fields of our reading.
pub fn written_froms(section: &HeaderSection<'_>, message: &[u8]) -> WrittenFroms {
    let mut fields = 0;
    let mut addresses = Vec::new();
    for field in section.named("From") {
        fields += 1;
        // The value with its CRLF, as mail-auth hands it to the same address parser.
        addresses.extend(from_addresses(&message[field.value_start..field.range.end]));
    }
    WrittenFroms { fields, addresses }
}

impl WrittenFroms {
    /// The From header as DMARC and the policy see it: addresses normalised, those
    /// without a usable domain set apart.
    pub fn header(&self) -> FromHeader {
        let mut addresses = Vec::new();
        let mut unusable = Vec::new();
        for address in &self.addresses {
            match super::author_address(address) {
                Some(normal) => addresses.push(normal),
                None => unusable.push(address.clone()),
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
            fields: self.fields,
            addresses,
            domains,
            unusable,
        }
    }
}

/// The From header of our reading without the cross-check (for tests and tools that
/// read a message outside the gateway).
pub fn from_header(section: &HeaderSection<'_>, message: &[u8]) -> FromHeader {
    written_froms(section, message).header()
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
/// `froms` (our reading, [`written_froms`]) as written and in the same order.
pub fn reads_alike(
    section: &HeaderSection<'_>,
    message: &[u8],
    parsed: Option<&AuthenticatedMessage<'_>>,
    froms: &WrittenFroms,
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
    // Compared as written: the normalised addresses are a function of these.
    same_fields && parsed.froms() == froms.addresses.as_slice()
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
            let froms = written_froms(&section, msg);
            assert!(
                reads_alike(&section, msg, parsed.as_ref(), &froms),
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
        let mut froms = written_froms(&section, msg);
        assert!(reads_alike(&section, msg, parsed.as_ref(), &froms));
        froms.addresses = vec!["a@other.test".into()];
        assert!(!reads_alike(&section, msg, parsed.as_ref(), &froms));
        froms.addresses = vec!["a@x.test".into(), "a@x.test".into()];
        assert!(!reads_alike(&section, msg, parsed.as_ref(), &froms));
        froms.addresses.clear();
        assert!(!reads_alike(&section, msg, parsed.as_ref(), &froms));
    }

    #[test]
    fn from_header_counts_and_normalises() {
        let msg = b"From: A <a@X.Test.>\r\nfrom: b@y.test, c@bank..test\r\n\r\n";
        let section = read_section(msg, LIMITS).unwrap();
        let from = written_froms(&section, msg).header();
        assert_eq!(from.fields, 2);
        assert_eq!(from.addresses, ["a@x.test", "b@y.test"]);
        assert_eq!(from.domains, ["x.test", "y.test"]);
        assert_eq!(from.unusable, ["c@bank..test"]);
    }
}
