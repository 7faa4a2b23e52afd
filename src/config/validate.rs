//! Checks that need more than one value. File contents (certificates, keys, policy
//! files) are checked when the snapshot is compiled, where they are loaded anyway.

use super::{Diagnostic, LoadedConfig, YamlPath};
use std::collections::HashSet;
use std::time::Duration;

/// Longest time a backend's answer about a recipient may be kept.
const MAX_RECIPIENT_TTL: Duration = Duration::from_secs(86_400);
/// Most recipient answers kept (an entry is an address and a reply: a few hundred bytes).
const MAX_RECIPIENT_ENTRIES: u64 = 10_000_000;
/// `dns.cache_max_bytes`: below this a cache's share could not hold one answer of
/// `auth::dns::MAX_ENTRY_BYTES`; above it the bound protects nothing.
const MIN_DNS_CACHE_BYTES: u64 = 1024 * 1024;
const MAX_DNS_CACHE_BYTES: u64 = 64 * 1024 * 1024 * 1024;

/// Every check, section by section in file order; errors keep that order.
pub fn validate(loaded: &LoadedConfig) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let root = YamlPath::root();
    check_server(loaded, &root.key("server"), &mut out);
    check_backend(loaded, &root.key("backend"), &mut out);
    check_relay(loaded, &root.key("relay"), &mut out);
    check_dns(loaded, &root.key("dns"), &mut out);
    check_auth(loaded, &root.key("auth"), &mut out);
    check_dmarc(loaded, &root.key("dmarc"), &mut out);
    check_arc(loaded, &root.key("arc"), &mut out);
    check_limits(loaded, &root.key("limits"), &mut out);
    check_log(loaded, &root.key("log"), &mut out);
    check_reload_intervals(loaded, &root, &mut out);
    out
}

/// Shortest interval between checks of the watched files: each check reads the
/// metadata of every config, policy and certificate file, and `0s` would do so at
/// every timer tick for the life of the process.
const MIN_RELOAD_INTERVAL: Duration = Duration::from_millis(100);

fn check_reload_intervals(loaded: &LoadedConfig, root: &YamlPath, out: &mut Vec<Diagnostic>) {
    let config = &loaded.config;
    for (path, interval) in [
        (root.key("policy"), config.policy.reload_interval),
        (
            root.key("tls"),
            config.tls.as_ref().map(|t| t.reload_interval),
        ),
    ] {
        if interval.is_some_and(|i| i < MIN_RELOAD_INTERVAL) {
            out.push(loaded.error(&path.key("reload_interval"), "must be at least 100ms"));
        }
    }
}

fn check_server(loaded: &LoadedConfig, server: &YamlPath, out: &mut Vec<Diagnostic>) {
    let config = &loaded.config;
    if config.server.listen.is_empty() {
        out.push(loaded.error(
            &server.key("listen"),
            "server.listen needs at least one address",
        ));
    }
    let mut seen = HashSet::new();
    for (n, addr) in config.server.listen.iter().enumerate() {
        if !seen.insert(addr) {
            out.push(loaded.error(
                &server.key("listen").index(n),
                format!("{addr} is listed twice"),
            ));
        }
    }
    if config.server.domains.is_empty() {
        out.push(loaded.error(
            &server.key("domains"),
            "server.domains needs at least one recipient domain (mxgate is not an open relay)",
        ));
    }
    if config.server.max_recipients.get() < 100 {
        out.push(loaded.warning(
            &server.key("max_recipients"),
            "RFC 5321 section 4.5.3.1.8 asks servers to accept at least 100 recipients",
        ));
    }
    if config.server.max_header_size < 1024 {
        out.push(loaded.error(
            &server.key("max_header_size"),
            "must be at least 1024 bytes",
        ));
    }
    for (name, value) in [
        ("command", config.server.timeouts.command),
        ("data_block", config.server.timeouts.data_block),
        ("write", config.server.timeouts.write),
    ] {
        if value.is_zero() {
            out.push(loaded.error(&server.key("timeouts").key(name), "must be greater than 0"));
        }
    }
    if let Some(proxy) = &config.server.proxy_protocol {
        let path = server.key("proxy_protocol");
        if proxy.trusted_networks.is_empty() {
            out.push(loaded.error(
                &path.key("trusted_networks"),
                "server.proxy_protocol needs at least one load balancer network",
            ));
        }
        if proxy.timeout.is_zero() {
            out.push(loaded.error(&path.key("timeout"), "must be greater than 0"));
        }
    }
}

fn check_backend(loaded: &LoadedConfig, backend: &YamlPath, out: &mut Vec<Diagnostic>) {
    if loaded.config.backend.is_empty() {
        out.push(loaded.error(
            backend,
            "backend needs at least one mailbox server (smtp://, lmtp:// or maildir:)",
        ));
    }
}

fn check_relay(loaded: &LoadedConfig, relay: &YamlPath, out: &mut Vec<Diagnostic>) {
    let config = &loaded.config;
    match (&config.relay.client_certificate, &config.relay.client_key) {
        (Some(_), None) => out.push(loaded.error(
            &relay.key("client_certificate"),
            "relay.client_certificate needs relay.client_key",
        )),
        (None, Some(_)) => out.push(loaded.error(
            &relay.key("client_key"),
            "relay.client_key needs relay.client_certificate",
        )),
        _ => {}
    }
    let cache = &config.relay.recipient_cache;
    let cache_at = relay.key("recipient_cache");
    for (name, ttl) in [
        ("ttl_accept", cache.ttl_accept),
        ("ttl_reject", cache.ttl_reject),
    ] {
        if ttl > MAX_RECIPIENT_TTL {
            out.push(loaded.error(
                &cache_at.key(name),
                format!("relay.recipient_cache.{name}: at most 1d (the mailbox server's directory changes, and a kept answer would hide it)"),
            ));
        }
    }
    if cache.max_entries > MAX_RECIPIENT_ENTRIES {
        out.push(loaded.error(
            &cache_at.key("max_entries"),
            format!("relay.recipient_cache.max_entries: at most {MAX_RECIPIENT_ENTRIES} (each entry costs memory)"),
        ));
    }
}

fn check_dns(loaded: &LoadedConfig, dns: &YamlPath, out: &mut Vec<Diagnostic>) {
    let config = &loaded.config;
    if config.dns.nameservers.as_ref().is_some_and(Vec::is_empty) {
        out.push(loaded.error(
            &dns.key("nameservers"),
            "dns.nameservers is empty; remove the key to use the system resolver",
        ));
    }
    let bytes = config.dns.cache_max_bytes.get();
    if !(MIN_DNS_CACHE_BYTES..=MAX_DNS_CACHE_BYTES).contains(&bytes) {
        out.push(loaded.error(
            &dns.key("cache_max_bytes"),
            format!("dns.cache_max_bytes: between {MIN_DNS_CACHE_BYTES} (1 MiB) and {MAX_DNS_CACHE_BYTES} (64 GiB), not {bytes}"),
        ));
    }
}

fn check_auth(loaded: &LoadedConfig, auth: &YamlPath, out: &mut Vec<Diagnostic>) {
    let config = &loaded.config;
    if config.auth.timeouts.end_of_data.is_zero() {
        out.push(loaded.error(
            &auth.key("timeouts").key("end_of_data"),
            "must be greater than 0",
        ));
    }
    if config.auth.timeouts.spf.is_zero() {
        out.push(loaded.error(&auth.key("timeouts").key("spf"), "must be greater than 0"));
    }
    // The guard judges the sender checks' report; with none, it lets everything by.
    if !config.auth.enabled && config.dmarc.protect_own_domains {
        out.push(loaded.warning(
            &auth.key("enabled"),
            "with sender checks off, dmarc.protect_own_domains protects nothing: mail forged From your own domains is delivered",
        ));
    }
}

fn check_dmarc(loaded: &LoadedConfig, dmarc: &YamlPath, out: &mut Vec<Diagnostic>) {
    if crate::rewrite::headers::parse_header_line(&loaded.config.dmarc.quarantine_header).is_none()
    {
        out.push(loaded.error(
            &dmarc.key("quarantine_header"),
            "expected `Header-Name: value`",
        ));
    }
}

fn check_arc(loaded: &LoadedConfig, at: &YamlPath, out: &mut Vec<Diagnostic>) {
    let Some(arc) = &loaded.config.arc else {
        return;
    };
    let configured = [
        arc.domain.is_some(),
        arc.selector.is_some(),
        arc.private_key.is_some(),
    ];
    let wants_seal = arc.seal.unwrap_or(configured.iter().any(|c| *c));
    if wants_seal && configured.iter().any(|c| !c) {
        out.push(loaded.error(
            at,
            "sealing needs arc.domain, arc.selector and arc.private_key (or set arc.seal: false)",
        ));
    }
    if let Some(selector) = &arc.selector
        && !valid_selector(selector)
    {
        out.push(loaded.error(
            &at.key("selector"),
            format!("`{selector}` is not a valid selector"),
        ));
    }
    for (n, key) in arc.keys.iter().enumerate() {
        if !valid_selector(&key.selector) {
            out.push(loaded.error(
                &at.key("keys").index(n).key("selector"),
                format!("`{}` is not a valid selector", key.selector),
            ));
        }
    }
}

fn check_limits(loaded: &LoadedConfig, limits: &YamlPath, out: &mut Vec<Diagnostic>) {
    let config = &loaded.config;
    if !(1..=128).contains(&config.limits.ipv6_prefix_length) {
        out.push(loaded.error(
            &limits.key("ipv6_prefix_length"),
            "limits.ipv6_prefix_length must be between 1 and 128",
        ));
    }
    if let Err(err) = super::StoreUrl::parse(&config.limits.store) {
        out.push(loaded.error(&limits.key("store"), format!("limits.store: {err}")));
    }
    let store_timeout = config.limits.store_timeout;
    if store_timeout.is_zero() || store_timeout > Duration::from_secs(5) {
        out.push(loaded.error(
            &limits.key("store_timeout"),
            "limits.store_timeout must be between 1ms and 5s (every client waits for it)",
        ));
    }
    if config.limits.store_connection_ttl < Duration::from_secs(3) {
        out.push(loaded.error(
            &limits.key("store_connection_ttl"),
            "limits.store_connection_ttl must be at least 3s",
        ));
    }
}

fn check_log(loaded: &LoadedConfig, log: &YamlPath, out: &mut Vec<Diagnostic>) {
    if let Err(err) = tracing_subscriber::EnvFilter::try_new(&loaded.config.log.level) {
        out.push(loaded.error(&log.key("level"), format!("invalid log filter: {err}")));
    }
}

fn valid_selector(selector: &str) -> bool {
    !selector.is_empty()
        && selector.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use crate::config::{SourceFile, load_source};

    fn load(text: &str) -> Result<(), Vec<String>> {
        load_source(SourceFile {
            path: "mxgate.yaml".into(),
            text: text.into(),
        })
        .map(|_| ())
        .map_err(|ds| ds.iter().map(|d| d.to_string()).collect())
    }

    #[test]
    fn a_guard_without_sender_checks_is_a_warning() {
        let text = format!("{MINIMAL}auth:\n  enabled: false\n");
        let (_, diagnostics) = load_source(SourceFile {
            path: "mxgate.yaml".into(),
            text,
        })
        .unwrap();
        let found: Vec<String> = diagnostics.iter().map(|d| d.to_string()).collect();
        assert!(
            found
                .iter()
                .any(|d| d.contains("mxgate.yaml:8:12") && d.contains("protect_own_domains")),
            "{found:?}"
        );
        let text =
            format!("{MINIMAL}auth:\n  enabled: false\ndmarc:\n  protect_own_domains: false\n");
        let (_, diagnostics) = load_source(SourceFile {
            path: "mxgate.yaml".into(),
            text,
        })
        .unwrap();
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
    }

    const MINIMAL: &str = "server:\n  hostname: mx.example.test\n  listen: [\"127.0.0.1:2525\"]\n  domains: [example.test]\nbackend:\n  - maildir:./var/mail\n";

    #[test]
    fn minimal_config_loads() {
        load(MINIMAL).unwrap();
    }

    #[test]
    fn reload_intervals_are_checked() {
        let text = format!(
            "{MINIMAL}tls:\n  certificate: c.pem\n  private_key: k.pem\n  reload_interval: 0s\npolicy:\n  reload_interval: 10ms\n"
        );
        let errors = load(&text).unwrap_err();
        let expected = [
            "mxgate.yaml:12:20: must be at least 100ms",
            "mxgate.yaml:10:20: must be at least 100ms",
        ];
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        for (error, want) in errors.iter().zip(expected) {
            assert!(error.starts_with(want), "{want:?}: {errors:#?}");
        }
        load(&format!("{MINIMAL}policy:\n  reload_interval: 100ms\n")).unwrap();
    }

    #[test]
    fn dns_cache_bytes_are_checked() {
        for (bytes, ok) in [("1000", false), ("1048576", true), ("100000000000", false)] {
            let text = format!("{MINIMAL}dns:\n  cache_max_bytes: {bytes}\n");
            match load(&text) {
                Ok(_) => assert!(ok, "{bytes} accepted"),
                Err(errors) => {
                    assert!(!ok, "{bytes}: {errors:#?}");
                    assert!(
                        errors[0].contains(": dns.cache_max_bytes: between 1048576 (1 MiB)"),
                        "{errors:#?}"
                    );
                }
            }
        }
        let (loaded, _) = load_source(SourceFile {
            path: "mxgate.yaml".into(),
            text: MINIMAL.to_string(),
        })
        .unwrap();
        assert_eq!(loaded.config.dns.cache_max_bytes.get(), 32 * 1024 * 1024);
    }

    #[test]
    fn recipient_cache_bounds_are_checked() {
        let text = format!(
            "{MINIMAL}relay:\n  recipient_cache:\n    ttl_accept: 0s\n    ttl_reject: 2d\n    max_entries: 20000000\n"
        );
        let errors = load(&text).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(
            errors[0]
                .starts_with("mxgate.yaml:10:17: relay.recipient_cache.ttl_reject: at most 1d"),
            "{errors:#?}"
        );
        assert!(
            errors[1].starts_with("mxgate.yaml:11:18: relay.recipient_cache.max_entries: at most"),
            "{errors:#?}"
        );
        let (loaded, _) = load_source(SourceFile {
            path: "mxgate.yaml".into(),
            text: format!("{MINIMAL}relay:\n  recipient_cache:\n    ttl_accept: 0s\n"),
        })
        .unwrap();
        let cache = &loaded.config.relay.recipient_cache;
        assert!(cache.ttl_accept.is_zero());
        assert_eq!(cache.ttl_reject, std::time::Duration::from_secs(60));
        assert_eq!(cache.max_entries, 100_000);
    }

    #[test]
    fn all_errors_are_reported_at_once() {
        let text = "server:\n  hostname: mx.example.test\n  listen: []\n  domains: []\nbackend: []\ndmarc:\n  quarantine_header: nonsense\n";
        let errors = load(text).unwrap_err();
        assert_eq!(errors.len(), 4, "{errors:#?}");
        assert!(errors[0].starts_with("mxgate.yaml:3:11: "), "{errors:#?}");
        assert!(
            errors.iter().any(|e| e.starts_with("mxgate.yaml:7:22: ")),
            "{errors:#?}"
        );
    }

    /// Errors in the file's shape (unknown key, bad network, a value that is no
    /// variant) do not hide each other, wherever they are; validation, which judges
    /// the config as a whole, waits until the shape is right.
    #[test]
    fn shape_errors_do_not_hide_each_other() {
        let text = "server:\n  hostname: mx.example.test\n  listen: [\"127.0.0.1:2525\"]\n  domains: []\n  trusted_networks: [\"10.0.0.0/33\"]\n  colour: blue\nbackend: [\"maildir:./mail\"]\ndmarc:\n  on_temperror: maybe\nrelay:\n  tls: sometimes\n";
        let errors = load(text).unwrap_err();
        let expected = [
            "mxgate.yaml:5:22: server.trusted_networks[0]: `10.0.0.0/33`",
            "mxgate.yaml:6:3: server.colour: unknown field `colour`",
            "mxgate.yaml:9:17: dmarc.on_temperror: unknown variant `maybe`",
            "mxgate.yaml:11:8: relay.tls: unknown variant `sometimes`",
        ];
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        for (error, want) in errors.iter().zip(expected) {
            assert!(
                error.starts_with(want),
                "{want:?}, in file order: {errors:#?}"
            );
        }
        // Once the shape is right, validation speaks (the empty domain list).
        let fixed = text
            .replace("\"10.0.0.0/33\"", "\"10.0.0.0/8\"")
            .replace("  colour: blue\n", "")
            .replace("maybe", "accept")
            .replace("sometimes", "off");
        let errors = load(&fixed).unwrap_err();
        assert!(errors[0].starts_with("mxgate.yaml:4:12: "), "{errors:#?}");

        // A wrong value under a required key takes its section out, without a "missing
        // field" for it, and the sections after it are still looked at.
        let text = "server:\n  hostname: mx.example.test\n  listen: [\"127.0.0.1:2525\"]\n  domains: [example.test]\n  colour: blue\nbackend:\n  - ftp://127.0.0.1:2526\ntls:\n  certificate: [7]\n  private_key: k.pem\ndmarc:\n  on_temperror: maybe\n";
        let errors = load(text).unwrap_err();
        let expected = [
            "mxgate.yaml:5:3: server.colour",
            "mxgate.yaml:7:5: backend[0]: unknown backend scheme",
            "mxgate.yaml:9:16: tls.certificate: invalid type",
            "mxgate.yaml:12:17: dmarc.on_temperror",
        ];
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        for (error, want) in errors.iter().zip(expected) {
            assert!(error.starts_with(want), "{want:?}: {errors:#?}");
        }
    }

    #[test]
    fn limits_are_checked() {
        let text = format!("{MINIMAL}limits:\n  ipv6_prefix_length: 129\n");
        let errors = load(&text).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].starts_with("mxgate.yaml:8:23: limits.ipv6_prefix_length"),
            "{errors:#?}"
        );
        // A 0 where at least 1 is needed is refused while parsing (a NonZero field).
        let text = format!("{MINIMAL}limits:\n  max_tracked_clients: 0\n");
        let errors = load(&text).unwrap_err();
        assert_eq!(
            errors,
            ["mxgate.yaml:8:24: limits.max_tracked_clients: must be at least 1, not `0`"]
        );
        load(&format!(
            "{MINIMAL}limits:\n  ipv6_prefix_length: 48\n  messages_per_minute: 0\n"
        ))
        .unwrap();
    }

    #[test]
    fn the_limits_store_is_checked_without_showing_its_password() {
        let text = format!(
            "{MINIMAL}limits:\n  store: \"redis://:hunter2@redis:notaport/0\"\n  store_timeout: 0s\n  store_connection_ttl: 1s\n"
        );
        let errors = load(&text).unwrap_err();
        let expected = [
            "mxgate.yaml:8:10: limits.store: not a valid Redis URL",
            "mxgate.yaml:9:18: limits.store_timeout",
            "mxgate.yaml:10:25: limits.store_connection_ttl",
        ];
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        for (error, want) in errors.iter().zip(expected) {
            assert!(error.starts_with(want), "{want:?}: {errors:#?}");
            assert!(!error.contains("hunter2"), "{error}");
        }
        let errors = load(&format!("{MINIMAL}limits:\n  store: memcached://m\n")).unwrap_err();
        assert!(
            errors[0].starts_with("mxgate.yaml:8:10: limits.store: unknown store"),
            "{errors:#?}"
        );
        load(&format!(
            "{MINIMAL}limits:\n  store: \"rediss://:pw@redis.example.net:6380/1\"\n  store_timeout: 150ms\n  store_key_prefix: \"mx1:\"\n  store_connection_ttl: 10s\n"
        ))
        .unwrap();
    }

    #[test]
    fn unknown_key_is_refused_with_position() {
        let text =
            format!("{MINIMAL}tls:\n  certificate: a.pem\n  private_key: b.pem\n  requre: true\n");
        let errors = load(&text).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].starts_with("mxgate.yaml:10:3: tls.requre: unknown field `requre`"),
            "{errors:?}"
        );
    }

    #[test]
    fn header_and_authentication_bounds_are_checked() {
        let text = MINIMAL.replace(
            "  domains: [example.test]\n",
            "  domains: [example.test]\n  max_header_size: 100\n  long_lines: reject\n",
        ) + "auth:\n  timeouts:\n    end_of_data: 0s\n    spf: 0s\n";
        let errors = load(&text).unwrap_err();
        let expected = [
            "mxgate.yaml:5:20: must be at least 1024 bytes",
            "mxgate.yaml:11:18: must be greater than 0",
            "mxgate.yaml:12:10: must be greater than 0",
        ];
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        for (error, want) in errors.iter().zip(expected) {
            assert!(error.starts_with(want), "{want:?}: {errors:#?}");
        }
        // The counts that must be at least 1 are NonZero fields: refused while parsing,
        // all at once, each at its position.
        let text = MINIMAL.replace(
            "  domains: [example.test]\n",
            "  domains: [example.test]\n  max_header_fields: 0\n  max_errors: 0\n",
        ) + "auth:\n  max_dkim_signatures: 0\ndns:\n  attempts: 0\n  cache_entries: 0\nrelay:\n  max_connections: 0\n";
        let errors = load(&text).unwrap_err();
        let expected = [
            "mxgate.yaml:5:22: server.max_header_fields: must be at least 1, not `0`",
            "mxgate.yaml:6:15: server.max_errors: must be at least 1, not `0`",
            "mxgate.yaml:10:24: auth.max_dkim_signatures: must be at least 1, not `0`",
            "mxgate.yaml:12:13: dns.attempts: must be at least 1, not `0`",
            "mxgate.yaml:13:18: dns.cache_entries: must be at least 1, not `0`",
            "mxgate.yaml:15:20: relay.max_connections: must be at least 1, not `0`",
        ];
        assert_eq!(errors, expected, "{errors:#?}");
        let text = MINIMAL.replace(
            "  domains: [example.test]\n",
            "  domains: [example.test]\n  long_lines: sometimes\n",
        );
        let errors = load(&text).unwrap_err();
        assert!(
            errors[0].starts_with("mxgate.yaml:5:15: server.long_lines: unknown variant"),
            "{errors:?}"
        );
    }

    #[test]
    fn bad_values_name_their_position() {
        let text = MINIMAL.replace("maildir:./var/mail", "ftp://x:1");
        let errors = load(&text).unwrap_err();
        assert!(
            errors[0].starts_with("mxgate.yaml:6:5: backend[0]: unknown backend scheme"),
            "{errors:?}"
        );
    }

    #[test]
    fn proxy_protocol_needs_balancers_and_a_timeout() {
        let text = "server:\n  hostname: mx.example.test\n  listen: [\"127.0.0.1:2525\"]\n  domains: [example.test]\n  proxy_protocol:\n    trusted_networks: []\n    timeout: 0s\nbackend:\n  - maildir:./var/mail\n";
        let errors = load(text).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(errors[0].starts_with("mxgate.yaml:6:23: "), "{errors:#?}");
        assert!(errors[0].contains("at least one"), "{errors:#?}");
        assert!(errors[1].starts_with("mxgate.yaml:7:14: "), "{errors:#?}");
        let fine = text
            .replace("[]", "[\"10.0.0.0/8\"]")
            .replace("    timeout: 0s\n", "");
        let (loaded, _) = load_source(SourceFile {
            path: "mxgate.yaml".into(),
            text: fine,
        })
        .unwrap();
        let proxy = loaded.config.server.proxy_protocol.unwrap();
        assert_eq!(proxy.timeout, std::time::Duration::from_secs(5));
        assert!(proxy.is_trusted(&"10.1.2.3".parse().unwrap()));
        assert!(!proxy.is_trusted(&"192.0.2.1".parse().unwrap()));
    }
}
