//! What the first bytes of a PROXY protocol header (HAProxy's v1 text or v2 binary
//! form) look like, so that the session can refuse one that reaches it instead of
//! reading it as SMTP. Byte tests only: reading and trusting a balancer's header is
//! `server::proxy`'s job, before any session exists.

use super::metrics::{ProxyHeader, proxy_header};
use std::net::SocketAddr;

/// The start of every v1 header.
pub const V1_PREFIX: &[u8] = b"PROXY ";
/// The 12-octet signature of every v2 header.
pub const V2_PREFIX: &[u8] = ppp::v2::PROTOCOL_PREFIX;

/// Whether the first bytes a client sent begin a PROXY header (v1 or v2).
pub fn looks_like_header(input: &[u8]) -> bool {
    input.starts_with(V1_PREFIX) || input.starts_with(V2_PREFIX)
}

/// Whether the first bytes a client sent are too few to tell: they are the start of a
/// header's signature (a header split across reads, `PRO` then `XY TCP4 ...`), so more
/// must be read before they are taken as SMTP.
pub fn may_become_header(input: &[u8]) -> bool {
    let starts = |prefix: &[u8]| input.len() < prefix.len() && prefix.starts_with(input);
    starts(V1_PREFIX) || starts(V2_PREFIX)
}

/// A header sent by a peer outside `trusted_networks` (counted and logged; the session
/// refuses the connection).
pub fn note_untrusted(peer: SocketAddr) {
    proxy_header(ProxyHeader::Untrusted);
    tracing::warn!(client = %peer, "PROXY header refused: the peer is outside server.proxy_protocol.trusted_networks (or sent a second header)");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_of_a_header_are_recognised() {
        let mut v2 = V2_PREFIX.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0, 12]);
        v2.extend_from_slice(&[0; 12]);
        assert!(looks_like_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"));
        assert!(looks_like_header(&v2));
        assert!(!looks_like_header(b"EHLO proxy.example\r\n"));
        assert!(!looks_like_header(b"\r\n"));
        assert!(may_become_header(b"PRO"));
        assert!(may_become_header(b"\r\n\r\n\0"));
        assert!(!may_become_header(b"PROXY "));
        assert!(!may_become_header(b"EHLO"));
    }
}
