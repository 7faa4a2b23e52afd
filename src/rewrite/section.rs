//! The header section, read once: every decision about a message (the From count,
//! DMARC's author domain, the policy's `header_from`, the forged Authentication-Results
//! we leave out, what is relayed) comes from this one reading.
//!
//! Parser disagreement is how a spoofed From gets past a filter: if one reader stops at a
//! line that another reads on through, each judges a different message. So this reader is
//! strict, and refuses (rather than guesses at) anything two readers could take
//! differently. RFC 5322 section 2.2 and 3.6.8 give the grammar; what is refused:
//! - a line that is neither `name:` nor a continuation (mail-auth 0.13 ends the header
//!   section there, while the backend may read on);
//! - white space inside a field name or before the colon (`From :`, obsolete syntax that
//!   mail-auth reads as `From` and a plain name comparison does not);
//! - an empty field name, or a name byte outside printable US-ASCII (8-bit, controls);
//! - a continuation line before the first field;
//! - a continuation line of white space only (obs-FWS): some readers take it for the
//!   empty line that ends the header section, and would read what follows as body;
//! - NUL, a bare CR or a bare LF anywhere in the header section, and a last header line
//!   without its CRLF (mail-auth drops such a last field);
//! - more than `max_fields` fields or more than `max_size` bytes (a bound, not ambiguity).
//!
//! Pure: no I/O, no tokio, no knowledge of mail-auth (the check that mail-auth read the
//! same fields lives in `auth`). One pass over the header bytes; nothing is copied.

use super::headers::HeaderField;
use std::fmt;

/// The bounds on a header section (`server.max_header_size`, `server.max_header_fields`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionLimits {
    pub max_size: usize,
    pub max_fields: usize,
}

/// A header section read by [`read_section`].
#[derive(Clone, Debug)]
pub struct HeaderSection<'a> {
    pub fields: Vec<HeaderField<'a>>,
    /// Where the body starts: after the empty line, or the end of the message when
    /// there is none.
    pub body_offset: usize,
}

impl<'a> HeaderSection<'a> {
    /// The fields called `name` (compared case-insensitively), in order.
    pub fn named<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s HeaderField<'a>> {
        self.fields.iter().filter(move |f| f.is(name))
    }
}

/// Why a header section is refused. Line numbers count from 1 at the first header line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectionError {
    NotAField { line: usize },
    SpaceInName { line: usize },
    EmptyName { line: usize },
    BadNameByte { line: usize },
    FoldedFirstLine,
    BlankContinuation { line: usize },
    Nul { line: usize },
    BareLineEnding { line: usize },
    Unterminated { line: usize },
    TooLarge { max: usize },
    TooManyFields { max: usize },
}

impl SectionError {
    /// A bound was exceeded (`552 5.3.4`) rather than the syntax being ambiguous
    /// (`550 5.6.0`).
    pub fn is_limit(&self) -> bool {
        matches!(
            self,
            SectionError::TooLarge { .. } | SectionError::TooManyFields { .. }
        )
    }

    /// A short label for logs and the transaction record.
    pub fn label(&self) -> &'static str {
        match self {
            SectionError::NotAField { .. } => "not_a_field",
            SectionError::SpaceInName { .. } => "space_in_name",
            SectionError::EmptyName { .. } => "empty_name",
            SectionError::BadNameByte { .. } => "bad_name_byte",
            SectionError::FoldedFirstLine => "folded_first_line",
            SectionError::BlankContinuation { .. } => "blank_continuation",
            SectionError::Nul { .. } => "nul",
            SectionError::BareLineEnding { .. } => "bare_line_ending",
            SectionError::Unterminated { .. } => "unterminated",
            SectionError::TooLarge { .. } => "too_large",
            SectionError::TooManyFields { .. } => "too_many_fields",
        }
    }
}

impl fmt::Display for SectionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SectionError::NotAField { line } => write!(
                f,
                "header line {line} is neither a header field nor a continuation line"
            ),
            SectionError::SpaceInName { line } => write!(
                f,
                "header line {line} has white space in the field name or before the colon"
            ),
            SectionError::EmptyName { line } => {
                write!(f, "header line {line} has an empty field name")
            }
            SectionError::BadNameByte { line } => write!(
                f,
                "header line {line} has a field name with a byte outside printable US-ASCII"
            ),
            SectionError::FoldedFirstLine => {
                write!(f, "the first header line is a continuation line")
            }
            SectionError::BlankContinuation { line } => write!(
                f,
                "header line {line} is a continuation line of white space only"
            ),
            SectionError::Nul { line } => write!(f, "header line {line} contains a NUL byte"),
            SectionError::BareLineEnding { line } => {
                write!(f, "header line {line} contains a bare CR or LF")
            }
            SectionError::Unterminated { line } => {
                write!(f, "header line {line} does not end with CRLF")
            }
            SectionError::TooLarge { max } => {
                write!(f, "the header section is larger than {max} bytes")
            }
            SectionError::TooManyFields { max } => {
                write!(f, "the header section has more than {max} fields")
            }
        }
    }
}

/// Reads the header section of `message` (RFC 5322 section 2.2), or says why it is
/// refused.
pub fn read_section(
    message: &[u8],
    limits: SectionLimits,
) -> Result<HeaderSection<'_>, SectionError> {
    let mut fields: Vec<HeaderField<'_>> = Vec::with_capacity(32);
    let mut at = 0;
    let mut line = 0;
    while at < message.len() {
        line += 1;
        let end = line_end(message, at, line)?;
        if end > limits.max_size {
            return Err(SectionError::TooLarge {
                max: limits.max_size,
            });
        }
        let content = &message[at..end - 2];
        if content.is_empty() {
            return Ok(HeaderSection {
                fields,
                body_offset: end,
            });
        }
        if matches!(content[0], b' ' | b'\t') {
            let Some(last) = fields.last_mut() else {
                return Err(SectionError::FoldedFirstLine);
            };
            if content.iter().all(|b| matches!(b, b' ' | b'\t')) {
                return Err(SectionError::BlankContinuation { line });
            }
            last.range.end = end;
            last.value = &message[last.value_start..end - 2];
        } else {
            if fields.len() == limits.max_fields {
                return Err(SectionError::TooManyFields {
                    max: limits.max_fields,
                });
            }
            fields.push(field(message, at, end, line)?);
        }
        at = end;
    }
    Ok(HeaderSection {
        fields,
        body_offset: message.len(),
    })
}

/// The end of the header line starting at `at` (after its CRLF). NUL, CR and LF are the
/// only bytes that need a look, so one `memchr3` finds them all.
fn line_end(message: &[u8], at: usize, line: usize) -> Result<usize, SectionError> {
    let rest = &message[at..];
    match memchr::memchr3(b'\r', b'\n', 0, rest) {
        None => Err(SectionError::Unterminated { line }),
        Some(p) => match (rest[p], rest.get(p + 1)) {
            (0, _) => Err(SectionError::Nul { line }),
            (b'\r', Some(b'\n')) => Ok(at + p + 2),
            (b'\r', None) => Err(SectionError::Unterminated { line }),
            _ => Err(SectionError::BareLineEnding { line }),
        },
    }
}

/// A field's first line, `at..end` (CRLF included).
fn field(
    message: &[u8],
    at: usize,
    end: usize,
    line: usize,
) -> Result<HeaderField<'_>, SectionError> {
    let content = &message[at..end - 2];
    let Some(colon) = memchr::memchr(b':', content) else {
        return Err(SectionError::NotAField { line });
    };
    let name = &content[..colon];
    if name.is_empty() {
        return Err(SectionError::EmptyName { line });
    }
    for &byte in name {
        match byte {
            b' ' | b'\t' => return Err(SectionError::SpaceInName { line }),
            33..=126 => {}
            _ => return Err(SectionError::BadNameByte { line }),
        }
    }
    Ok(HeaderField {
        name,
        value: &message[at + colon + 1..end - 2],
        range: at..end,
        value_start: at + colon + 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: SectionLimits = SectionLimits {
        max_size: 1000,
        max_fields: 10,
    };

    fn read(message: &[u8]) -> Result<HeaderSection<'_>, SectionError> {
        read_section(message, LIMITS)
    }

    #[test]
    fn fields_folding_and_body() {
        let msg = b"From: a@b\r\nSubject: one\r\n two\r\nX:y\r\n\r\nbody\r\n";
        let section = read(msg).unwrap();
        assert_eq!(section.fields.len(), 3);
        assert_eq!(section.fields[1].name, b"Subject");
        assert_eq!(section.fields[1].value, b" one\r\n two");
        assert_eq!(
            &msg[section.fields[1].range.clone()],
            b"Subject: one\r\n two\r\n"
        );
        assert_eq!(section.fields[2].value, b"y");
        assert_eq!(&msg[section.body_offset..], b"body\r\n");
        assert_eq!(section.named("from").count(), 1);
    }

    #[test]
    fn header_only_and_empty_messages() {
        let msg = b"From: a@b\r\n";
        let section = read(msg).unwrap();
        assert_eq!(section.fields.len(), 1);
        assert_eq!(section.body_offset, msg.len());
        assert!(read(b"").unwrap().fields.is_empty());
        let section = read(b"\r\nbody").unwrap();
        assert!(section.fields.is_empty());
        assert_eq!(section.body_offset, 2);
    }

    #[test]
    fn ambiguous_lines_are_refused() {
        let cases: &[(&[u8], SectionError)] = &[
            (
                b"From: x@attacker.test\r\nX-Junk\r\nFrom: y@bank.test\r\n\r\n",
                SectionError::NotAField { line: 2 },
            ),
            (
                b"From : x@a.test\r\n\r\n",
                SectionError::SpaceInName { line: 1 },
            ),
            (
                b"Fr om: x@a.test\r\n\r\n",
                SectionError::SpaceInName { line: 1 },
            ),
            (
                b"From\t: x@a.test\r\n\r\n",
                SectionError::SpaceInName { line: 1 },
            ),
            (b": x\r\n\r\n", SectionError::EmptyName { line: 1 }),
            (
                b"Fr\xc3\xb6m: x\r\n\r\n",
                SectionError::BadNameByte { line: 1 },
            ),
            (
                b"A: b\r\nFr\x01om: x\r\n\r\n",
                SectionError::BadNameByte { line: 2 },
            ),
            (b" From: x@a.test\r\n\r\n", SectionError::FoldedFirstLine),
            (
                b"From: x@a.test\r\n \t \r\nSubject: s\r\n\r\n",
                SectionError::BlankContinuation { line: 2 },
            ),
            (
                b"Subject: s\r\n\t\r\nFrom: x@a.test\r\n\r\n",
                SectionError::BlankContinuation { line: 2 },
            ),
            (b"From: x\x00@a.test\r\n\r\n", SectionError::Nul { line: 1 }),
            (
                b"From: x@a.test\nTo: y\r\n\r\n",
                SectionError::BareLineEnding { line: 1 },
            ),
            (
                b"From: x@a\rtest\r\n\r\n",
                SectionError::BareLineEnding { line: 1 },
            ),
            (
                b"From: x@a.test\r\nSubject: x",
                SectionError::Unterminated { line: 2 },
            ),
            (b"From: x@a.test\r", SectionError::Unterminated { line: 1 }),
        ];
        for (msg, want) in cases {
            assert_eq!(
                read(msg).unwrap_err(),
                *want,
                "{}",
                String::from_utf8_lossy(msg)
            );
            assert!(!want.is_limit());
        }
    }

    #[test]
    fn the_body_is_not_the_header_section() {
        let msg = b"From: x@a.test\r\n\r\nX-Junk\r\n\x00\nFrom : y\r\n";
        assert_eq!(read(msg).unwrap().fields.len(), 1);
    }

    #[test]
    fn limits() {
        let many: Vec<u8> = (0..11)
            .flat_map(|n| format!("X-{n}: v\r\n").into_bytes())
            .collect();
        assert_eq!(
            read(&many).unwrap_err(),
            SectionError::TooManyFields { max: 10 }
        );
        let ten: Vec<u8> = (0..10)
            .flat_map(|n| format!("X-{n}: v\r\n").into_bytes())
            .collect();
        assert_eq!(read(&ten).unwrap().fields.len(), 10);
        let big = format!("Subject: {}\r\n\r\n", "x".repeat(1000));
        let err = read(big.as_bytes()).unwrap_err();
        assert_eq!(err, SectionError::TooLarge { max: 1000 });
        assert!(err.is_limit());
        // The body does not count.
        let small = format!("Subject: x\r\n\r\n{}", "x".repeat(5000));
        assert!(read(small.as_bytes()).is_ok());
    }
}
