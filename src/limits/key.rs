//! Which clients share a budget: an IPv4 address, or an IPv6 prefix (one host can hold
//! a whole /64, so counting IPv6 addresses one by one bounds nothing). IPv4-mapped IPv6
//! (`::ffff:192.0.2.1`, what a dual-stack socket reports) counts as the IPv4 address.
//! A 6to4 address (`2002:AABB:CCDD::/48`, RFC 3056) is derived from one IPv4 address,
//! whose owner holds the whole /48 (65,536 /64s): it counts by its /48 at most. A
//! Teredo address (`2001:0::/32`, RFC 4380) carries its client's public IPv4 address
//! (inverted) in its last 32 bits, and its /64 is the Teredo *server*, shared by all
//! that server's clients: it counts as that IPv4 address. Replies reach a Teredo
//! client at that embedded address, so a client can no more choose it freely than an
//! IPv4 client can its own (the port and flags it may vary are not part of the key).

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::fmt;
use std::net::IpAddr;

/// The unit that limits count: `192.0.2.1/32` or `2001:db8:1:2::/64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey(IpNet);

impl ClientKey {
    /// The key of `ip` when IPv6 clients are grouped by `ipv6_prefix_length` bits
    /// (validated to 1..=128; anything above 128 counts as 128).
    pub fn of(ip: IpAddr, ipv6_prefix_length: u8) -> ClientKey {
        let net = match crate::config::canonical_ip(ip) {
            IpAddr::V4(v4) => IpNet::V4(Ipv4Net::from(v4)),
            IpAddr::V6(v6) if is_teredo(&v6) && ipv6_prefix_length > 32 => {
                let s = v6.segments();
                let client = !((u32::from(s[6]) << 16) | u32::from(s[7]));
                IpNet::V4(Ipv4Net::from(std::net::Ipv4Addr::from(client)))
            }
            IpAddr::V6(v6) => {
                let six_to_four = v6.segments()[0] == 0x2002;
                let len = ipv6_prefix_length.min(if six_to_four { 48 } else { 128 });
                let net = Ipv6Net::new(v6, len).unwrap_or_else(|_| Ipv6Net::from(v6));
                IpNet::V6(net.trunc())
            }
        };
        ClientKey(net)
    }
}

fn is_teredo(v6: &std::net::Ipv6Addr) -> bool {
    let s = v6.segments();
    s[0] == 0x2001 && s[1] == 0
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: &str, len: u8) -> String {
        ClientKey::of(ip.parse().unwrap(), len).to_string()
    }

    #[test]
    fn ipv4_counts_per_address() {
        assert_eq!(key("192.0.2.1", 64), "192.0.2.1/32");
        assert_ne!(key("192.0.2.1", 64), key("192.0.2.2", 64));
    }

    #[test]
    fn ipv4_mapped_ipv6_is_ipv4() {
        assert_eq!(key("::ffff:192.0.2.1", 64), "192.0.2.1/32");
        assert_eq!(
            ClientKey::of("::ffff:192.0.2.1".parse().unwrap(), 64),
            ClientKey::of("192.0.2.1".parse().unwrap(), 64)
        );
    }

    #[test]
    fn ipv6_counts_per_prefix() {
        assert_eq!(key("2001:db8:1:2:a:b:c:d", 64), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2::1", 64), key("2001:db8:1:2:ffff::9", 64));
        assert_ne!(key("2001:db8:1:2::1", 64), key("2001:db8:1:3::1", 64));
        assert_eq!(key("2001:db8:1:2::1", 48), key("2001:db8:1:3::1", 48));
        assert_eq!(key("2001:db8::1", 128), "2001:db8::1/128");
        assert_ne!(key("2001:db8::1", 128), key("2001:db8::2", 128));
    }

    #[test]
    fn teredo_counts_as_its_client_ipv4_address() {
        // RFC 4380's example: server 65.54.227.120, client 192.0.2.45 behind a NAT
        // (stored inverted: 3fff:fdd2), port 40000 (obfuscated 63bf).
        let teredo = "2001:0:4136:e378:8000:63bf:3fff:fdd2";
        assert_eq!(key(teredo, 64), "192.0.2.45/32");
        assert_eq!(key(teredo, 64), key("192.0.2.45", 64));
        // Another client of the same Teredo server is another client.
        assert_ne!(
            key(teredo, 64),
            key("2001:0:4136:e378:8000:63bf:3fff:fdd3", 64)
        );
        // The same client through another port or server is the same client.
        assert_eq!(
            key(teredo, 64),
            key("2001:0:4136:e379:0:1234:3fff:fdd2", 64)
        );
        // A prefix length that groups the whole Teredo space still does.
        assert_eq!(key(teredo, 32), "2001::/32");
        // 2001:db8::/32 and 2001:1::/32 are not Teredo.
        assert_eq!(key("2001:1::1", 64), "2001:1::/64");
    }

    #[test]
    fn six_to_four_counts_per_ipv4_address() {
        // 2002:c000:0201::/48 is 192.0.2.1's: every /64 under it is one client.
        assert_eq!(key("2002:c000:201:1::1", 64), "2002:c000:201::/48");
        assert_eq!(
            key("2002:c000:201:1::1", 64),
            key("2002:c000:201:ffff::9", 64)
        );
        assert_ne!(key("2002:c000:201::1", 64), key("2002:c000:202::1", 64));
        assert_eq!(key("2002:c000:201:1::1", 32), "2002:c000::/32");
    }
}
