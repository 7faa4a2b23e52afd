//! Address syntax that the command parser lets through but a relay must refuse.
//!
//! smtp-proto drops the quotes around any quoted part of a path, the domain included,
//! so `MAIL FROM:<a@"x.test> RET=FULL">` arrives as the address `a@x.test> RET=FULL`.
//! Relayed as it is, that would add parameters to the backend's MAIL command. A domain
//! must therefore be a real one (RFC 5321 4.1.2, with the U-labels of RFC 6531) or an
//! address literal; the local part is quoted again when it is relayed
//! (`relay::smtp_path`), so it needs no check here.

/// Longest domain (RFC 5321 4.5.3.1.2).
const MAX_DOMAIN: usize = 255;

/// True when `address` (as smtp-proto reports it: `local@domain`, or empty for the
/// null path) has a domain that can be written into a command as it is.
pub fn has_valid_domain(address: &str) -> bool {
    match address.rsplit_once('@') {
        Some((_, domain)) => valid_domain(domain),
        None => address.is_empty(),
    }
}

/// A dot-separated domain of letters, digits, hyphens (and underscores, which real
/// hostnames carry), non-ASCII U-labels, one optional trailing dot; or an IPv4/IPv6
/// address literal.
pub fn valid_domain(domain: &str) -> bool {
    if domain.is_empty() || domain.len() > MAX_DOMAIN {
        return false;
    }
    if let Some(literal) = domain.strip_prefix('[') {
        return literal.strip_suffix(']').is_some_and(|inner| {
            !inner.is_empty()
                && inner
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '.' | '-'))
        });
    }
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    !domain.is_empty()
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_') || !c.is_ascii())
        })
}

#[cfg(test)]
mod tests {
    use super::{has_valid_domain, valid_domain};

    #[test]
    fn domains_and_literals() {
        for good in [
            "example.test",
            "mail-1.example.test",
            "_spf.netigate.se",
            "example.test.",
            "bücher.example",
            "[192.0.2.1]",
            "[IPv6:2001:db8::1]",
            "localhost",
        ] {
            assert!(valid_domain(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "x.test> RET=FULL NOTIFY=NEVER",
            "x.test>",
            "x test",
            "a..b",
            ".a",
            "x.test\r\nRSET",
            "x\"y.test",
            "[192.0.2.1",
            "[]",
            "[1.2.3.4> X]",
            "x;y.test",
            "x<y.test",
        ] {
            assert!(!valid_domain(bad), "{bad:?}");
        }
        assert!(has_valid_domain(""));
        assert!(has_valid_domain("a@example.test"));
        assert!(!has_valid_domain("postmaster"));
        assert!(!has_valid_domain("a@x.test> AUTH=<>"));
    }
}
