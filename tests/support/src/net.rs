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
    let mut add = std::process::Command::new("ip");
    add.args(["addr", "add", &format!("{ip}/{prefix}"), "dev", "lo"]);
    if addr.is_ipv6() {
        // A new IPv6 address is tentative until duplicate address detection has run,
        // which the kernel does after `ip` returns, even on lo: bind() fails meanwhile
        // (seen in CI under load). `nodad` skips it; the retries cover older kernels.
        add.arg("nodad");
    }
    let _ = add.output();
    for _ in 0..100 {
        if TcpListener::bind(SocketAddr::new(addr, 0)).is_ok() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    eprintln!(
        "skipping: cannot use {ip} as a source address (needs root to add it to lo; .ci/run runs as root)"
    );
    false
}
