//! The message as it leaves mxgate: our new header fields, then the received message
//! with some header fields left out (forged Authentication-Results), body untouched.
//!
//! Nothing is copied to assemble it: it is a list of slices, dot-stuffed on the way out.

use super::RelayError;
use super::client::ClientConn;
use crate::smtp::data::dot_stuff_into;
use std::ops::Range;
use std::time::Duration;

pub struct OutboundMessage<'a> {
    /// Header fields we add, already folded and CRLF-terminated.
    pub prefix: &'a [u8],
    /// The received message (canonical CRLF form).
    pub original: &'a [u8],
    /// Byte ranges of `original` to leave out, sorted and disjoint.
    pub skip: &'a [Range<usize>],
}

impl<'a> OutboundMessage<'a> {
    /// The message as a sequence of byte slices.
    pub fn segments(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        let mut pieces = Vec::with_capacity(self.skip.len() + 2);
        pieces.push(self.prefix);
        let mut at = 0;
        for range in self.skip {
            let start = range.start.min(self.original.len());
            if start > at {
                pieces.push(&self.original[at..start]);
            }
            at = at.max(range.end.min(self.original.len()));
        }
        pieces.push(&self.original[at..]);
        pieces.into_iter().filter(|p| !p.is_empty())
    }

    pub fn len(&self) -> usize {
        self.segments().map(<[u8]>::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The message as one contiguous buffer (only needed when something was left out and
    /// a library wants the whole message, such as the ARC sealer).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        for segment in self.segments() {
            out.extend_from_slice(segment);
        }
        out
    }

    /// Sends the message as one `BDAT n LAST` chunk (RFC 3030): length-delimited, so
    /// no dot-stuffing and no end-of-data marker to get wrong, and one round trip less
    /// than DATA.
    pub(super) async fn write_bdat(
        &self,
        conn: &mut ClientConn,
        block_timeout: Duration,
    ) -> Result<(), RelayError> {
        const CHUNK: usize = 64 * 1024;
        let total = self.len();
        let mut out = Vec::with_capacity((total + 32).min(CHUNK + 32));
        out.extend_from_slice(format!("BDAT {total} LAST\r\n").as_bytes());
        for segment in self.segments() {
            let mut rest = segment;
            while !rest.is_empty() {
                let room = CHUNK.saturating_sub(out.len()).max(1);
                let take = rest.len().min(room);
                out.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if out.len() >= CHUNK {
                    conn.write_all(&out, block_timeout).await?;
                    out.clear();
                }
            }
        }
        if !out.is_empty() {
            conn.write_all(&out, block_timeout).await?;
        }
        Ok(())
    }

    /// Writes the message inside DATA: dot-stuffed, then `.` CRLF.
    pub(super) async fn write_stuffed(
        &self,
        conn: &mut ClientConn,
        block_timeout: Duration,
    ) -> Result<(), RelayError> {
        const CHUNK: usize = 64 * 1024;
        // Sized to the message (plus room for stuffed dots), not to the largest chunk.
        let total = self.len();
        let mut out = Vec::with_capacity((total + total / 64 + 16).min(CHUNK + 1024));
        let mut line_start = true;
        for segment in self.segments() {
            let mut rest = segment;
            while !rest.is_empty() {
                // Cut at a line end where possible so stuffing sees whole lines.
                let take = if rest.len() <= CHUNK {
                    rest.len()
                } else {
                    memchr::memrchr(b'\n', &rest[..CHUNK]).map_or(CHUNK, |p| p + 1)
                };
                line_start = dot_stuff_into(&rest[..take], line_start, &mut out);
                rest = &rest[take..];
                if out.len() >= CHUNK {
                    conn.write_all(&out, block_timeout).await?;
                    out.clear();
                }
            }
        }
        if !line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        conn.write_all(&out, block_timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_skip_ranges() {
        let original = b"A: 1\r\nB: 2\r\nC: 3\r\n\r\nbody\r\n";
        let message = OutboundMessage {
            prefix: b"X: 0\r\n",
            original,
            skip: &[Range { start: 6, end: 12 }],
        };
        assert_eq!(message.to_vec(), b"X: 0\r\nA: 1\r\nC: 3\r\n\r\nbody\r\n");
    }
}
