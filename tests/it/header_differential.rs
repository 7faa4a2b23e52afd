//! Differential test of the header-section reader (issue 11 item 1): thousands of
//! malformed header sections go through mail-auth's parser, mail-parser's (what a
//! backend built on it would read) and ours. For every section we accept, all of them
//! see the same From fields and addresses; everything else we refuse. No From survives
//! on which the readers disagree.

use mail_auth::AuthenticatedMessage;
use mxgate::auth::reading::{reads_alike, written_froms};
use mxgate::rewrite::section::{SectionLimits, read_section};

const LIMITS: SectionLimits = SectionLimits {
    max_size: 256 * 1024,
    max_fields: 1000,
};

/// Pieces a header section is built from: well-formed fields, and every kind of line
/// two readers have been seen to take differently.
const PIECES: &[&[u8]] = &[
    b"From: a@good.test\r\n",
    b"From: Netvisor <noreply@netvisor.fi>\r\n",
    b"FROM:upper@case.test\r\n",
    b"from:\r\n folded@fold.test\r\n",
    b"From: a@one.test,\r\n b@two.test\r\n",
    b"From: group: g1@grp.test, g2@grp.test;\r\n",
    b"From: \"x@quoted.test\" <real@inner.test>\r\n",
    b"From: (comment@c.test) plain@p.test\r\n",
    "From: J\u{f6}rg <j\u{f6}rg@b\u{fc}cher.test>\r\n".as_bytes(),
    b"From: =?utf-8?q?x=40evil.test?= <real@encoded.test>\r\n",
    b"From: \"a@b.test\" <c@d.test>, e@f.test\r\n",
    b"From: <>\r\n",
    b"From: a@trailing.dot.test.\r\n",
    b"To: bob@example.test\r\n",
    b"Subject: hello\r\n",
    b"Subject: folded\r\n continued\r\n",
    b"X-Empty:\r\n",
    b"   \r\n",
    b"\t\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=x.test; s=s; h=from; bh=AAAA; b=AAAA\r\n",
    // Neither a field nor a continuation.
    b"X-Junk\r\n",
    b"From\r\n",
    b"no colon here\r\n",
    // White space in or before the name.
    b"From : space@before.test\r\n",
    b"From\t: tab@before.test\r\n",
    b"Fr om: split@name.test\r\n",
    b" From: folded@first.test\r\n",
    b"\tFrom: tabbed@first.test\r\n",
    // Empty names, 8-bit, controls, NUL.
    b": empty@name.test\r\n",
    b"Fr\xc3\xb6m: eightbit@name.test\r\n",
    b"\xffFrom: ff@name.test\r\n",
    b"Fr\x01om: ctl@name.test\r\n",
    b"From: nul\x00@value.test\r\n",
    b"\x00From: nul@name.test\r\n",
    // Bare line endings.
    b"From: bare@lf.test\n",
    b"From: bare@cr.test\r",
    b"X-A: a\rFrom: crinside@value.test\r\n",
    b"X-B: b\nFrom: lfinside@value.test\r\n",
    b"\n",
    b"\r",
    b"From\n : lf@folded-name.test\r\n",
    b"From\r\n : crlf@folded-name.test\r\n",
    // Look-alike names.
    b"From_: underscore@name.test\r\n",
    b"X-From: xfrom@name.test\r\n",
    b"Sender: sender@name.test\r\n",
];

/// Deterministic xorshift, so a failure names a reproducible case.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn corpus() -> Vec<Vec<u8>> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::new();
    // Every piece alone and every ordered pair, then random sequences.
    for a in PIECES {
        out.push([*a, b"\r\nbody\r\n"].concat());
        for b in PIECES {
            out.push([*a, *b, b"\r\nbody\r\n"].concat());
        }
    }
    for _ in 0..20_000 {
        let mut message = Vec::new();
        for _ in 0..1 + rng.below(8) {
            message.extend_from_slice(PIECES[rng.below(PIECES.len())]);
        }
        match rng.below(5) {
            0 => {}                                            // no body, no empty line
            1 => message.extend_from_slice(b"\r\n"),           // empty body
            2 => message.extend_from_slice(b"From"),           // unterminated last line
            3 => message.extend_from_slice(&vec![b'x'; 3000]), // a very long last line
            _ => message.extend_from_slice(b"\r\nbody\r\nFrom: in@body.test\r\n"),
        }
        out.push(message);
    }
    out
}

/// Which fields mail-auth 0.13 treats as From: its `classify_name` on the name as
/// written, white space and folding ignored, only letters, digits and `-` allowed.
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

/// The From addresses a mail-parser based backend would see.
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

#[test]
fn no_from_survives_on_which_the_readers_disagree() {
    let corpus = corpus();
    let (mut accepted, mut refused, mut refused_by_agreement) = (0, 0, 0);
    for message in &corpus {
        let shown = String::from_utf8_lossy(message).escape_debug().to_string();
        let Ok(section) = read_section(message, LIMITS) else {
            refused += 1;
            continue;
        };
        let parsed = AuthenticatedMessage::parse(message);
        let froms = written_froms(&section, message);
        if !reads_alike(&section, message, parsed.as_ref(), &froms) {
            // The gateway refuses these too (550 5.6.0); count them, since each one
            // is a case our reader let through and only the cross-check caught.
            refused_by_agreement += 1;
            continue;
        }
        accepted += 1;
        let ours = froms.header();
        let our_raw: Vec<String> = ours
            .addresses
            .iter()
            .chain(&ours.unusable)
            .cloned()
            .collect();
        match &parsed {
            Some(parsed) => {
                assert_eq!(mail_auth_from_count(parsed), ours.fields, "{shown}");
                let mut theirs: Vec<String> = parsed
                    .froms()
                    .iter()
                    .map(|a| match mxgate_normal(a) {
                        Some(normal) => normal,
                        None => a.clone(),
                    })
                    .collect();
                theirs.sort();
                let mut mine = our_raw.clone();
                mine.sort();
                assert_eq!(theirs, mine, "{shown}");
            }
            None => assert_eq!(ours.fields, 0, "{shown}"),
        }
        // A backend reading with mail-parser sees the same From addresses.
        let mut backend = mail_parser_froms(message);
        backend.sort();
        let mut raw: Vec<String> = section
            .named("From")
            .flat_map(|f| {
                let value = &message[f.value_start..f.range.end];
                raw_addresses(value)
            })
            .collect();
        raw.sort();
        assert_eq!(backend, raw, "{shown}");
    }
    eprintln!(
        "{} header sections: {accepted} accepted, {refused} refused by the reader, {refused_by_agreement} refused by the cross-check",
        corpus.len()
    );
    assert!(
        accepted > 1000 && refused > 1000,
        "the corpus exercises both sides"
    );
    assert_eq!(
        refused_by_agreement, 0,
        "the reader should refuse every disagreement itself"
    );
}

/// The issue's case: mail-auth stops at `X-Junk`, so it sees one From; we refuse.
#[test]
fn the_issue_case_is_a_disagreement_we_refuse() {
    let message =
        b"From: x@attacker.test\r\nX-Junk\r\nFrom: Netvisor <noreply@netvisor.fi>\r\n\r\nbody\r\n";
    let parsed = AuthenticatedMessage::parse(message).unwrap();
    assert_eq!(parsed.froms(), ["x@attacker.test"]);
    assert!(read_section(message, LIMITS).is_err());
    // `From :` is a From field to mail-auth.
    let message = b"From : noreply@netvisor.fi\r\n\r\nbody\r\n";
    let parsed = AuthenticatedMessage::parse(message).unwrap();
    assert_eq!(mail_auth_from_count(&parsed), 1);
    assert!(read_section(message, LIMITS).is_err());
}

/// mxgate's normal form of an author address (lowercase, domain without trailing dot
/// or white space); the raw form when it has none.
fn mxgate_normal(address: &str) -> Option<String> {
    let (local, domain) = address.rsplit_once('@')?;
    let compact: String = domain.chars().filter(|c| !c.is_whitespace()).collect();
    let domain = mxgate::config::DomainName::parse(&compact).ok()?;
    (!local.is_empty()).then(|| format!("{local}@{}", domain.as_str()))
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
