//! `mxgate profile exchange-online|google`: what to configure on the mailbox side so it
//! keeps trusting mxgate's verdict, filled in from the configuration.

use crate::config::Config;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    ExchangeOnline,
    Google,
}

pub fn render(target: Target, config: &Config) -> String {
    let hostname = config.server.hostname.as_str();
    let sealer = config
        .arc
        .as_ref()
        .and_then(|a| a.domain.as_ref())
        .map(|d| d.to_string());
    let sealer_text = sealer
        .clone()
        .unwrap_or_else(|| "<arc.domain: not configured yet>".into());
    let domains = config
        .server
        .domains
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let selector = config
        .arc
        .as_ref()
        .and_then(|a| a.selector.clone())
        .unwrap_or_else(|| "<selector>".into());
    let key = config
        .arc
        .as_ref()
        .and_then(|a| a.private_key.as_ref())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| format!("certs/{selector}.pem"));
    let comments = config.auth.comments;
    let (quarantine_name, quarantine_value) =
        crate::rewrite::headers::parse_header_line(&config.dmarc.quarantine_header)
            .unwrap_or_else(|| ("X-Spam-Flag".into(), "YES".into()));
    let mut out = String::new();
    match target {
        Target::ExchangeOnline => {
            out.push_str(&format!(
                "# Exchange Online behind mxgate ({hostname}), for {domains}
#
# 1. Trust mxgate's ARC seals, so Exchange Online keeps the verdict mxgate made at the
#    edge after the message passed internal relays:
Set-ArcConfig -Identity Default -ArcTrustedSealers {sealer_text}
#    (Adds to nothing: include existing sealers, see `Get-ArcConfig`.)
#
# 2. An inbound connector that identifies mxgate by its TLS certificate
#    (relay.client_certificate; its subject or SAN must be {hostname}):
New-InboundConnector -Name \"mxgate\" -ConnectorType Partner -SenderDomains * `
  -RequireTls $true -RestrictDomainsToCertificate $true `
  -TlsSenderCertificateName {hostname}
#
# 3. Enhanced Filtering for Connectors: skip mxgate's address so Exchange Online
#    evaluates the original sender's IP (mxgate records it in Received):
Set-InboundConnector -Identity \"mxgate\" -EFSkipLastIP $true
#
# 4. Junk what mxgate quarantined (DMARC p=quarantine or a quarantine rule):
New-TransportRule -Name \"mxgate quarantine\" -HeaderMatchesMessageHeader \"{quarantine_name}\" `
  -HeaderMatchesPatterns \"^{quarantine_value}$\" -SetSCL 6
#
# mxgate side (mxgate.yaml):
#   relay:
#     tls: required
#     verify_certificate: true
#     client_certificate: /etc/mxgate/relay-cert.pem   # CN/SAN {hostname}
#     client_key: /etc/mxgate/relay-key.pem
#   auth:
#     comments: false   # Exchange Online refuses ARC results whose comments hold ';'
#   arc:
#     domain: {sealer_text}
#     selector: {selector}            # mxgate keygen --algorithm rsa ...
#     private_key: {key}
"
            ));
            if comments {
                out.push_str(
                    "#\n# WARNING: auth.comments is true in this configuration; set it to false.\n",
                );
            }
            if sealer.is_none() {
                out.push_str(
                    "#\n# WARNING: arc.domain is not configured: mxgate does not seal yet.\n",
                );
            }
        }
        Target::Google => {
            out.push_str(&format!(
                "Google Workspace behind mxgate ({hostname}), for {domains}

Admin console > Apps > Google Workspace > Gmail > Spam, Phishing and Malware >
Inbound gateway:
  - Gateway IPs: the public address(es) mxgate relays from.
  - Automatically detect external IP (recommended): on. Gmail then reads the
    original sender's address from mxgate's Received header and evaluates SPF
    and DMARC against it, not against mxgate.
  - Reject all mail not from gateway IPs: on, once the MX points at mxgate.
  - Require TLS for connections from the email gateways listed above: on
    (mxgate: relay.tls: required).
  - Message is considered spam if the following header regexp matches:
      ^{quarantine_name}: {quarantine_value}$
    so what mxgate quarantines lands in Spam.

ARC: mxgate seals every relayed message as {sealer_text} (arc.domain), so Gmail can
see the authentication results mxgate recorded at the edge in
ARC-Authentication-Results.

mxgate side (mxgate.yaml):
  relay:
    tls: required
    verify_certificate: true
  backend:
    - smtp://aspmx.l.google.com:25
"
            ));
        }
    }
    out
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
        );
        assert!(text.contains("#     selector: arc2026 "), "{text}");
        assert!(
            text.contains("Set-ArcConfig -Identity Default -ArcTrustedSealers seal.example.test"),
            "{text}"
        );
        assert!(
            text.contains("-TlsSenderCertificateName mx.example.test"),
            "{text}"
        );
        assert!(!text.contains("WARNING"), "{text}");
        let text = render(Target::ExchangeOnline, &config(""));
        assert!(text.contains("WARNING: auth.comments is true"), "{text}");
        assert!(
            text.contains("WARNING: arc.domain is not configured"),
            "{text}"
        );
    }

    #[test]
    fn google_profile_names_the_quarantine_header() {
        let text = render(
            Target::Google,
            &config("dmarc:\n  quarantine_header: \"X-Quarantine: 1\"\n"),
        );
        assert!(text.contains("^X-Quarantine: 1$"), "{text}");
    }
}
