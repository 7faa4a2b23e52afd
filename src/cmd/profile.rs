//! `mxgate profile exchange-server|exchange-online|google`: what to configure on the
//! mailbox side so it accepts mail from mxgate, judges the original sender rather than
//! mxgate, and keeps trusting mxgate's verdict; filled in from the configuration and
//! the addresses mxgate connects from (`--address`, else the specific addresses of
//! `server.listen`).
//!
//! Every cmdlet and parameter printed is one Microsoft documents (the test in
//! `tests/it/profile.rs` holds the list and where each name was checked).

use crate::config::{BackendSpec, Config};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// On-premises Exchange Server 2016, 2019 or Subscription Edition.
    ExchangeServer,
    /// Exchange Online (Microsoft 365).
    ExchangeOnline,
    /// Google Workspace.
    Google,
}

/// What every profile needs from the configuration.
struct Values {
    hostname: String,
    domains: String,
    /// The addresses mxgate connects to the mailbox side from, as written.
    addresses: Vec<String>,
    /// Where `addresses` came from, for the reader.
    addresses_from: &'static str,
    sealer: Option<String>,
    sealer_text: String,
    selector: String,
    key: String,
    comments: bool,
    guard: bool,
    quarantine_name: String,
    quarantine_value: String,
    client_certificate: Option<String>,
    /// The port of the first SMTP backend (what Exchange listens on for mxgate).
    backend_port: u16,
    backend_host: Option<String>,
}

impl Values {
    fn new(config: &Config, addresses: &[String]) -> Self {
        let arc = config.arc.as_ref();
        let sealer = arc.and_then(|a| a.domain.as_ref()).map(|d| d.to_string());
        let selector = arc
            .and_then(|a| a.selector.clone())
            .unwrap_or_else(|| "<selector>".into());
        let key = arc
            .and_then(|a| a.private_key.as_ref())
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| format!("certs/{selector}.pem"));
        let (quarantine_name, quarantine_value) =
            crate::rewrite::headers::parse_header_line(&config.dmarc.quarantine_header)
                .unwrap_or_else(|| ("X-Spam-Flag".into(), "YES".into()));
        let (addresses, addresses_from) = if !addresses.is_empty() {
            (addresses.to_vec(), "--address")
        } else {
            let listen: Vec<String> = config
                .server
                .listen
                .iter()
                .map(|a| a.ip())
                .filter(|ip| !ip.is_unspecified() && !ip.is_loopback())
                .map(|ip| ip.to_string())
                .collect();
            if listen.is_empty() {
                (
                    vec!["<mxgate's address>".to_string()],
                    "nowhere: pass --address",
                )
            } else {
                (listen, "server.listen")
            }
        };
        let smtp_backend = config.backend.iter().find_map(|b| match b {
            BackendSpec::Smtp { host, port } => Some((host.clone(), *port)),
            _ => None,
        });
        Values {
            hostname: config.server.hostname.to_string(),
            domains: config
                .server
                .domains
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            addresses,
            addresses_from,
            sealer_text: sealer
                .clone()
                .unwrap_or_else(|| "<arc.domain: not configured yet>".into()),
            sealer,
            selector,
            key,
            comments: config.auth.comments,
            guard: config.dmarc.protect_own_domains,
            quarantine_name,
            quarantine_value,
            client_certificate: config
                .relay
                .client_certificate
                .as_ref()
                .map(|p| p.display().to_string()),
            backend_port: smtp_backend.as_ref().map_or(25, |b| b.1),
            backend_host: smtp_backend.map(|b| b.0),
        }
    }

    /// The addresses as a PowerShell list: `"a","b"`.
    fn address_list(&self) -> String {
        self.addresses
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The `arc:` block of mxgate's configuration, as comment lines.
    fn arc_block(&self) -> String {
        format!(
            "#   arc:\n#     domain: {}\n#     selector: {}            # mxgate keygen --algorithm rsa ...\n#     private_key: {}\n",
            self.sealer_text, self.selector, self.key
        )
    }
}

/// `addresses`: what `--address` gave (IPs or ranges); empty: take them from the config.
pub fn render(target: Target, config: &Config, addresses: &[String]) -> String {
    let v = Values::new(config, addresses);
    match target {
        Target::ExchangeServer => exchange_server(&v),
        Target::ExchangeOnline => exchange_online(&v),
        Target::Google => google(&v),
    }
}

fn exchange_server(v: &Values) -> String {
    let Values {
        hostname,
        domains,
        addresses_from,
        sealer_text,
        quarantine_name,
        quarantine_value,
        backend_port,
        ..
    } = v;
    let list = v.address_list();
    let server = v
        .backend_host
        .clone()
        .unwrap_or_else(|| "<Mailbox server>".into());
    let mut out = format!(
        "# Exchange Server (2016, 2019, Subscription Edition) behind mxgate ({hostname}), for {domains}
# mxgate connects from: {addresses} (from {addresses_from})
#
# 1. A Receive connector for mxgate alone, on each Mailbox server mxgate delivers to.
#    AnonymousUsers: mxgate relays mail from the Internet, and Exchange must treat it as
#    such. ExchangeServers or ExternalAuthoritative would make it internal mail: a
#    forged From in your own domain would show as your colleague and skip Exchange's
#    anti-spam. TarpitInterval 00:00:00: mxgate passes each RCPT on to Exchange while
#    the sender waits, so Exchange's default 5-second tarpit (delayed replies to a
#    client that looks abusive, such as one trying unknown recipients) would hold
#    mxgate's backend connections (relay.max_connections) for every such sender.
New-ReceiveConnector -Name \"mxgate\" -Server \"{server}\" -TransportRole FrontendTransport -Custom `
  -Bindings \"0.0.0.0:{backend_port}\" -RemoteIPRanges {list} `
  -PermissionGroups AnonymousUsers -TarpitInterval 00:00:00
#
# 2. Let Exchange's own Sender ID and connection filtering (the anti-spam agents of an
#    Edge Transport server, or those installed on a Mailbox server as Microsoft's
#    \"Enable antispam functionality on Mailbox servers\" describes) look at the client
#    that connected to mxgate, which mxgate records in its Received header field,
#    rather than at mxgate:
Set-TransportConfig -InternalSMTPServers @{{Add={list}}}
#    (Get-TransportConfig shows the list; @{{Add=...}} keeps the entries already there.)
#
# 3. Junk what mxgate quarantined (DMARC p=quarantine, or a quarantine rule): SCL 6 is
#    above the organization's junk threshold unless you raised it (Get-OrganizationConfig
#    shows SCLJunkThreshold; mail with a higher SCL goes to the Junk Email folder):
New-TransportRule -Name \"mxgate quarantine\" -HeaderContainsMessageHeader \"{quarantine_name}\" `
  -HeaderContainsWords \"{quarantine_value}\" -SetSCL 6
#
# What Exchange Server does with mxgate's verdict:
#  - Authentication-Results and ARC: nothing. Exchange Server evaluates neither DMARC
#    nor ARC on inbound mail and does not act on mxgate's Authentication-Results or ARC
#    set; it keeps them in the message. mxgate's own decisions (refusals, the
#    quarantine header, the own-domain guard) are the protection.
#  - Mail From your own domain: Exchange Server does not evaluate DMARC, so nothing
#    behind mxgate stops a forged From in {domains}. mxgate's own-domain guard does
#    (dmarc.protect_own_domains: {guard}).
#  - Relays after Exchange (hybrid mail flow to Exchange Online, an archive, another
#    mxgate): Exchange re-sends the message from its own address, so SPF for the
#    original sender no longer holds, and a change to the message (a disclaimer
#    transport rule) breaks DKIM signatures. mxgate's ARC seal (d={sealer_text}) keeps
#    the edge's verdict for the next hop if that hop trusts it: Exchange Online with
#    Set-ArcConfig -ArcTrustedSealers {sealer_text} (see `mxgate profile exchange-online`),
#    another mxgate with arc.trusted_sealers: [{sealer_text}].
#
# mxgate side (mxgate.yaml):
#   backend:
#     - smtp://{server}:{backend_port}
#   relay:
#     tls: required            # Exchange offers STARTTLS with its own certificate
#     verify_certificate: false # true once Exchange has a certificate mxgate can verify
",
        addresses = v.addresses.join(", "),
        guard = v.guard,
    );
    out.push_str(&v.arc_block());
    warnings(v, &mut out, false);
    out
}

fn exchange_online(v: &Values) -> String {
    let Values {
        hostname,
        domains,
        addresses_from,
        sealer_text,
        quarantine_name,
        quarantine_value,
        ..
    } = v;
    let list = v.address_list();
    let connector = match &v.client_certificate {
        Some(certificate) => format!(
            "#    mxgate presents its certificate ({certificate}, relay.client_certificate;
#    its subject or SAN must be {hostname}), so the connector identifies mxgate by it:
New-InboundConnector -Name \"mxgate\" -ConnectorType Partner -SenderDomains * `
  -RequireTls $true -RestrictDomainsToCertificate $true `
  -TlsSenderCertificateName {hostname}
"
        ),
        None => format!(
            "#    relay.client_certificate is not set, so the connector identifies mxgate by its
#    addresses (IPv4 only, /24 to /32). A certificate is the better choice: set
#    relay.client_certificate and relay.client_key and run this profile again.
#    RestrictDomainsToIPAddresses rejects mail for SenderDomains (here: all) from any
#    other address: nobody gets around mxgate, but every other sender that delivers
#    straight to your tenant (another gateway, a service) must go through mxgate first;
#    leave it $false until they do.
New-InboundConnector -Name \"mxgate\" -ConnectorType Partner -SenderDomains * `
  -RequireTls $true -SenderIPAddresses {list} -RestrictDomainsToIPAddresses $true
"
        ),
    };
    let mut out = format!(
        "# Exchange Online (Microsoft 365) behind mxgate ({hostname}), for {domains}
# mxgate connects from: {addresses} (from {addresses_from})
#
# 1. An inbound connector for mail from mxgate.
{connector}#
# 2. Enhanced Filtering for Connectors: skip mxgate's addresses, so Exchange Online
#    evaluates SPF, DMARC and the IP reputation of the client that connected to mxgate
#    (from mxgate's Received header field), not mxgate's:
Set-InboundConnector -Identity \"mxgate\" -EFSkipLastIP $false -EFSkipIPs {list}
#    (-EFSkipLastIP $true skips the last hop alone: the same thing while mxgate is the
#    only hop.) Do not put mxgate's addresses in the connection filter's IP Allow list
#    (Set-HostedConnectionFilterPolicy -IPAllowList): that skips spam filtering instead.
#
# 3. Trust mxgate's ARC seals (d={sealer_text}, selector {selector}), so Exchange Online keeps
#    the verdict mxgate made at the edge (a Netvisor invoice or a Netigate survey that
#    fails DMARC and that mxgate let in on evidence) after internal relays:
Set-ArcConfig -Identity Default -ArcTrustedSealers {sealer_text}
#    This replaces the list: include the sealers Get-ArcConfig shows.
#    Exchange Online refuses ARC results whose comments hold ';': mxgate must run with
#    auth.comments: false (this configuration: {comments}).
#
# 4. Junk what mxgate quarantined (DMARC p=quarantine, or a quarantine rule); SCL 6
#    asks Exchange Online for a spam verdict:
New-TransportRule -Name \"mxgate quarantine\" -HeaderContainsMessageHeader \"{quarantine_name}\" `
  -HeaderContainsWords \"{quarantine_value}\" -SetSCL 6
#
# 5. Reject Direct Send, so nobody sends as {domains} straight to your tenant, around mxgate:
Set-OrganizationConfig -RejectDirectSend $true
#    Exchange Online then rejects anonymous mail whose MAIL FROM domain is one of your
#    accepted domains unless it matches an inbound connector by IP or certificate. Mail
#    from mxgate matches the connector of step 1, so it is not affected: not even mail
#    mxgate let in From your own domain on evidence (a Netigate survey sent as your
#    staff). RejectDirectSend checks the envelope only; the header From is what mxgate's
#    own-domain guard checks (dmarc.protect_own_domains: {guard}).
#
# mxgate side (mxgate.yaml):
#   relay:
#     tls: required
#     verify_certificate: true
#     client_certificate: /etc/mxgate/relay-cert.pem   # CN/SAN {hostname}
#     client_key: /etc/mxgate/relay-key.pem
#   auth:
#     comments: false   # Exchange Online refuses ARC results whose comments hold ';'
",
        addresses = v.addresses.join(", "),
        selector = v.selector,
        comments = v.comments,
        guard = v.guard,
    );
    out.push_str(&v.arc_block());
    warnings(v, &mut out, true);
    out
}

/// Warnings about the configuration, at the end of a profile.
fn warnings(v: &Values, out: &mut String, online: bool) {
    if online && v.comments {
        out.push_str(
            "#\n# WARNING: auth.comments is true in this configuration; set it to false.\n",
        );
    }
    if v.sealer.is_none() {
        out.push_str("#\n# WARNING: arc.domain is not configured: mxgate does not seal yet.\n");
    }
    if online && v.client_certificate.is_none() && v.addresses.iter().any(|a| a.contains(':')) {
        out.push_str("#\n# WARNING: -SenderIPAddresses takes IPv4 addresses only: identify mxgate by certificate (relay.client_certificate) to relay over IPv6.\n");
    }
    if v.addresses_from.starts_with("nowhere") {
        out.push_str("#\n# WARNING: no address to list: pass --address with each address mxgate connects from.\n");
    }
    if !v.guard {
        out.push_str("#\n# WARNING: dmarc.protect_own_domains is false: mail forged From your own domains is delivered when their DMARC policy is p=none.\n");
    }
}

fn google(v: &Values) -> String {
    let Values {
        hostname,
        domains,
        sealer_text,
        quarantine_name,
        quarantine_value,
        ..
    } = v;
    format!(
        "Google Workspace behind mxgate ({hostname}), for {domains}

Admin console > Apps > Google Workspace > Gmail > Spam, Phishing and Malware >
Inbound gateway:
  - Gateway IPs: the public address(es) mxgate relays from ({addresses}).
  - Automatically detect external IP (recommended): on. Gmail then reads the
    original sender's address from mxgate's Received header and evaluates SPF
    and DMARC against it, not against mxgate.
  - Reject all mail not from gateway IPs: on, once the MX points at mxgate.
  - Require TLS for connections from the email gateways listed above: on
    (mxgate: relay.tls: required).
  - Message is considered spam if the following header regexp matches:
      ^{quarantine_name}: {quarantine_value}$
    so what mxgate quarantines lands in Spam.

ARC: mxgate seals every relayed message as {sealer_text} (arc.domain, selector
{selector}), so Gmail can see the authentication results mxgate recorded at the
edge in ARC-Authentication-Results.

mxgate side (mxgate.yaml):
  relay:
    tls: required
    verify_certificate: true
  backend:
    - smtp://aspmx.l.google.com:25
",
        addresses = v.addresses.join(", "),
        selector = v.selector,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SourceFile, load_source};

    fn config(extra: &str) -> Config {
        let text = format!(
            "server:\n  hostname: mx.example.test\n  listen: [\"127.0.0.1:25\"]\n  domains: [example.test]\nbackend: [\"maildir:/tmp/x\"]\n{extra}"
        );
        load_source(SourceFile {
            path: "t.yaml".into(),
            text,
        })
        .unwrap()
        .0
        .config
    }

    #[test]
    fn exchange_profile_uses_the_sealer_domain() {
        let text = render(
            Target::ExchangeOnline,
            &config(
                "arc:\n  domain: seal.example.test\n  selector: arc2026\n  seal: false\nauth:\n  comments: false\n",
            ),
            &["192.0.2.25".into()],
        );
        assert!(text.contains("#     selector: arc2026 "), "{text}");
        assert!(
            text.contains("Set-ArcConfig -Identity Default -ArcTrustedSealers seal.example.test"),
            "{text}"
        );
        assert!(
            text.contains("-SenderIPAddresses \"192.0.2.25\" -RestrictDomainsToIPAddresses $true"),
            "no client certificate: the connector goes by address: {text}"
        );
        assert!(!text.contains("WARNING"), "{text}");
        let text = render(Target::ExchangeOnline, &config(""), &[]);
        assert!(text.contains("WARNING: auth.comments is true"), "{text}");
        assert!(
            text.contains("WARNING: arc.domain is not configured"),
            "{text}"
        );
        assert!(text.contains("WARNING: no address to list"), "{text}");
    }

    #[test]
    fn google_profile_names_the_quarantine_header() {
        let text = render(
            Target::Google,
            &config("dmarc:\n  quarantine_header: \"X-Quarantine: 1\"\n"),
            &[],
        );
        assert!(text.contains("^X-Quarantine: 1$"), "{text}");
    }
}
