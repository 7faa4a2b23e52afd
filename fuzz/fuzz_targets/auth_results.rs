//! Readers of Authentication-Results written by others: `auth::resinfo::parse` (the
//! trusted sealer's ARC-Authentication-Results), `rewrite::strip::authserv_id_of` and
//! `forged_results` over `rewrite::section::read_section` (the strip of forged A-R).
//!
//! Invariants, beyond "no panic": an authserv-id found is a non-empty part of the value
//! without SP, HTAB, CR, LF or `;` (unless it was quoted); every method and result is
//! lower case (the override compares them as such); a field named as forged is an Authentication-Results field
//! of the message, whole; a field that starts with our authserv-id is stripped whatever
//! follows it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxgate::auth::resinfo;
use mxgate::rewrite::section::{SectionLimits, read_section};
use mxgate::rewrite::strip::{authserv_id_of, forged_results};

const LIMITS: SectionLimits = SectionLimits {
    max_size: 256 * 1024,
    max_fields: 1000,
};

fuzz_target!(|data: &[u8]| {
    if let Some(id) = authserv_id_of(data) {
        assert!(!id.is_empty());
        // A quoted-string authserv-id (RFC 8601's `value`) may hold any of these; it
        // then never equals our domain, which is all the strip needs.
        if !data.contains(&b'"') {
            assert!(
                !id.iter()
                    .any(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b';')),
                "authserv-id {id:?}"
            );
        }
    }

    let text = String::from_utf8_lossy(data);
    for result in resinfo::parse(&text) {
        for part in [&result.method, &result.result] {
            assert_eq!(part, &part.to_ascii_lowercase(), "{result:?}");
        }
    }

    // As a header field of a message: our own A-R must be stripped whatever the
    // field looks like around it, and nothing else is touched.
    let mut message = b"Authentication-Results:".to_vec();
    message.extend_from_slice(data);
    message.extend_from_slice(b"\r\nSubject: x\r\n\r\nbody\r\n");
    // A field our reader refuses is refused with its message (550 5.6.0).
    let Ok(section) = read_section(&message, LIMITS) else {
        return;
    };
    let fields = &section.fields;
    for range in forged_results(fields, "mx.example.test") {
        let field = fields
            .iter()
            .find(|f| f.range == range)
            .expect("a forged range is one field");
        assert!(field.is("Authentication-Results"));
    }

    let mut ours = b"Authentication-Results: mx.example.test;".to_vec();
    ours.extend_from_slice(data);
    ours.extend_from_slice(b"\r\n\r\nbody\r\n");
    let Ok(section) = read_section(&ours, LIMITS) else {
        return;
    };
    let forged = forged_results(&section.fields, "mx.example.test");
    assert_eq!(
        forged.first().map(|r| r.start),
        Some(0),
        "our own A-R field survived the strip"
    );
});
