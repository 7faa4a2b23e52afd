//! The command reader: bytes in, one command line out at a time.
//!
//! smtp-proto parses the command; this module owns what the parser does not: the
//! line limit, a line that arrives in several reads, and what is left of a refused
//! line. Its contract, which the `command_reader` fuzz target checks, is that one
//! line (up to its LF) gives exactly one [`Command`] however the input is cut into
//! reads: a refused line is skipped to its end, and no part of it is ever read as a
//! command of its own (a way to smuggle commands past a front end that reads lines
//! differently).

use super::reply::Reply;
use smtp_proto::Request;
use smtp_proto::request::receiver::RequestReceiver;

/// Longest command line accepted, CRLF included. RFC 5321 section 4.5.3.1.4 sets 512
/// octets as the minimum a server must accept; parameters push real clients past it.
pub const MAX_COMMAND_LINE: usize = smtp_proto::request::receiver::MAX_LINE_LENGTH;

/// What one command line amounted to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A command smtp-proto parsed.
    Request(Request<String>),
    /// `RCPT TO:<>`, a null forward-path: never a valid recipient, though smtp-proto
    /// reports it as `<postmaster>` (which is valid). `to` is what smtp-proto read.
    NullRecipient(Request<String>),
    /// A line refused before it meant anything: the reply says why.
    Refused(Reply),
}

#[derive(Default)]
pub struct CommandReader {
    receiver: RequestReceiver,
    /// The command line received so far when it came in several reads (its length
    /// counts against the limit; its text tells `<>` from `<postmaster>`, which the
    /// parser reports alike). Bounded by the line limit.
    line_head: Vec<u8>,
    /// Dropping the rest of a refused line.
    skipping_line: bool,
}

impl CommandReader {
    /// Reads from `input` until one command line is complete or the input runs out.
    /// Returns how many bytes were used (never 0 for non-empty input) and the command,
    /// if a line ended. The bytes not used belong to what follows the command (a
    /// pipelined command, or BDAT's chunk).
    pub fn read(&mut self, input: &[u8]) -> (usize, Option<Command>) {
        let line_end = memchr::memchr(b'\n', input);
        if self.skipping_line {
            return match line_end {
                Some(pos) => {
                    self.skipping_line = false;
                    (pos + 1, None)
                }
                None => (input.len(), None),
            };
        }
        let line_len = self.line_head.len() + line_end.map_or(input.len(), |p| p + 1);
        // The parser refuses a partial line at the limit, so that is already too long.
        if line_len > MAX_COMMAND_LINE || (line_end.is_none() && line_len >= MAX_COMMAND_LINE) {
            // Refuse the whole line once, whether it arrived in one piece or several.
            self.reset();
            return match line_end {
                Some(pos) => (pos + 1, Some(Command::Refused(Reply::line_too_long()))),
                None => {
                    self.skipping_line = true;
                    (input.len(), Some(Command::Refused(Reply::line_too_long())))
                }
            };
        }
        // The parser sees one line at most: given more, it reads past the LF of some
        // malformed lines (`RCPT TO` CRLF) and swallows the command pipelined behind.
        let line = line_end.map_or(input, |pos| &input[..=pos]);
        let mut iter = line.iter();
        let parsed = self.receiver.ingest(&mut iter).map(|r| r.into_owned());
        let consumed = line.len() - iter.len();
        match parsed {
            Ok(request) => {
                // smtp-proto reports `<>` as `<postmaster>` and ignores what follows
                // STARTTLS: both need the line itself.
                let command = match &request {
                    Request::Rcpt { to }
                        if to.address.is_empty() && self.is_null_path(&input[..consumed]) =>
                    {
                        Command::NullRecipient(request)
                    }
                    Request::Bdat { chunk_size, .. }
                        if !self.chunk_size_as_written(&input[..consumed], *chunk_size) =>
                    {
                        Command::Refused(Reply::syntax("BDAT chunk-size [LAST]"))
                    }
                    Request::StartTls if self.has_arguments(&input[..consumed]) => {
                        // RFC 3207 4: "501 Syntax error (no parameters allowed)".
                        Command::Refused(Reply::syntax("STARTTLS"))
                    }
                    _ => Command::Request(request),
                };
                self.line_head.clear();
                (consumed, Some(command))
            }
            Err(smtp_proto::Error::NeedsMoreData { .. }) if line_end.is_none() => {
                // The rest of the input is a partial line, kept by the receiver.
                self.line_head.extend_from_slice(input);
                (input.len(), None)
            }
            Err(smtp_proto::Error::NeedsMoreData { .. }) => {
                // The line ended, the command did not.
                self.reset();
                (
                    line.len(),
                    Some(Command::Refused(Reply::incomplete_command())),
                )
            }
            Err(err) => {
                self.line_head.clear();
                // Whatever the parser left of this line is part of the refused command,
                // never a command of its own.
                self.receiver = RequestReceiver::default();
                if line_end.is_none() {
                    self.skipping_line = true;
                }
                (
                    line.len(),
                    Some(Command::Refused(protocol_error_reply(err))),
                )
            }
        }
    }

    /// Forgets any partial line (STARTTLS: what came before the handshake is dropped).
    pub fn reset(&mut self) {
        self.receiver = RequestReceiver::default();
        self.line_head.clear();
        self.skipping_line = false;
    }

    /// `RCPT TO:<>` rather than `<postmaster>`. `tail` is the end of the command line.
    fn is_null_path(&self, tail: &[u8]) -> bool {
        let line = self.command_line(tail);
        let path = match (
            line.iter().position(|&b| b == b'<'),
            line.iter().rposition(|&b| b == b'>'),
        ) {
            (Some(open), Some(close)) if open < close => &line[open + 1..close],
            _ => return true,
        };
        // Without a source route (`<@relay.test:postmaster>`), quotes and quoted-pairs.
        let path = match path.first() {
            Some(b'@') => path
                .iter()
                .position(|&b| b == b':')
                .map_or(&path[..0], |colon| &path[colon + 1..]),
            _ => path,
        };
        let bare: Vec<u8> = path
            .iter()
            .copied()
            .filter(|b| !matches!(b, b'"' | b'\\') && !b.is_ascii_whitespace())
            .collect();
        !bare.eq_ignore_ascii_case(b"postmaster")
    }

    /// Whether BDAT's chunk-size, as written on the line, is plain digits of the value
    /// smtp-proto read. The parser wraps a number of more than 19 digits round to a
    /// small one (twenty 9s and a 5 read as 5) and skips a CR inside it (`1<CR>2` read
    /// as 12): the chunk would then end where no other reader of the stream sees it end.
    fn chunk_size_as_written(&self, tail: &[u8], chunk_size: usize) -> bool {
        let line = self.command_line(tail);
        let mut words = line
            .trim_ascii_end()
            .split(u8::is_ascii_whitespace)
            .filter(|word| !word.is_empty());
        let written = words.nth(1).unwrap_or_default();
        !written.is_empty()
            && written.iter().all(u8::is_ascii_digit)
            && std::str::from_utf8(written).is_ok_and(|digits| digits.parse() == Ok(chunk_size))
    }

    /// Whether anything but white space follows the verb of the command line.
    fn has_arguments(&self, tail: &[u8]) -> bool {
        let line = self.command_line(tail);
        let line = line.trim_ascii();
        line.iter()
            .position(u8::is_ascii_whitespace)
            .is_some_and(|verb_end| !line[verb_end..].trim_ascii().is_empty())
    }

    /// The whole command line: what earlier reads brought, then `tail`.
    fn command_line(&self, tail: &[u8]) -> Vec<u8> {
        [self.line_head.as_slice(), tail].concat()
    }
}

/// The reply to a command smtp-proto could not parse.
fn protocol_error_reply(err: smtp_proto::Error) -> Reply {
    use smtp_proto::Error as E;
    match err {
        E::UnknownCommand => Reply::unknown_command(),
        E::InvalidSenderAddress => Reply::bad_sender_syntax(),
        E::InvalidRecipientAddress => Reply::bad_recipient_syntax(),
        E::SyntaxError { syntax } => Reply::syntax(syntax),
        E::InvalidParameter { param } => Reply::invalid_parameter(param),
        E::UnsupportedParameter { param } => Reply::unsupported_parameter(&param),
        E::ResponseTooLong => Reply::line_too_long(),
        E::NeedsMoreData { .. } | E::InvalidResponse { .. } => Reply::unknown_command(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command and refusal in `input`, fed in pieces of `piece` bytes.
    fn commands(input: &[u8], piece: usize) -> Vec<Command> {
        let mut reader = CommandReader::default();
        let mut out = Vec::new();
        for chunk in input.chunks(piece) {
            let mut rest = chunk;
            while !rest.is_empty() {
                let (used, command) = reader.read(rest);
                assert!(used > 0, "no progress on {rest:?}");
                rest = &rest[used..];
                out.extend(command);
            }
        }
        out
    }

    #[test]
    fn the_rest_of_a_refused_line_is_never_a_command() {
        let line = b"MAIL FROM:<a@b.test> BODY=x QUIT\r\nNOOP\r\n";
        for piece in [1, 3, line.len()] {
            let got = commands(line, piece);
            assert_eq!(got.len(), 2, "{got:?}");
            assert!(matches!(got[0], Command::Refused(_)), "{got:?}");
            assert!(
                matches!(got[1], Command::Request(Request::Noop { .. })),
                "{got:?}"
            );
        }
    }

    #[test]
    fn an_overlong_line_is_one_refusal_however_it_arrives() {
        let mut input = b"NOOP ".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_COMMAND_LINE * 3));
        input.extend_from_slice(b"\r\nQUIT\r\n");
        for piece in [1, 100, input.len()] {
            let got = commands(&input, piece);
            assert_eq!(
                got,
                vec![
                    Command::Refused(Reply::line_too_long()),
                    Command::Request(Request::Quit)
                ],
                "piece {piece}"
            );
        }
    }

    #[test]
    fn a_malformed_command_never_swallows_the_next_one() {
        // smtp-proto, given both lines, reads `RCPT TO` on into `NOOP` and refuses both
        // with one reply: a pipelining client then pairs every later reply wrongly.
        for piece in [1, 7, 64] {
            let got = commands(b"RCPT TO\r\nNOOP\r\nMAIL FROM\r\nQUIT\r\n", piece);
            assert_eq!(got.len(), 4, "piece {piece}: {got:?}");
            assert!(matches!(got[0], Command::Refused(_)), "{got:?}");
            assert!(
                matches!(got[1], Command::Request(Request::Noop { .. })),
                "{got:?}"
            );
            assert!(matches!(got[2], Command::Refused(_)), "{got:?}");
            assert_eq!(got[3], Command::Request(Request::Quit));
        }
    }

    #[test]
    fn a_null_recipient_is_told_from_postmaster() {
        let got = commands(b"RCPT TO:<>\r\nRCPT TO:<Postmaster>\r\n", 4);
        assert!(matches!(got[0], Command::NullRecipient(_)), "{got:?}");
        assert!(
            matches!(got[1], Command::Request(Request::Rcpt { .. })),
            "{got:?}"
        );
    }

    #[test]
    fn a_bdat_size_is_read_as_written_or_refused() {
        let wrapped = format!("BDAT {}5 LAST\r\n", "9".repeat(20));
        for (line, size) in [
            (wrapped.as_str(), None),
            ("BDAT 1\r2 LAST\r\n", None),
            ("BDAT 18446744073709551616\r\n", None),
            ("BDAT 12 LAST\r\n", Some(12)),
            ("BDAT 007\r\n", Some(7)),
            ("BDAT  5   LAST \r\n", Some(5)),
        ] {
            for piece in [1, 4, line.len()] {
                let got = commands(line.as_bytes(), piece);
                let expected = match size {
                    Some(chunk_size) => Command::Request(Request::Bdat {
                        chunk_size,
                        is_last: line.contains("LAST"),
                    }),
                    None => Command::Refused(Reply::syntax("BDAT chunk-size [LAST]")),
                };
                assert_eq!(got, vec![expected], "{line:?} in pieces of {piece}");
            }
        }
    }

    #[test]
    fn starttls_with_arguments_is_refused() {
        let got = commands(b"STARTTLS now\r\nSTARTTLS\r\n", 5);
        assert_eq!(got[0], Command::Refused(Reply::syntax("STARTTLS")));
        assert_eq!(got[1], Command::Request(Request::StartTls));
    }
}
