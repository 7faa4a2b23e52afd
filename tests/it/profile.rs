//! `mxgate profile`: each profile prints the configured addresses, ARC selector and
//! sealer, and every cmdlet and parameter it prints is one Microsoft documents.

use std::collections::{BTreeMap, BTreeSet};

/// Cmdlets and the parameters of theirs the profiles may print, each verified in
/// Microsoft's reference: the MicrosoftDocs/office-docs-powershell repository (the
/// source of learn.microsoft.com/powershell/module/exchange/<cmdlet>), commit
/// 93336da2bca96c31c0fc8acc52658a30ef8a6c94, file
/// exchange/exchange-ps/ExchangePowerShell/<Cmdlet>.md, section `### -<Parameter>`.
fn verified() -> BTreeMap<&'static str, Vec<&'static str>> {
    BTreeMap::from([
        // New-ReceiveConnector.md: -Name, -Server, -TransportRole (FrontendTransport),
        // -Custom (switch; needs -Bindings and -RemoteIPRanges), -Bindings,
        // -RemoteIPRanges, -PermissionGroups (AnonymousUsers), -TarpitInterval
        // ("00:00:00 disables the tarpit interval"; default 00:00:05).
        (
            "New-ReceiveConnector",
            vec![
                "Name",
                "Server",
                "TransportRole",
                "Custom",
                "Bindings",
                "RemoteIPRanges",
                "PermissionGroups",
                "TarpitInterval",
            ],
        ),
        // Set-TransportConfig.md: -InternalSMTPServers (on-premises only; "ignored by
        // Sender ID and connection filtering"; @{Add=...} syntax).
        ("Set-TransportConfig", vec!["InternalSMTPServers"]),
        ("Get-TransportConfig", vec![]),
        // New-TransportRule.md: -Name, -HeaderContainsMessageHeader,
        // -HeaderContainsWords, -SetSCL (on-premises and Exchange Online).
        (
            "New-TransportRule",
            vec![
                "Name",
                "HeaderContainsMessageHeader",
                "HeaderContainsWords",
                "SetSCL",
            ],
        ),
        // New-InboundConnector.md: -Name, -ConnectorType (Partner), -SenderDomains,
        // -RequireTls, -RestrictDomainsToCertificate, -TlsSenderCertificateName,
        // -SenderIPAddresses (IPv4, /24 to /32), -RestrictDomainsToIPAddresses.
        (
            "New-InboundConnector",
            vec![
                "Name",
                "ConnectorType",
                "SenderDomains",
                "RequireTls",
                "RestrictDomainsToCertificate",
                "TlsSenderCertificateName",
                "SenderIPAddresses",
                "RestrictDomainsToIPAddresses",
            ],
        ),
        // Set-InboundConnector.md: -Identity, -EFSkipLastIP, -EFSkipIPs (Enhanced
        // Filtering for Connectors).
        (
            "Set-InboundConnector",
            vec!["Identity", "EFSkipLastIP", "EFSkipIPs"],
        ),
        // Set-ArcConfig.md: -Identity (Example 1: `-Identity Default`),
        // -ArcTrustedSealers (replaces the list). Get-ArcConfig.md exists.
        ("Set-ArcConfig", vec!["Identity", "ArcTrustedSealers"]),
        ("Get-ArcConfig", vec![]),
        // Set-OrganizationConfig.md: -RejectDirectSend (Exchange Online; checks the
        // MAIL FROM domain of anonymous mail that matches no connector by IP or
        // certificate), SCLJunkThreshold (on-premises; named in prose only).
        ("Set-OrganizationConfig", vec!["RejectDirectSend"]),
        ("Get-OrganizationConfig", vec![]),
        // Set-HostedConnectionFilterPolicy.md: -IPAllowList (named as what not to do).
        ("Set-HostedConnectionFilterPolicy", vec!["IPAllowList"]),
    ])
}

fn profile(dir: &std::path::Path, target: &str, extra: &str, args: &[&str]) -> String {
    let config = dir.join(format!("{target}.yaml"));
    std::fs::write(
        &config,
        format!(
            "server:\n  hostname: mx.example.com\n  listen: [\"192.0.2.25:25\", \"0.0.0.0:2525\"]\n  domains: [example.com]\nbackend: [\"smtp://exch01.corp.example.com:2525\"]\narc:\n  domain: seal.example.com\n  selector: arc2026\n  seal: false\n{extra}"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mxgate"))
        .args(["profile", target, "--config"])
        .arg(&config)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn is_cmdlet(token: &str) -> bool {
    let Some((verb, noun)) = token.split_once('-') else {
        return false;
    };
    [
        "Get", "Set", "New", "Remove", "Enable", "Disable", "Install",
    ]
    .contains(&verb)
        && noun.starts_with(|c: char| c.is_ascii_uppercase())
        && noun.chars().all(|c| c.is_ascii_alphanumeric())
}

fn tokens(line: &str) -> impl Iterator<Item = &str> {
    line.split(|c: char| c.is_whitespace() || "()[]{},;:'\"`@=".contains(c))
        .map(|t| t.trim_end_matches('.'))
        .filter(|t| !t.is_empty())
}

fn parameter(token: &str) -> Option<&str> {
    token
        .strip_prefix('-')
        .filter(|p| p.starts_with(|c: char| c.is_ascii_uppercase()))
}

/// Every cmdlet and parameter in `text` is in `verified()`; a command's parameters are
/// its own cmdlet's. Returns the cmdlets run as commands.
fn check_names(text: &str) -> BTreeSet<String> {
    let verified = verified();
    let all_parameters: BTreeSet<&str> = verified.values().flatten().copied().collect();
    // Commands: lines not starting with '#', joined across PowerShell's ` continuation.
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            // Prose: cmdlet names must exist, parameters must be documented ones.
            for token in tokens(line) {
                if is_cmdlet(token) {
                    assert!(
                        verified.contains_key(token),
                        "unverified cmdlet {token} in: {line}"
                    );
                }
                if let Some(p) = parameter(token) {
                    assert!(
                        all_parameters.contains(p),
                        "unverified parameter -{p} in: {line}"
                    );
                }
            }
            continue;
        }
        current.push_str(line.trim_end_matches('`'));
        current.push(' ');
        if !line.ends_with('`') {
            commands.push(std::mem::take(&mut current));
        }
    }
    let mut run = BTreeSet::new();
    for command in commands {
        let mut words = tokens(&command);
        let cmdlet = words.next().unwrap();
        let Some(parameters) = verified.get(cmdlet) else {
            panic!("unverified cmdlet {cmdlet} in: {command}");
        };
        for word in words {
            assert!(!is_cmdlet(word), "a second cmdlet in: {command}");
            if let Some(p) = parameter(word) {
                assert!(
                    parameters.contains(&p),
                    "-{p} is not a verified parameter of {cmdlet}: {command}"
                );
            }
        }
        run.insert(cmdlet.to_string());
    }
    run
}

#[test]
fn the_checker_catches_made_up_names() {
    let caught = |text: &'static str| std::panic::catch_unwind(|| check_names(text)).is_err();
    assert!(caught(
        "Set-ArcConfig -Identity Default -ArcTrustedSealer x\n"
    ));
    assert!(caught(
        "Set-InboundConnector -Identity x `\n  -EFSkipIP 192.0.2.1\n"
    ));
    assert!(caught(
        "New-ReceiveConnector -Name x -RejectDirectSend $true\n"
    ));
    assert!(caught("# see Get-ArcConfiguration\n"));
    assert!(caught("Set-RejectDirectSend -Enabled $true\n"));
    assert!(!caught(
        "Set-ArcConfig -Identity Default -ArcTrustedSealers x\n"
    ));
}

#[test]
fn exchange_server_profile() {
    let dir = tempfile::tempdir().unwrap();
    let text = profile(dir.path(), "exchange-server", "", &[]);
    let run = check_names(&text);
    for cmdlet in [
        "New-ReceiveConnector",
        "Set-TransportConfig",
        "New-TransportRule",
    ] {
        assert!(run.contains(cmdlet), "{cmdlet} missing:\n{text}");
    }
    // The configured address (server.listen's specific one, not 0.0.0.0), the
    // backend's port, the sealer and selector.
    assert!(text.contains("-RemoteIPRanges \"192.0.2.25\" `"), "{text}");
    assert!(
        text.contains("-InternalSMTPServers @{Add=\"192.0.2.25\"}"),
        "{text}"
    );
    assert!(text.contains("-Bindings \"0.0.0.0:2525\""), "{text}");
    assert!(
        text.contains("-Server \"exch01.corp.example.com\""),
        "{text}"
    );
    assert!(
        text.contains("-PermissionGroups AnonymousUsers -TarpitInterval 00:00:00"),
        "{text}"
    );
    assert!(
        text.contains("-HeaderContainsMessageHeader \"X-Spam-Flag\""),
        "{text}"
    );
    assert!(
        text.contains("-HeaderContainsWords \"YES\" -SetSCL 6"),
        "{text}"
    );
    assert!(text.contains("#     selector: arc2026 "), "{text}");
    assert!(text.contains("ARC seal (d=seal.example.com)"), "{text}");
    assert!(
        text.contains("Authentication-Results and ARC: nothing."),
        "says what Exchange Server does with them: {text}"
    );
    assert!(!text.contains("WARNING"), "{text}");
    // --address replaces the addresses from the configuration.
    let text = profile(
        dir.path(),
        "exchange-server",
        "",
        &["--address", "203.0.113.7", "--address", "198.51.100.0/28"],
    );
    assert!(
        text.contains("-RemoteIPRanges \"203.0.113.7\",\"198.51.100.0/28\""),
        "{text}"
    );
    assert!(!text.contains("192.0.2.25"), "{text}");
}

#[test]
fn exchange_online_profile() {
    let dir = tempfile::tempdir().unwrap();
    // Identified by certificate.
    let text = profile(
        dir.path(),
        "exchange-online",
        "relay:\n  client_certificate: relay-cert.pem\n  client_key: relay-key.pem\nauth:\n  comments: false\n",
        &[],
    );
    let run = check_names(&text);
    for cmdlet in [
        "New-InboundConnector",
        "Set-InboundConnector",
        "Set-ArcConfig",
        "New-TransportRule",
        "Set-OrganizationConfig",
    ] {
        assert!(run.contains(cmdlet), "{cmdlet} missing:\n{text}");
    }
    assert!(
        text.contains(
            "-RestrictDomainsToCertificate $true `\n  -TlsSenderCertificateName mx.example.com"
        ),
        "{text}"
    );
    assert!(!text.contains("-SenderIPAddresses"), "{text}");
    assert!(
        text.contains("Set-InboundConnector -Identity \"mxgate\" -EFSkipLastIP $false -EFSkipIPs \"192.0.2.25\""),
        "{text}"
    );
    assert!(
        text.contains("Set-ArcConfig -Identity Default -ArcTrustedSealers seal.example.com"),
        "{text}"
    );
    assert!(text.contains("selector arc2026"), "{text}");
    assert!(
        text.contains("Set-OrganizationConfig -RejectDirectSend $true"),
        "{text}"
    );
    assert!(
        text.contains("auth.comments: false (this configuration: false)"),
        "{text}"
    );
    assert!(!text.contains("WARNING"), "{text}");
    // Identified by address; comments on and no addresses: warnings say so.
    let text = profile(
        dir.path(),
        "exchange-online",
        "",
        &["--address", "203.0.113.7"],
    );
    check_names(&text);
    assert!(
        text.contains("-SenderIPAddresses \"203.0.113.7\" -RestrictDomainsToIPAddresses $true"),
        "{text}"
    );
    assert!(text.contains("-EFSkipIPs \"203.0.113.7\""), "{text}");
    assert!(text.contains("WARNING: auth.comments is true"), "{text}");
}

#[test]
fn google_profile_names_the_addresses_and_sealer() {
    let dir = tempfile::tempdir().unwrap();
    let text = profile(dir.path(), "google", "", &[]);
    assert!(text.contains("relays from (192.0.2.25)"), "{text}");
    assert!(
        text.contains("seals every relayed message as seal.example.com"),
        "{text}"
    );
    assert!(text.contains("selector\narc2026"), "{text}");
}
