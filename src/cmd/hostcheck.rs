//! `mxgate check`: are the host names policy rules trust (`client_host`) forward-
//! confirmed in live DNS? A rule matches a client only when the client's PTR record
//! names the host and that name's addresses lead back to the client, so a name
//! without addresses, or whose addresses' PTR records name something else, can never
//! match: the sender's mail would fail DMARC as if the rule were not there. These are
//! warnings, as third parties change their DNS. `*.suffix` patterns name no host to
//! look up and are not checked.

use crate::auth::Authenticator;
use crate::config::{Diagnostic, YamlPath};
use crate::policy::rules::{Condition, NamePattern};

/// How many of a name's addresses are checked for a PTR record leading back.
const MAX_ADDRESSES: usize = 8;

/// Warnings for `client_host` names that cannot be forward-confirmed.
pub async fn client_host_warnings(
    snapshot: &crate::snapshot::Snapshot,
    auth: &Authenticator,
) -> Vec<Diagnostic> {
    let mut warnings = Vec::new();
    for rule in &snapshot.policy.rules {
        for condition in &rule.conditions {
            let Condition::ClientHost(patterns) = condition else {
                continue;
            };
            for pattern in patterns {
                let NamePattern::Exact(name) = pattern else {
                    continue;
                };
                let Some(problem) = problem(auth, name).await else {
                    continue;
                };
                let problem = format!("{problem}; rule `{}` cannot match through it", rule.name);
                let at = YamlPath::root()
                    .key("rules")
                    .index(rule.index)
                    .key("match")
                    .key("client_host");
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

/// What keeps `name` from being forward-confirmed, if anything.
async fn problem(auth: &Authenticator, name: &str) -> Option<String> {
    let addresses = match auth.host_addresses(name).await {
        Ok(addresses) => addresses,
        Err(err) => {
            return Some(format!(
                "the addresses of {name} could not be looked up ({err})"
            ));
        }
    };
    if addresses.is_empty() {
        return Some(format!("{name} has no A or AAAA record"));
    }
    let mut named = Vec::new();
    for ip in addresses.iter().take(MAX_ADDRESSES) {
        let iprev = auth.iprev(*ip, &[]).await;
        if iprev.confirmed.iter().any(|c| c.eq_ignore_ascii_case(name)) {
            return None;
        }
        named.push(format!(
            "{ip} -> {}",
            if iprev.ptr.is_empty() {
                "no PTR".to_string()
            } else {
                iprev.ptr.join(", ")
            }
        ));
    }
    Some(format!(
        "{name} is not forward-confirmed: no address of it has a PTR record naming it ({})",
        named.join("; ")
    ))
}
