//! Client addresses outside 127.0.0.0/8 for tests that need real reverse DNS: hickory
//! answers every 127.in-addr.arpa PTR query with `localhost` itself (RFC 6761), so
//! iprev and host-name rules are tested from TEST-NET addresses added to `lo`.

use std::net::{IpAddr, SocketAddr, TcpListener};

/// Makes `ip` usable as a source address on this host (adds it to `lo` when needed,
/// which needs root). Returns false, with a message, when that is impossible.
pub fn source_address(ip: &str) -> bool {
    let addr: IpAddr = ip.parse().expect("IP address");
    if TcpListener::bind(SocketAddr::new(addr, 0)).is_ok() {
        return true;
    }
    let prefix = if addr.is_ipv4() { 32 } else { 128 };
    let _ = std::process::Command::new("ip")
        .args(["addr", "add", &format!("{ip}/{prefix}"), "dev", "lo"])
        .output();
    if TcpListener::bind(SocketAddr::new(addr, 0)).is_ok() {
        return true;
    }
    eprintln!(
        "skipping: cannot use {ip} as a source address (needs root to add it to lo; .ci/run runs as root)"
    );
    false
}
