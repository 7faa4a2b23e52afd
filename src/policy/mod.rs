//! The sender policy: YAML rules that let legitimate senders through a DMARC failure
//! only on evidence (a DKIM domain, an IP, a forward-confirmed host, an SPF record),
//! refuse others, and set per-sender TLS requirements.
//!
//! Pure: compiling files into rules and evaluating rules against facts. The pipeline
//! gathers the facts (some need DNS) and applies decisions.

pub mod compile;
pub mod metrics;
pub mod model;
pub mod rules;

pub use rules::{Facts, Rule, RuleAction, RuleMatch, Stage, Truth, evaluate};
use std::path::PathBuf;

#[derive(Debug, Default)]
pub struct Policy {
    pub rules: Vec<Rule>,
    pub files: Vec<PathBuf>,
    /// Every SPF record name a rule refers to (evaluated for the client IP).
    pub spf_records: Vec<String>,
    /// Whether any rule needs the forward-confirmed host names or the iprev result:
    /// both come from the iprev check started at connect, awaited at MAIL.
    pub needs_hosts: bool,
    /// Whether any rule needs the MAIL FROM SPF result before the end of data.
    pub needs_spf: bool,
    /// The exact host names of `client_host` conditions of accept and quarantine rules:
    /// when the client's PTR look-up fails, iprev looks them up to tell which the client
    /// may still be.
    pub trusted_hosts: Vec<String>,
}

impl Policy {
    pub fn new(rules: Vec<Rule>, files: Vec<PathBuf>) -> Self {
        let mut spf_records = Vec::new();
        let mut trusted_hosts = Vec::new();
        for rule in &rules {
            for condition in &rule.conditions {
                match condition {
                    rules::Condition::SpfRecord(records) => {
                        for record in records {
                            if !spf_records.contains(record) {
                                spf_records.push(record.clone());
                            }
                        }
                    }
                    // Only a rule that could spare a refusal is weighed when DNS
                    // trouble leaves it undecided (see `RuleAction::could_spare`).
                    rules::Condition::ClientHost(names)
                        if rule.action.could_spare() && !rule.shadow =>
                    {
                        for name in names {
                            if let rules::NamePattern::Exact(name) = name
                                && !trusted_hosts.contains(name)
                            {
                                trusted_hosts.push(name.clone());
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Policy {
            needs_hosts: rules
                .iter()
                .any(|r| r.uses("client_host") || r.uses("iprev")),
            needs_spf: rules.iter().any(|r| r.uses("spf")),
            spf_records,
            trusted_hosts,
            rules,
            files,
        }
    }

    /// The rules that decide what happens to a message.
    pub fn disposition_rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().filter(|r| !r.action.is_tls_rule())
    }

    /// The rules that decide whether TLS is required.
    pub fn tls_rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().filter(|r| r.action.is_tls_rule())
    }

    /// What changed from `old` to `self`, for the reload log line.
    pub fn describe_changes(&self, old: &Policy) -> String {
        let find = |policy: &Policy, name: &str| {
            policy
                .rules
                .iter()
                .find(|r| r.name.as_ref() == name)
                .map(|r| r.fingerprint.clone())
        };
        let mut added = Vec::new();
        let mut changed = Vec::new();
        for rule in &self.rules {
            match find(old, &rule.name) {
                None => added.push(rule.name.to_string()),
                Some(fingerprint) if fingerprint != rule.fingerprint => {
                    changed.push(rule.name.to_string())
                }
                Some(_) => {}
            }
        }
        let removed: Vec<String> = old
            .rules
            .iter()
            .filter(|r| find(self, &r.name).is_none())
            .map(|r| r.name.to_string())
            .collect();
        let order_changed = added.is_empty()
            && removed.is_empty()
            && self
                .rules
                .iter()
                .map(|r| &r.name)
                .ne(old.rules.iter().map(|r| &r.name));
        let mut parts = Vec::new();
        for (label, names) in [("added", added), ("removed", removed), ("changed", changed)] {
            if !names.is_empty() {
                parts.push(format!("rules {label}: {}", names.join(", ")));
            }
        }
        if order_changed {
            parts.push("rule order changed".into());
        }
        if parts.is_empty() {
            "rules unchanged".into()
        } else {
            parts.join("; ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rules: &[(&str, &str)]) -> Policy {
        let rules = rules
            .iter()
            .enumerate()
            .map(|(index, (name, fingerprint))| Rule {
                name: (*name).into(),
                origin: String::new(),
                file: PathBuf::new(),
                index,
                conditions: Vec::new(),
                action: RuleAction::Accept,
                shadow: false,
                fingerprint: (*fingerprint).into(),
            })
            .collect();
        Policy::new(rules, Vec::new())
    }

    #[test]
    fn reload_log_says_what_changed() {
        let old = policy(&[("a", "1"), ("b", "1"), ("c", "1")]);
        assert_eq!(old.describe_changes(&old), "rules unchanged");
        let new = policy(&[("a", "1"), ("c", "2"), ("d", "1")]);
        assert_eq!(
            new.describe_changes(&old),
            "rules added: d; rules removed: b; rules changed: c"
        );
        let reordered = policy(&[("c", "1"), ("a", "1"), ("b", "1")]);
        assert_eq!(reordered.describe_changes(&old), "rule order changed");
    }
}
