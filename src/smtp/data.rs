//! Message content readers for DATA and BDAT that cannot be smuggled through.
//!
//! SMTP smuggling (CVE-2023-51764 and its family) works when two SMTP implementations
//! disagree about where a message ends. The defence has three parts, all here:
//!
//! 1. Only `<CRLF>.<CRLF>` ends DATA (RFC 5321 section 4.1.1.4). `\n.\n`, `\r.\r`,
//!    `\r\n.\n`, `\n.\r\n` and friends are content.
//! 2. A bare CR or bare LF never leaves this module as-is. In `normalize` mode (the
//!    default, as Postfix 3.9 does) every line ending becomes CRLF; a lone `.` line that
//!    touches a bare line ending is content, so it comes out as the content line `.`
//!    (which the relay then dot-stuffs). NUL bytes are dropped. In `reject` mode the
//!    content is still read to its end (the client must get a reply) and flagged, and
//!    the session answers `550 5.5.2`.
//! 3. Dot-unstuffing is exact: a line that starts with `.` loses that one dot.
//!
//! The output is therefore a message in canonical form: CRLF line endings only. The relay
//! dot-stuffs it again, so no backend, however lenient, can see an end-of-data marker
//! that this reader did not see. This module does no I/O.

use crate::spool::ContentSink;
use memchr::memchr3;

/// What the reader saw that a well-formed message does not contain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Anomalies {
    pub bare_cr: bool,
    pub bare_lf: bool,
    pub nul: bool,
    /// Octets in the longest line of the decoded content, its line ending not counted
    /// (RFC 5321 section 4.5.3.1.6 allows 998). Not an anomaly in itself: what to do
    /// with long lines is `server.long_lines`.
    pub longest_line: usize,
}

impl Anomalies {
    pub fn any(&self) -> bool {
        self.bare_cr || self.bare_lf || self.nul
    }
}

/// Result of feeding bytes to the DATA reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Every byte was consumed; the end-of-data marker has not been seen yet.
    NeedMore,
    /// The end-of-data marker ended at `consumed` bytes into the input; the rest of the
    /// input belongs to the command stream (pipelined commands after DATA).
    End { consumed: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the start of a line. `clean` means the previous line ended with CRLF (or this is
    /// the first line), which is the only position where `.` CRLF can end the data.
    LineStart { clean: bool },
    /// Saw `.` at the start of a line.
    Dot { clean: bool },
    /// Saw `.` CR at the start of a line.
    DotCr { clean: bool },
    /// Inside a line.
    Mid,
    /// Saw CR inside a line (or on an empty line): CRLF or a bare CR, depending on what
    /// comes next.
    Cr,
}

/// Streaming reader for DATA content: end-of-data detection, dot-unstuffing and line
/// ending normalisation in one pass.
#[derive(Debug)]
pub struct DataReader {
    state: State,
    anomalies: Anomalies,
    /// Octets of the current line so far.
    line_len: usize,
}

impl Default for DataReader {
    fn default() -> Self {
        Self::new()
    }
}

impl DataReader {
    pub fn new() -> Self {
        DataReader {
            // The CRLF that ended the DATA command line counts as the line ending before
            // the first content line, so an immediate `.` CRLF is an empty message.
            state: State::LineStart { clean: true },
            anomalies: Anomalies::default(),
            line_len: 0,
        }
    }

    pub fn anomalies(&self) -> Anomalies {
        let mut anomalies = self.anomalies;
        anomalies.longest_line = anomalies.longest_line.max(self.line_len);
        anomalies
    }

    /// A line ending was written: the line's length is final.
    fn end_line(&mut self) {
        self.anomalies.longest_line = self.anomalies.longest_line.max(self.line_len);
        self.line_len = 0;
    }

    /// Consumes `input`, writing canonical content to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut impl ContentSink) -> Progress {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Mid => {
                    let rest = &input[i..];
                    match memchr3(b'\r', b'\n', 0, rest) {
                        None => {
                            out.write(rest);
                            self.line_len += rest.len();
                            return Progress::NeedMore;
                        }
                        Some(pos) => {
                            if pos > 0 {
                                out.write(&rest[..pos]);
                                self.line_len += pos;
                            }
                            i += pos + 1;
                            self.line_byte(rest[pos], out);
                        }
                    }
                }
                State::LineStart { clean } => {
                    let byte = input[i];
                    i += 1;
                    if byte == b'.' {
                        self.state = State::Dot { clean };
                    } else {
                        self.state = State::Mid;
                        self.line_byte(byte, out);
                    }
                }
                State::Dot { clean } => {
                    let byte = input[i];
                    i += 1;
                    match byte {
                        b'\r' => self.state = State::DotCr { clean },
                        b'\n' => {
                            // A lone dot ended by a bare LF: content, never the end.
                            self.anomalies.bare_lf = true;
                            out.write(b".\r\n");
                            self.line_len = 1;
                            self.end_line();
                            self.state = State::LineStart { clean: false };
                        }
                        _ => {
                            // A stuffed dot: drop it; the rest of the line is content.
                            self.state = State::Mid;
                            self.line_byte(byte, out);
                        }
                    }
                }
                State::DotCr { clean } => {
                    if input[i] == b'\n' {
                        i += 1;
                        if clean {
                            self.state = State::LineStart { clean: true };
                            return Progress::End { consumed: i };
                        }
                        // `.` CRLF right after a bare line ending: content.
                        out.write(b".\r\n");
                        self.line_len = 1;
                        self.end_line();
                        self.state = State::LineStart { clean: true };
                    } else {
                        // `.` then a bare CR: content; the byte after the CR starts a
                        // new line and is looked at again below.
                        self.anomalies.bare_cr = true;
                        out.write(b".\r\n");
                        self.line_len = 1;
                        self.end_line();
                        self.state = State::LineStart { clean: false };
                    }
                }
                State::Cr => {
                    self.end_line();
                    if input[i] == b'\n' {
                        i += 1;
                        out.write(b"\r\n");
                        self.state = State::LineStart { clean: true };
                    } else {
                        self.anomalies.bare_cr = true;
                        out.write(b"\r\n");
                        self.state = State::LineStart { clean: false };
                    }
                }
            }
        }
        Progress::NeedMore
    }

    /// A byte inside a line that is not an ordinary run byte.
    fn line_byte(&mut self, byte: u8, out: &mut impl ContentSink) {
        match byte {
            b'\r' => self.state = State::Cr,
            b'\n' => {
                self.anomalies.bare_lf = true;
                out.write(b"\r\n");
                self.end_line();
                self.state = State::LineStart { clean: false };
            }
            0 => {
                self.anomalies.nul = true;
                self.state = State::Mid;
            }
            _ => {
                out.write(&[byte]);
                self.line_len += 1;
                self.state = State::Mid;
            }
        }
    }
}

/// Reader for BDAT chunks (RFC 3030): chunks are length-delimited, so there is no
/// end-of-data marker and no dot-stuffing, but line endings are normalised the same way
/// so that a bare CR or LF cannot reach the backend by this road either.
#[derive(Debug, Default)]
pub struct BdatReader {
    pending_cr: bool,
    anomalies: Anomalies,
    /// Octets of the current line so far.
    line_len: usize,
}

impl BdatReader {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn anomalies(&self) -> Anomalies {
        let mut anomalies = self.anomalies;
        anomalies.longest_line = anomalies.longest_line.max(self.line_len);
        anomalies
    }

    fn end_line(&mut self) {
        self.anomalies.longest_line = self.anomalies.longest_line.max(self.line_len);
        self.line_len = 0;
    }

    pub fn feed(&mut self, mut input: &[u8], out: &mut impl ContentSink) {
        while !input.is_empty() {
            if self.pending_cr {
                self.pending_cr = false;
                self.end_line();
                if input[0] == b'\n' {
                    out.write(b"\r\n");
                    input = &input[1..];
                } else {
                    self.anomalies.bare_cr = true;
                    out.write(b"\r\n");
                }
                continue;
            }
            match memchr3(b'\r', b'\n', 0, input) {
                None => {
                    out.write(input);
                    self.line_len += input.len();
                    return;
                }
                Some(pos) => {
                    out.write(&input[..pos]);
                    self.line_len += pos;
                    match input[pos] {
                        b'\r' => self.pending_cr = true,
                        b'\n' => {
                            self.anomalies.bare_lf = true;
                            out.write(b"\r\n");
                            self.end_line();
                        }
                        _ => self.anomalies.nul = true,
                    }
                    input = &input[pos + 1..];
                }
            }
        }
    }

    /// Called after the LAST chunk: a CR at the very end is a bare CR.
    pub fn finish(&mut self, out: &mut impl ContentSink) {
        if self.pending_cr {
            self.pending_cr = false;
            self.anomalies.bare_cr = true;
            out.write(b"\r\n");
        }
        self.end_line();
    }
}

/// Writes `content` (canonical, CRLF-only) for transmission inside DATA: every line that
/// starts with `.` gets one more (RFC 5321 section 4.5.2), and the terminating
/// `.` CRLF is appended, preceded by a CRLF if the content does not end with one.
pub fn dot_stuff_into(content: &[u8], at_line_start: bool, out: &mut Vec<u8>) -> bool {
    let mut line_start = at_line_start;
    let mut rest = content;
    while !rest.is_empty() {
        if line_start && rest[0] == b'.' {
            out.push(b'.');
        }
        match memchr::memchr(b'\n', rest) {
            Some(pos) => {
                out.extend_from_slice(&rest[..=pos]);
                rest = &rest[pos + 1..];
                line_start = true;
            }
            None => {
                out.extend_from_slice(rest);
                rest = &[];
                line_start = false;
            }
        }
    }
    line_start
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(chunks: &[&[u8]]) -> (Vec<u8>, Option<Vec<u8>>, Anomalies) {
        let mut reader = DataReader::new();
        let mut out = Vec::new();
        for (n, chunk) in chunks.iter().enumerate() {
            if let Progress::End { consumed } = reader.feed(chunk, &mut out) {
                let mut rest = chunk[consumed..].to_vec();
                for later in &chunks[n + 1..] {
                    rest.extend_from_slice(later);
                }
                return (out, Some(rest), reader.anomalies());
            }
        }
        (out, None, reader.anomalies())
    }

    fn decode_bytewise(input: &[u8]) -> (Vec<u8>, Option<Vec<u8>>, Anomalies) {
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        decode(&chunks)
    }

    #[test]
    fn plain_message_and_dot_unstuffing() {
        let input = b"Subject: x\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n";
        for (out, rest, anomalies) in [decode(&[input]), decode_bytewise(input)] {
            assert_eq!(out, b"Subject: x\r\n\r\n.leading dot\r\n");
            assert_eq!(rest.unwrap(), b"QUIT\r\n");
            assert!(!anomalies.any());
        }
    }

    #[test]
    fn empty_message() {
        let (out, rest, _) = decode(&[b".\r\n"]);
        assert!(out.is_empty());
        assert_eq!(rest.unwrap(), b"");
    }

    /// Every smuggling sequence from the CVE-2023-51764 family: none of them ends the
    /// data, and none leaves a bare CR or LF in the output.
    #[test]
    fn smuggling_sequences_are_content() {
        let sequences: &[&[u8]] = &[
            b"\n.\n",
            b"\n.\r\n",
            b"\r.\n",
            b"\r.\r\n",
            b"\r\n.\n",
            b"\r\n.\r",
            b"\r\n\x00.\r\n",
            b"\r\n.\x00\r\n",
            b"\n.\r",
            b"\r.\r",
        ];
        for seq in sequences {
            let mut input = b"Subject: a\r\n\r\nbody".to_vec();
            input.extend_from_slice(seq);
            input.extend_from_slice(b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nsmuggled\r\n");
            let (out, rest, anomalies) = decode(&[&input]);
            assert!(rest.is_none(), "{seq:?} ended the data");
            assert!(anomalies.any(), "{seq:?} not flagged");
            let (bytewise, _, _) = decode_bytewise(&input);
            assert_eq!(out, bytewise, "{seq:?} depends on chunking");
            assert_no_bare_endings(&out);
            // And the real end marker still works afterwards.
            let mut with_end = input.clone();
            with_end.extend_from_slice(b"\r\n.\r\n");
            let (_, rest, _) = decode(&[&with_end]);
            assert_eq!(rest.unwrap(), b"", "{seq:?}");
        }
    }

    #[test]
    fn lone_dot_next_to_bare_ending_is_content_dot() {
        let (out, rest, _) = decode(&[b"a\r\n.\nb\r\n.\r\n"]);
        assert_eq!(out, b"a\r\n.\r\nb\r\n");
        assert!(rest.is_some());
        let (out, _, _) = decode(&[b"a\n.\r\nb\r\n.\r\n"]);
        assert_eq!(out, b"a\r\n.\r\nb\r\n");
    }

    #[test]
    fn nul_bytes_are_dropped_and_flagged() {
        let (out, _, anomalies) = decode(&[b"a\x00b\r\n.\r\n"]);
        assert_eq!(out, b"ab\r\n");
        assert!(anomalies.nul);
    }

    #[test]
    fn longest_line_is_measured_on_the_decoded_content() {
        let long = "x".repeat(1200);
        let input = format!("Subject: a\r\n\r\n..{long}\r\nshort\r\n.\r\n");
        for (_, _, anomalies) in [
            decode(&[input.as_bytes()]),
            decode_bytewise(input.as_bytes()),
        ] {
            // The stuffed dot is not content; the kept dot is.
            assert_eq!(anomalies.longest_line, 1201);
            assert!(!anomalies.any());
        }
        let (_, _, anomalies) = decode(&[b"a\r\nbb\nccc\rdddd\r\n.\r\n"]);
        assert_eq!(anomalies.longest_line, 4);
        let (_, _, anomalies) = decode(&[format!("{}\r\n.\r\n", "y".repeat(998)).as_bytes()]);
        assert_eq!(anomalies.longest_line, 998);

        let mut reader = BdatReader::new();
        let mut out = Vec::new();
        reader.feed(b"ab\r", &mut out);
        reader.feed(b"\ncde", &mut out);
        reader.feed(b"fgh\x00i", &mut out);
        assert_eq!(reader.anomalies().longest_line, 7);
        reader.finish(&mut out);
        assert_eq!(reader.anomalies().longest_line, 7);
    }

    #[test]
    fn stuffing_round_trip() {
        let content = b".a\r\n..b\r\nc\r\n.\r\n";
        let mut wire = Vec::new();
        let at_start = dot_stuff_into(content, true, &mut wire);
        assert!(at_start);
        assert_eq!(wire, b"..a\r\n...b\r\nc\r\n..\r\n");
        wire.extend_from_slice(b".\r\n");
        let (out, rest, _) = decode(&[&wire]);
        assert_eq!(out, content);
        assert_eq!(rest.unwrap(), b"");
    }

    #[test]
    fn bdat_normalises_across_chunks() {
        let mut reader = BdatReader::new();
        let mut out = Vec::new();
        reader.feed(b"a\r", &mut out);
        reader.feed(b"\nb\nc\r", &mut out);
        reader.feed(b"d\x00e\r", &mut out);
        reader.finish(&mut out);
        assert_eq!(out, b"a\r\nb\r\nc\r\nde\r\n");
        let anomalies = reader.anomalies();
        assert!(anomalies.bare_lf && anomalies.bare_cr && anomalies.nul);
        assert_no_bare_endings(&out);
    }

    fn assert_no_bare_endings(out: &[u8]) {
        for (n, &b) in out.iter().enumerate() {
            if b == b'\r' {
                assert_eq!(out.get(n + 1), Some(&b'\n'), "bare CR at {n} in {out:?}");
            }
            if b == b'\n' {
                assert!(n > 0 && out[n - 1] == b'\r', "bare LF at {n} in {out:?}");
            }
            assert_ne!(b, 0);
        }
    }
}
