//! Checks of what is published in DNS for our configuration, run by `mxgate check`
//! (and logged at start): are the ARC sealing keys' public halves published and do they
//! match the private keys; do the SPF records the policy relies on resolve within RFC
//! 7208's 10-lookup limit? These are warnings: DNS may lag a deploy, and third parties
//! change their records.

use crate::auth::Authenticator;
use crate::config::{Diagnostic, LoadedConfig, YamlPath};
use crate::findings::AuthResult;
use crate::rewrite::arc::SigningKeyPair;
use mail_auth::AuthenticatedMessage;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;

/// Every configured ARC key, with where it is configured.
fn arc_keys(loaded: &LoadedConfig) -> Vec<(YamlPath, String, String, std::path::PathBuf)> {
    let Some(arc) = &loaded.config.arc else {
        return Vec::new();
    };
    let Some(domain) = &arc.domain else {
        return Vec::new();
    };
    let at = YamlPath::root().key("arc");
    let mut keys = Vec::new();
    if let (Some(selector), Some(path)) = (&arc.selector, &arc.private_key) {
        keys.push((
            at.key("private_key"),
            domain.to_string(),
            selector.clone(),
            loaded.resolve(path),
        ));
    }
    for (n, key) in arc.keys.iter().enumerate() {
        keys.push((
            at.key("keys").index(n).key("private_key"),
            domain.to_string(),
            key.selector.clone(),
            loaded.resolve(&key.private_key),
        ));
    }
    keys
}

/// Warnings for ARC keys that are not published, or published with another key.
pub async fn arc_key_warnings(loaded: &LoadedConfig, auth: &Authenticator) -> Vec<Diagnostic> {
    let mut warnings = Vec::new();
    for (at, domain, selector, path) in arc_keys(loaded) {
        if let Err(problem) = check_published(auth, &path, &domain, &selector).await {
            warnings.push(loaded.warning(&at, problem));
        }
    }
    warnings
}

/// Signs a probe message with the private key and verifies it against the DNS: a pass
/// proves the published record exists and belongs to this key.
async fn check_published(
    auth: &Authenticator,
    path: &std::path::Path,
    domain: &str,
    selector: &str,
) -> Result<(), String> {
    let probe = "From: probe@mxgate.invalid\r\nSubject: key check\r\n\r\nprobe\r\n";
    let name = format!("{selector}._domainkey.{domain}");
    let header = match SigningKeyPair::load(path)? {
        SigningKeyPair::Rsa(key) => DkimSigner::from_key(key)
            .domain(domain)
            .selector(selector)
            .headers(["From"])
            .sign(probe.as_bytes()),
        SigningKeyPair::Ed25519(key) => DkimSigner::from_key(key)
            .domain(domain)
            .selector(selector)
            .headers(["From"])
            .sign(probe.as_bytes()),
    }
    .map_err(|e| format!("cannot sign with {}: {e}", path.display()))?
    .to_header();
    let message = format!("{header}{probe}");
    let parsed =
        AuthenticatedMessage::parse(message.as_bytes()).ok_or("cannot build the probe message")?;
    let results = auth.verify_dkim(&parsed).await;
    let result = results.first().map_or(AuthResult::None, |r| r.result);
    let reason = results
        .first()
        .and_then(|r| r.reason.clone())
        .unwrap_or_default();
    match result {
        AuthResult::Pass => Ok(()),
        AuthResult::TempError => Err(format!(
            "could not look up {name} (DNS error: {reason}); cannot tell whether the key is published"
        )),
        AuthResult::PermError | AuthResult::None
            if reason.contains("not found") || reason.contains("record") =>
        {
            Err(format!(
                "no DKIM key is published at {name}; publish the record `mxgate keygen` printed"
            ))
        }
        _ => Err(format!(
            "the key published at {name} does not match {} ({reason})",
            path.display()
        )),
    }
}

/// Warnings for SPF records named in `spf_record` conditions that cannot authorise
/// anyone: missing, broken, or over the 10-lookup limit (RFC 7208 section 4.6.4).
pub async fn spf_record_warnings(
    snapshot: &crate::snapshot::Snapshot,
    auth: &Authenticator,
) -> Vec<Diagnostic> {
    let mut warnings = Vec::new();
    // Any address will do: what matters is whether evaluation gets to a result.
    let probe: std::net::IpAddr = std::net::Ipv4Addr::new(192, 0, 2, 1).into();
    for rule in &snapshot.policy.rules {
        for condition in &rule.conditions {
            let crate::policy::rules::Condition::SpfRecord(records) = condition else {
                continue;
            };
            for record in records {
                // The same evaluator as the policy's condition, with its reason.
                let outcome = auth
                    .spf_record_outcome(probe, record, "probe.invalid", "postmaster@probe.invalid")
                    .await;
                let reason = outcome
                    .error
                    .as_ref()
                    .map_or_else(String::new, |e| format!(" ({})", e.detail));
                let lookup_limit = outcome
                    .error
                    .as_ref()
                    .is_some_and(|e| e.kind == crate::auth::spf::SpfErrorKind::LookupLimit);
                let problem = match outcome.result {
                    AuthResult::PermError if lookup_limit => format!(
                        "the SPF record at {record} needs more than 10 DNS lookups (RFC 7208 4.6.4){reason}; rule `{}` cannot match through it",
                        rule.name
                    ),
                    AuthResult::PermError => format!(
                        "the SPF record at {record} is invalid{reason}; rule `{}` cannot match through it",
                        rule.name
                    ),
                    AuthResult::TempError => format!(
                        "the SPF record at {record} could not be looked up{reason}; rule `{}` depends on it",
                        rule.name
                    ),
                    AuthResult::None => format!(
                        "{record} publishes no SPF record; rule `{}` cannot match through it",
                        rule.name
                    ),
                    _ => continue,
                };
                let at = YamlPath::root()
                    .key("rules")
                    .index(rule.index)
                    .key("match")
                    .key("spf_record");
                match crate::config::SourceFile::read(&rule.file) {
                    Ok(source) => warnings.push(source.warning(&at, problem)),
                    Err(mut d) => {
                        d.severity = crate::config::Severity::Warning;
                        d.message = problem;
                        warnings.push(d);
                    }
                }
            }
        }
    }
    warnings
}
