//! PROXY protocol v1/v2 on the SMTP listener, over real sockets with a real DNS server:
//! the address in a trusted balancer's header is the client address (SPF,
//! `Received`, `Authentication-Results`, the per-IP connection limit); a trusted peer
//! without a header and an untrusted peer with one are refused; a balancer's health
//! check (`PROXY UNKNOWN`, v2 `LOCAL`) is greeted and gets no transaction.

use mxgate_test_kit as support;

use std::time::Duration;
use support::client::SmtpClient;
use support::dns::TestDns;
use support::gateway::{Gateway, TestConfig};

/// SPF for sender.test allows this address only; the tests claim it in a header.
const SENDER_IP: &str = "192.0.2.7";

fn v1(source: &str, port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {source} 198.51.100.1 {port} 25\r\n").into_bytes()
}

/// A v2 header built by hand from the spec (not by the crate mxgate parses with).
fn v2(command: u8, source: Option<([u8; 4], u16)>) -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.push(0x20 | command);
    match source {
        Some((ip, port)) => {
            out.push(0x11); // AF_INET, STREAM
            // 12 bytes of addresses and a TLV (type 0xEA, as AWS sends its endpoint id).
            out.extend_from_slice(&(12u16 + 6).to_be_bytes());
            out.extend_from_slice(&ip);
            out.extend_from_slice(&[198, 51, 100, 1]);
            out.extend_from_slice(&port.to_be_bytes());
            out.extend_from_slice(&25u16.to_be_bytes());
            out.extend_from_slice(&[0xEA, 0, 3, b'v', b'p', b'c']);
        }
        None => {
            out.push(0x00);
            out.extend_from_slice(&0u16.to_be_bytes());
        }
    }
    out
}

async fn gateway(dns: &TestDns, trusted_balancer: &str, extra_server: &str) -> Gateway {
    gateway_with_timeout(dns, trusted_balancer, "500ms", extra_server).await
}

async fn gateway_with_timeout(
    dns: &TestDns,
    trusted_balancer: &str,
    timeout: &str,
    extra_server: &str,
) -> Gateway {
    dns.txt("sender.test", &format!("v=spf1 ip4:{SENDER_IP} -all"));
    dns.a("mail.sender.test", SENDER_IP);
    dns.ptr(SENDER_IP, "mail.sender.test");
    Gateway::start(TestConfig {
        server_extra: format!(
            "  proxy_protocol:\n    trusted_networks: [\"{trusted_balancer}\"]\n    timeout: {timeout}\n{extra_server}"
        ),
        extra: dns.config(),
        ..Default::default()
    })
    .await
}

fn header_line<'a>(message: &'a str, name: &str) -> &'a str {
    let start = message
        .find(&format!("{name}: "))
        .unwrap_or_else(|| panic!("no {name} in\n{message}"));
    let rest = &message[start..];
    let mut end = rest.find('\n').unwrap();
    while rest[end + 1..].starts_with(['\t', ' ']) {
        end += 1 + rest[end + 1..].find('\n').unwrap();
    }
    &rest[..end]
}

async fn send_one(client: &mut SmtpClient, subject: &str) {
    assert_eq!(client.cmd("EHLO mail.sender.test").await.code, 250);
    let reply = client
        .send_mail(
            "alice@sender.test",
            &["bob@example.test"],
            &format!("From: alice@sender.test\nSubject: {subject}\n\nhello\n"),
        )
        .await;
    assert_eq!(reply.code, 250, "{reply}");
}

#[tokio::test(flavor = "multi_thread")]
async fn v1_and_v2_source_is_the_client_in_spf_received_and_results() {
    let dns = TestDns::start().await;
    let gw = gateway(&dns, "127.0.0.1/32", "").await;

    let (mut client, greeting) =
        SmtpClient::connect_with_preamble(gw.smtp, &v1(SENDER_IP, 40001)).await;
    assert_eq!(greeting.code, 220, "{greeting}");
    send_one(&mut client, "via v1").await;
    // v2, and an SMTP command in the same segment as the header: the header reader
    // must not take a byte past the header (the reply to EHLO proves it was read).
    let mut preamble = v2(1, Some(([192, 0, 2, 7], 40002)));
    preamble.extend_from_slice(b"NOOP\r\n");
    let (mut client, greeting) = SmtpClient::connect_with_preamble(gw.smtp, &preamble).await;
    assert_eq!(greeting.code, 220, "{greeting}");
    assert_eq!(client.read_reply().await.code, 250, "NOOP after the header");
    send_one(&mut client, "via v2").await;
    // A claimed address that SPF does not allow fails SPF: the header decides.
    let (mut client, _) = SmtpClient::connect_with_preamble(gw.smtp, &v1("192.0.2.8", 40003)).await;
    send_one(&mut client, "not allowed").await;

    let delivered = gw.delivered();
    assert_eq!(delivered.len(), 3);
    let pass =
        format!("spf=pass (domain of sender.test designates {SENDER_IP} as permitted sender)");
    let iprev = format!("iprev=pass (mail.sender.test) policy.iprev={SENDER_IP}");
    for (message, ip, spf, iprev) in [
        (&delivered[0], SENDER_IP, pass.as_str(), iprev.as_str()),
        (&delivered[1], SENDER_IP, pass.as_str(), iprev.as_str()),
        (
            &delivered[2],
            "192.0.2.8",
            "spf=fail",
            "policy.iprev=192.0.2.8",
        ),
    ] {
        let received = header_line(message, "Received");
        assert!(received.contains(&format!("[{ip}]")), "{received}");
        assert!(!received.contains("127.0.0.1"), "{received}");
        let results = header_line(message, "Authentication-Results");
        assert!(results.contains(spf), "{results}");
        assert!(results.contains(iprev), "{results}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_peer_without_a_header_is_refused_after_the_timeout() {
    let dns = TestDns::start().await;
    let gw = gateway(&dns, "127.0.0.1/32", "").await;
    let started = std::time::Instant::now();
    // An SMTP client that waits for the greeting: it never comes.
    let (mut client, reply) = SmtpClient::connect(gw.smtp).await;
    assert_eq!((reply.code, reply.status()), (421, "4.7.0"), "{reply}");
    assert!(started.elapsed() >= Duration::from_millis(450));
    assert!(client.is_closed().await);
    // A header that is not one.
    let (mut client, reply) =
        SmtpClient::connect_with_preamble(gw.smtp, b"EHLO balancer.example\r\n").await;
    assert_eq!((reply.code, reply.status()), (421, "4.7.0"), "{reply}");
    assert!(client.is_closed().await);
    let (_, reply) =
        SmtpClient::connect_with_preamble(gw.smtp, b"PROXY TCP4 192.0.2.700 198.51.100.1 1 25\r\n")
            .await;
    assert_eq!(reply.code, 421, "{reply}");
    let metrics = mxgate::metrics::render();
    for result in ["missing", "invalid"] {
        assert!(
            metrics.contains(&format!(
                "mxgate_proxy_protocol_headers_total{{result=\"{result}\"}}"
            )),
            "{result} not counted:\n{metrics}"
        );
    }
    assert!(gw.delivered().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn header_from_an_untrusted_peer_is_refused_not_honoured() {
    let dns = TestDns::start().await;
    // Only 127.0.0.1 is a balancer; the client connects from 127.0.0.2.
    let gw = gateway(&dns, "127.0.0.1/32", "").await;
    for header in [v1(SENDER_IP, 40004), v2(1, Some(([192, 0, 2, 7], 40005)))] {
        let (mut client, greeting) = SmtpClient::connect_from(gw.smtp, "127.0.0.2").await;
        assert_eq!(greeting.code, 220);
        client.send(&header).await;
        let reply = client.read_reply().await;
        assert_eq!((reply.code, reply.status()), (554, "5.7.1"), "{reply}");
        assert!(client.is_closed().await);
    }
    assert!(
        mxgate::metrics::render()
            .contains("mxgate_proxy_protocol_headers_total{result=\"untrusted\"}")
    );
}

/// A header from an untrusted peer that arrives in pieces (its first read shorter than
/// the signature) is refused as a header too, not read as SMTP lines.
#[tokio::test(flavor = "multi_thread")]
async fn header_in_pieces_from_an_untrusted_peer_is_refused() {
    let dns = TestDns::start().await;
    let gw = gateway(&dns, "127.0.0.1/32", "").await;
    let v2_header = v2(1, Some(([192, 0, 2, 7], 40006)));
    let v1_header = v1(SENDER_IP, 40007);
    for (first, rest) in [
        (&v1_header[..3], &v1_header[3..]),
        (&v2_header[..2], &v2_header[2..]),
    ] {
        let (mut client, greeting) = SmtpClient::connect_from(gw.smtp, "127.0.0.2").await;
        assert_eq!(greeting.code, 220);
        client.send(first).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.send(rest).await;
        let reply = client.read_reply().await;
        assert_eq!((reply.code, reply.status()), (554, "5.7.1"), "{reply}");
        assert!(client.is_closed().await);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_checks_are_greeted_and_get_no_transaction() {
    let dns = TestDns::start().await;
    let gw = gateway(&dns, "127.0.0.1/32", "").await;
    for header in [b"PROXY UNKNOWN\r\n".to_vec(), v2(0, None)] {
        let (mut client, greeting) = SmtpClient::connect_with_preamble(gw.smtp, &header).await;
        assert_eq!(greeting.code, 220, "{greeting}");
        assert_eq!(client.cmd("EHLO balancer.example").await.code, 250);
        let reply = client.cmd("MAIL FROM:<a@sender.test>").await;
        assert_eq!((reply.code, reply.status()), (421, "4.3.2"), "{reply}");
        assert!(client.is_closed().await);
        // HAProxy's smtpchk: greeting, HELO, QUIT.
        let (mut client, _) = SmtpClient::connect_with_preamble(gw.smtp, &header).await;
        assert_eq!(client.cmd("HELO balancer.example").await.code, 250);
        assert_eq!(client.cmd("QUIT").await.code, 221);
    }
    assert!(gw.delivered().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn per_ip_limit_counts_the_proxied_address() {
    let dns = TestDns::start().await;
    let gw = gateway(&dns, "127.0.0.1/32", "  max_connections_per_ip: 2\n").await;
    let mut open = Vec::new();
    for port in [40010, 40011] {
        let (client, greeting) =
            SmtpClient::connect_with_preamble(gw.smtp, &v1(SENDER_IP, port)).await;
        assert_eq!(greeting.code, 220, "{greeting}");
        open.push(client);
    }
    let (_, reply) = SmtpClient::connect_with_preamble(gw.smtp, &v1(SENDER_IP, 40012)).await;
    assert_eq!((reply.code, reply.status()), (421, "4.7.0"), "{reply}");
    assert!(reply.text().contains("from your address"), "{reply}");
    // All of them came from the balancer's 127.0.0.1; another client still gets in.
    let (_, greeting) = SmtpClient::connect_with_preamble(gw.smtp, &v1("192.0.2.8", 40013)).await;
    assert_eq!(greeting.code, 220, "{greeting}");
    drop(open);
}

/// The first reply line on a raw connection after writing `pieces` with pauses.
async fn first_line_after(addr: std::net::SocketAddr, pieces: &[&[u8]]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    for piece in pieces {
        tcp.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.ends_with(b"\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("a reply in time")
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn header_in_pieces_is_read_whole_and_an_overlong_one_is_refused() {
    let dns = TestDns::start().await;
    let gw = gateway_with_timeout(&dns, "127.0.0.1/32", "5s", "").await;
    // Shorter than the first read, then the rest in two segments.
    let line = first_line_after(
        gw.smtp,
        &[b"PROX", b"Y TCP4 192.0.2.7 198.51", b".100.1 40000 25\r\n"],
    )
    .await;
    assert!(line.starts_with("220 "), "{line}");
    // v2 in pieces, with a 1000-byte TLV.
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x11".to_vec();
    header.extend_from_slice(&(12u16 + 1003).to_be_bytes());
    header.extend_from_slice(&[192, 0, 2, 7, 198, 51, 100, 1, 0x9c, 0x40, 0, 25]);
    header.extend_from_slice(&[0xEA, 0x03, 0xE8]);
    header.extend_from_slice(&[b'x'; 1000]);
    let (a, b) = header.split_at(14);
    let line = first_line_after(gw.smtp, &[a, b]).await;
    assert!(line.starts_with("220 "), "{line}");
    // A v1 line longer than the spec's 107 bytes is refused without waiting for more.
    let long = format!("PROXY TCP4 {}", "1".repeat(120));
    let started = std::time::Instant::now();
    let line = first_line_after(gw.smtp, &[long.as_bytes()]).await;
    assert!(line.starts_with("421 4.7.0 "), "{line}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "refused for its length, not after the 5s timeout"
    );
}
