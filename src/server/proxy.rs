//! The PROXY protocol (HAProxy's v1 text and v2 binary headers) in front of the SMTP
//! stream, so that the client address a load balancer saw is the client address
//! everywhere (SPF, iprev, policy, limits, `Received`, `Authentication-Results`, logs).
//!
//! Contract: connections from `server.proxy_protocol.trusted_networks` must begin with
//! one header, read here *before* the session exists; connections from anywhere else
//! are never asked for one and a header they send is never honoured (the session
//! refuses a first line that looks like one, see `smtp::proxy_header`). The header
//! format is parsed by the `ppp` crate; this module only decides how many bytes
//! belong to the header so that not one byte of SMTP after it is consumed: v1 is one
//! line of at most 107 bytes ending in CRLF, v2 carries its own length (at most
//! 16 + 65535 bytes). The whole header must arrive within `timeout`.
//!
//! SMTP is server-speaks-first, so the balancer must send the header at connect,
//! without waiting for the greeting: HAProxy's `send-proxy`/`send-proxy-v2` do; an AWS
//! NLB sends its v2 header with the client's first bytes, which for SMTP is never, so
//! the greeting is never sent and the connection times out (see the README).

use crate::config::ProxyProtocol;
use crate::smtp::metrics::{ProxyHeader, proxy_header};
use crate::smtp::proxy_header::{V1_PREFIX, V2_PREFIX};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// v1 headers are at most this long, CRLF included (the spec's worst case, TCP6).
const V1_MAX: usize = 107;
/// Fewer bytes than any header: the shortest v1 is `PROXY UNKNOWN\r\n` (15 bytes), the
/// shortest v2 is 16. Reading this much first can never take a byte of SMTP.
const SHORTEST: usize = 15;
/// v2 fixed part: signature (12), version and command, family and protocol, length (2).
const V2_FIXED: usize = 16;

/// What a trusted peer's header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A proxied connection: the client's and the address it connected to.
    Client {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The balancer's own connection (`PROXY UNKNOWN`, v2 `LOCAL`, or v2 with no IP
    /// addresses): a health check. It gets a greeting and no mail transaction.
    Local,
}

/// Why a connection from a trusted peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before the PROXY header was complete")]
    Closed,
    /// Connected and closed without sending a byte: what a balancer's plain TCP health
    /// check does. Refused like any missing header, but logged at debug level only,
    /// since it comes every few seconds for as long as the balancer runs.
    #[error("connection closed without a PROXY header (a TCP health check)")]
    ClosedSilently,
    #[error("not a PROXY header")]
    NotAHeader,
    #[error("v1 PROXY header longer than {V1_MAX} bytes")]
    TooLong,
    #[error("invalid PROXY header: {0}")]
    Invalid(String),
}

impl ProxyError {
    fn counted_as(&self) -> ProxyHeader {
        match self {
            ProxyError::Timeout(_) | ProxyError::Closed | ProxyError::ClosedSilently => {
                ProxyHeader::Missing
            }
            _ => ProxyHeader::Invalid,
        }
    }
}

/// Reads the header a connection from a trusted balancer must begin with, counts
/// and logs the outcome.
pub async fn read_trusted(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    config: &ProxyProtocol,
) -> Result<Header, ProxyError> {
    let outcome = match tokio::time::timeout(config.timeout, read_header(tcp)).await {
        Ok(result) => result,
        Err(_) => Err(ProxyError::Timeout(config.timeout)),
    };
    match &outcome {
        Ok(Header::Client { .. }) => proxy_header(ProxyHeader::Proxied),
        Ok(Header::Local) => {
            proxy_header(ProxyHeader::Local);
            tracing::debug!(balancer = %peer, "PROXY header without a client: health check");
        }
        Err(err @ ProxyError::ClosedSilently) => {
            proxy_header(err.counted_as());
            tracing::debug!(balancer = %peer, "{err}");
        }
        Err(err) => {
            proxy_header(err.counted_as());
            tracing::warn!(balancer = %peer, error = %err, "connection from a PROXY protocol balancer refused");
        }
    }
    outcome
}

async fn read_header(tcp: &mut TcpStream) -> Result<Header, ProxyError> {
    let mut buf = vec![0u8; SHORTEST];
    if tcp
        .peek(&mut buf[..1])
        .await
        .map_err(|_| ProxyError::Closed)?
        == 0
    {
        return Err(ProxyError::ClosedSilently);
    }
    read_exact(tcp, &mut buf).await?;
    if buf.starts_with(V2_PREFIX) {
        buf.resize(V2_FIXED, 0);
        read_exact(tcp, &mut buf[SHORTEST..]).await?;
        let length = u16::from_be_bytes([buf[14], buf[15]]) as usize;
        buf.resize(V2_FIXED + length, 0);
        read_exact(tcp, &mut buf[V2_FIXED..]).await?;
        parse_v2(&buf)
    } else if buf.starts_with(V1_PREFIX) {
        read_v1_line(tcp, &mut buf).await?;
        parse_v1(&buf)
    } else {
        Err(ProxyError::NotAHeader)
    }
}

/// Reads the rest of a v1 line (through its LF) and not a byte more: peek at what has
/// arrived, consume up to the LF if it is there, else consume all of it (it is all
/// header) and wait for more.
async fn read_v1_line(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), ProxyError> {
    let mut peeked = [0u8; V1_MAX];
    loop {
        if buf.contains(&b'\n') {
            return Ok(());
        }
        let room = V1_MAX - buf.len();
        if room == 0 {
            return Err(ProxyError::TooLong);
        }
        let n = tcp
            .peek(&mut peeked[..room])
            .await
            .map_err(|_| ProxyError::Closed)?;
        if n == 0 {
            return Err(ProxyError::Closed);
        }
        let take = memchr::memchr(b'\n', &peeked[..n]).map_or(n, |lf| lf + 1);
        let start = buf.len();
        buf.resize(start + take, 0);
        read_exact(tcp, &mut buf[start..]).await?;
    }
}

async fn read_exact(tcp: &mut TcpStream, buf: &mut [u8]) -> Result<(), ProxyError> {
    tcp.read_exact(buf)
        .await
        .map(|_| ())
        .map_err(|_| ProxyError::Closed)
}

fn parse_v1(line: &[u8]) -> Result<Header, ProxyError> {
    use ppp::v1::Addresses;
    // The line must be exactly one header: a CR elsewhere would make the parser stop
    // short of the bytes consumed, and we never act on input two readers could split
    // differently.
    if !line.ends_with(b"\r\n") || line[..line.len() - 2].contains(&b'\r') {
        return Err(ProxyError::Invalid("v1 header must end in CRLF".into()));
    }
    let text = std::str::from_utf8(line).map_err(|e| ProxyError::Invalid(e.to_string()))?;
    let header = ppp::v1::Header::try_from(text).map_err(|e| ProxyError::Invalid(e.to_string()))?;
    if header.header.len() != line.len() {
        return Err(ProxyError::Invalid("v1 header length mismatch".into()));
    }
    Ok(match header.addresses {
        Addresses::Unknown => Header::Local,
        Addresses::Tcp4(a) => Header::Client {
            source: (a.source_address, a.source_port).into(),
            destination: (a.destination_address, a.destination_port).into(),
        },
        Addresses::Tcp6(a) => Header::Client {
            source: (a.source_address, a.source_port).into(),
            destination: (a.destination_address, a.destination_port).into(),
        },
    })
}

fn parse_v2(bytes: &[u8]) -> Result<Header, ProxyError> {
    use ppp::v2::{Addresses, Command, Protocol};
    let header =
        ppp::v2::Header::try_from(bytes).map_err(|e| ProxyError::Invalid(e.to_string()))?;
    if header.len() != bytes.len() {
        return Err(ProxyError::Invalid("v2 header length mismatch".into()));
    }
    if header.command == Command::Local {
        return Ok(Header::Local);
    }
    let client = |source: SocketAddr, destination: SocketAddr| {
        if header.protocol == Protocol::Stream {
            Ok(Header::Client {
                source,
                destination,
            })
        } else {
            Err(ProxyError::Invalid(
                "v2 header for a datagram connection".into(),
            ))
        }
    };
    match header.addresses {
        Addresses::IPv4(a) => client(
            (a.source_address, a.source_port).into(),
            (a.destination_address, a.destination_port).into(),
        ),
        Addresses::IPv6(a) => client(
            (a.source_address, a.source_port).into(),
            (a.destination_address, a.destination_port).into(),
        ),
        // No IP address to judge (AF_UNSPEC, AF_UNIX): like LOCAL, no transaction.
        Addresses::Unspecified | Addresses::Unix(_) => Ok(Header::Local),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut out = V2_PREFIX.to_vec();
        out.push(0x20 | command);
        out.push(family);
        let len = (addresses.len() + tlvs.len()) as u16;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(addresses);
        out.extend_from_slice(tlvs);
        out
    }

    /// A plain TCP health check (connect, close) is told apart from a balancer that
    /// stopped half-way through a header, which is worth a warning.
    #[tokio::test]
    async fn a_connection_closed_at_once_is_a_tcp_health_check() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(TcpStream::connect(addr).await.unwrap());
        let (mut silent, _) = listener.accept().await.unwrap();
        assert!(matches!(
            read_header(&mut silent).await,
            Err(ProxyError::ClosedSilently)
        ));
        let mut partial = TcpStream::connect(addr).await.unwrap();
        partial.write_all(b"PROXY TCP4 192.0").await.unwrap();
        drop(partial);
        let (mut cut, _) = listener.accept().await.unwrap();
        assert!(matches!(
            read_header(&mut cut).await,
            Err(ProxyError::Closed)
        ));
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        assert_eq!(
            parse_v1(b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n").unwrap(),
            Header::Client {
                source: "192.0.2.7:40000".parse().unwrap(),
                destination: "198.51.100.1:25".parse().unwrap(),
            }
        );
        assert_eq!(
            parse_v1(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n").unwrap(),
            Header::Client {
                source: "[2001:db8::7]:40000".parse().unwrap(),
                destination: "[2001:db8::1]:25".parse().unwrap(),
            }
        );
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n").unwrap(), Header::Local);
        // The spec lets a sender put addresses after UNKNOWN; they are ignored.
        assert_eq!(
            parse_v1(b"PROXY UNKNOWN 192.0.2.7 198.51.100.1 40000 25\r\n").unwrap(),
            Header::Local
        );
    }

    #[test]
    fn v1_refuses_what_is_not_exactly_one_header() {
        for bad in [
            &b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\n"[..],
            b"PROXY TCP4 192.0.2.7\r198.51.100.1 40000 25\r\n",
            b"PROXY TCP4 192.0.2.700 198.51.100.1 40000 25\r\n",
            b"PROXY TCP4 2001:db8::7 198.51.100.1 40000 25\r\n",
            b"PROXY TCP5 192.0.2.7 198.51.100.1 40000 25\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25 extra\r\n",
        ] {
            assert!(parse_v1(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn v2_proxy_local_and_families() {
        let v4 = [192, 0, 2, 7, 198, 51, 100, 1, 0x9c, 0x40, 0, 25];
        assert_eq!(
            parse_v2(&v2(1, 0x11, &v4, &[])).unwrap(),
            Header::Client {
                source: "192.0.2.7:40000".parse().unwrap(),
                destination: "198.51.100.1:25".parse().unwrap(),
            }
        );
        // TLVs (AWS puts its VPC endpoint id there) are allowed and ignored.
        let tlv = [0xEA, 0x00, 0x03, b'v', b'p', b'c'];
        assert!(matches!(
            parse_v2(&v2(1, 0x11, &v4, &tlv)).unwrap(),
            Header::Client { .. }
        ));
        assert_eq!(parse_v2(&v2(0, 0x00, &[], &[])).unwrap(), Header::Local);
        assert_eq!(parse_v2(&v2(1, 0x00, &[], &[])).unwrap(), Header::Local);
        assert!(parse_v2(&v2(1, 0x12, &v4, &[])).is_err(), "datagram");
        assert!(parse_v2(&v2(1, 0x11, &v4[..8], &[])).is_err(), "short");
        let mut bad_version = v2(1, 0x11, &v4, &[]);
        bad_version[12] = 0x11;
        assert!(parse_v2(&bad_version).is_err());
    }
}
