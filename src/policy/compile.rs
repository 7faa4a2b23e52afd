//! Policy files -> compiled rules, with every problem reported at once: file, line,
//! column and the rule it is in.

use super::Policy;
use super::model::{RawAction, RawFile, RawMatch, RawMode, RawReply, RawRule};
use super::rules::{AddressPattern, Condition, NamePattern, Rule, RuleAction};
use crate::config::{Diagnostic, DomainName, LoadedConfig, Network, SourceFile, YamlPath};
use crate::findings::AuthResult;
use crate::smtp::reply::{Reply, Status};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Loads every file matched by `policy.files`. Returns the policy and all diagnostics;
/// the policy is only usable when no diagnostic is an error.
pub fn load(loaded: &LoadedConfig) -> (Policy, Vec<Diagnostic>) {
    let mut diagnostics = Vec::new();
    let files = expand(loaded, &mut diagnostics);
    let mut rules: Vec<Rule> = Vec::new();
    let mut names: HashMap<String, String> = HashMap::new();
    for path in &files {
        let source = match SourceFile::read(path) {
            Ok(source) => source,
            Err(d) => {
                diagnostics.push(d);
                continue;
            }
        };
        let tree = match source.parse_tree() {
            Ok(tree) => tree,
            Err(d) => {
                diagnostics.push(d);
                continue;
            }
        };
        let file: RawFile = match source.deserialize(&YamlPath::root(), tree) {
            Ok(file) => file,
            Err(d) => {
                diagnostics.push(d);
                continue;
            }
        };
        for (n, value) in file.rules.into_iter().enumerate() {
            let at = YamlPath::root().key("rules").index(n);
            let label = value
                .get("name")
                .and_then(|v| v.as_str())
                .map(|name| format!("rule `{name}`"))
                .unwrap_or_else(|| format!("rule #{}", n + 1));
            let fingerprint = serde_yaml_ng::to_string(&value).unwrap_or_default();
            // A rule's name is taken even if the rule has errors, so a second rule of
            // the same name is reported too.
            let position = source.diagnostic(&at, crate::config::Severity::Error, "");
            let origin = format!("{}:{}", source.path.display(), position.line);
            if let Some(name) = value.get("name").and_then(|v| v.as_str()).map(str::trim) {
                if let Some(first) = names.get(name) {
                    diagnostics.push(source.error(
                        &at.key("name"),
                        format!("rule `{name}`: the name is already used at {first}; rule names must be unique"),
                    ));
                    continue;
                }
                names.insert(name.to_string(), origin.clone());
            }
            // Every error in the rule's shape is reported (an unknown key, a value of
            // the wrong kind); what is left of the rule is still checked value by value.
            let (raw, errors) = source.deserialize_all::<RawRule>(&at, value);
            let incomplete = !errors.is_empty();
            for mut d in errors {
                d.message = format!("{label}: {}", d.message);
                diagnostics.push(d);
            }
            let Some(raw) = raw else { continue };
            let mut compiler = RuleCompiler {
                source: &source,
                at: at.clone(),
                label,
                diagnostics: &mut diagnostics,
                failed: incomplete,
                incomplete,
            };
            let rule = compiler.compile(raw, fingerprint, n);
            let Some(rule) = rule else { continue };
            rules.push(Rule { origin, ..rule });
        }
    }
    (Policy::new(rules, files), diagnostics)
}

/// The files `policy.files` names, in a stable order.
fn expand(loaded: &LoadedConfig, diagnostics: &mut Vec<Diagnostic>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for (n, pattern) in loaded.config.policy.files.iter().enumerate() {
        let at = YamlPath::root().key("policy").key("files").index(n);
        let full = loaded.resolve(std::path::Path::new(pattern));
        let text = full.to_string_lossy().into_owned();
        match glob::glob(&text) {
            Err(err) => diagnostics.push(loaded.error(&at, format!("invalid pattern: {err}"))),
            Ok(paths) => {
                let mut matched: Vec<PathBuf> = paths
                    .filter_map(Result::ok)
                    .filter(|p| p.is_file())
                    .collect();
                matched.sort();
                if matched.is_empty() {
                    diagnostics.push(loaded.warning(&at, format!("`{pattern}` matches no file")));
                }
                for path in matched {
                    if !files.contains(&path) {
                        files.push(path);
                    }
                }
            }
        }
    }
    files
}

/// Expands the globs again (for the reloader, which must notice new files).
pub fn policy_files(loaded: &LoadedConfig) -> Vec<PathBuf> {
    expand(loaded, &mut Vec::new())
}

struct RuleCompiler<'a> {
    source: &'a SourceFile,
    at: YamlPath,
    label: String,
    diagnostics: &'a mut Vec<Diagnostic>,
    failed: bool,
    /// Parts of the rule had errors and were left out: only its conditions are
    /// checked, value by value, not the action or the rule as a whole (what was left
    /// out would be reported as missing: an empty `match`, a `tag` without header, an
    /// `accept` without evidence).
    incomplete: bool,
}

impl RuleCompiler<'_> {
    fn error(&mut self, path: YamlPath, message: impl std::fmt::Display) {
        self.failed = true;
        let d = self
            .source
            .error(&path, format!("{}: {message}", self.label));
        self.diagnostics.push(d);
    }

    fn compile(&mut self, raw: RawRule, fingerprint: String, index: usize) -> Option<Rule> {
        if raw.name.trim().is_empty() {
            self.error(self.at.key("name"), "the name must not be empty");
        }
        let conditions = self.conditions(raw.conditions);
        if conditions.is_empty() && !self.failed {
            self.error(self.at.key("match"), "`match` needs at least one condition");
        }
        if self.incomplete {
            return None;
        }
        let action = self.action(&raw.action, raw.reply, raw.header, raw.quarantine_to);
        if let Some(action) = &action {
            self.check_action_conditions(action, &conditions, raw.unauthenticated);
        }
        if self.failed {
            return None;
        }
        Some(Rule {
            name: Arc::from(raw.name.trim()),
            origin: String::new(),
            file: self.source.path.clone(),
            index,
            conditions,
            action: action?,
            shadow: raw.mode == RawMode::Shadow,
            fingerprint,
        })
    }

    fn check_action_conditions(
        &mut self,
        action: &RuleAction,
        conditions: &[Condition],
        unauthenticated: bool,
    ) {
        if action.is_tls_rule() {
            for condition in conditions {
                if !matches!(
                    condition,
                    Condition::ClientIp(_)
                        | Condition::ClientHost(_)
                        | Condition::Helo(_)
                        | Condition::SpfRecord(_)
                        | Condition::EnvelopeFrom(_)
                ) {
                    self.error(
                        self.at.key("match").key(condition.key()),
                        format!(
                            "`{}` cannot be used in a {} rule: TLS is decided at MAIL, before `{}` is known (use client_ip, client_host, helo, spf_record or envelope_from)",
                            condition.key(),
                            action.name(),
                            condition.key()
                        ),
                    );
                }
            }
        }
        let claims_sender = conditions.iter().any(|c| {
            matches!(
                c,
                Condition::EnvelopeFrom(_)
                    | Condition::HeaderFrom(_)
                    | Condition::Helo(_)
                    | Condition::OwnDomain(_)
            )
        });
        let mut too_broad = false;
        if *action == RuleAction::Accept && !unauthenticated {
            for condition in conditions {
                let key = self.at.key("match").key(condition.key());
                // As for every list: a single value is reported at the key.
                let single = match condition {
                    Condition::ClientIp(networks) => networks.len() == 1,
                    Condition::ClientHost(names) | Condition::DkimDomain(names) => names.len() == 1,
                    _ => true,
                };
                for (n, pattern) in super::rules::too_broad_to_authenticate(condition) {
                    too_broad = true;
                    let at = if single { key.clone() } else { key.index(n) };
                    self.error(
                        at,
                        format!(
                            "`{pattern}` cannot authenticate a sender: anyone can register a name under a top-level domain, or get an address in a network wider than a /8 (IPv4) or /16 (IPv6); name the sender's own domains or networks, or set `unauthenticated: true` to accept that risk"
                        ),
                    );
                }
            }
        }
        if *action == RuleAction::Accept
            && claims_sender
            && !too_broad
            && !unauthenticated
            && !Condition::authenticate_sender(conditions)
        {
            self.error(
                self.at.key("match"),
                "an `accept` rule that matches only on addresses or names anyone can forge would let anyone spoof this sender; add evidence (dkim_domain, client_ip, client_host, spf_record, dmarc: pass together with header_from or own_domain, or spf: pass together with an envelope_from that names the sender's own domains; own_domain is not evidence), or set `unauthenticated: true` to accept that risk",
            );
        }
    }

    fn action(
        &mut self,
        raw: &RawAction,
        reply: Option<RawReply>,
        header: Option<String>,
        quarantine_to: Option<String>,
    ) -> Option<RuleAction> {
        let at = self.at.clone();
        if reply.is_some() && !matches!(raw, RawAction::Reject | RawAction::Tempfail) {
            self.error(
                at.key("reply"),
                "`reply` only applies to reject and tempfail",
            );
        }
        if header.is_some() && *raw != RawAction::Tag {
            self.error(at.key("header"), "`header` only applies to tag");
        }
        if quarantine_to.is_some() && *raw != RawAction::Quarantine {
            self.error(
                at.key("quarantine_to"),
                "`quarantine_to` only applies to quarantine",
            );
        }
        Some(match raw {
            RawAction::Accept => RuleAction::Accept,
            RawAction::RequireTls => RuleAction::RequireTls,
            RawAction::AllowPlaintext => RuleAction::AllowPlaintext,
            RawAction::Tag => {
                let Some(header) = header else {
                    self.error(at.key("action"), "`tag` needs `header: \"Name: value\"`");
                    return None;
                };
                match crate::rewrite::headers::parse_header_line(&header) {
                    Some((name, value)) => RuleAction::Tag(name, value),
                    None => {
                        self.error(at.key("header"), "expected `Header-Name: value`");
                        return None;
                    }
                }
            }
            RawAction::Quarantine => {
                let to = match quarantine_to {
                    None => None,
                    Some(address) => match address_pattern(&address) {
                        Ok(AddressPattern::Address(a)) => Some(a),
                        _ => {
                            self.error(
                                at.key("quarantine_to"),
                                format!("`{address}` is not an email address"),
                            );
                            return None;
                        }
                    },
                };
                RuleAction::Quarantine(to)
            }
            RawAction::Reject | RawAction::Tempfail => {
                let reject = *raw == RawAction::Reject;
                let Some(reply) = reply else {
                    let name = self
                        .label
                        .trim_start_matches("rule `")
                        .trim_end_matches('`')
                        .to_string();
                    return Some(if reject {
                        RuleAction::Reject(Reply::policy_reject_default(&name))
                    } else {
                        RuleAction::Tempfail(Reply::policy_tempfail_default(&name))
                    });
                };
                let class = if reject { 5 } else { 4 };
                if reply.code / 100 != class || reply.code > 599 {
                    self.error(
                        at.key("reply").key("code"),
                        format!(
                            "a {} reply needs a {class}xx code, not {}",
                            raw_name(raw),
                            reply.code
                        ),
                    );
                    return None;
                }
                let status = match reply.status.as_deref().map(parse_status) {
                    None => Some(Status(class as u8, 7, 1)),
                    Some(Some(status)) if u16::from(status.0) == class => Some(status),
                    Some(_) => {
                        self.error(
                            at.key("reply").key("status"),
                            format!("expected an enhanced status code like {class}.7.1"),
                        );
                        return None;
                    }
                };
                if reply.text.contains(['\r', '\n']) {
                    self.error(
                        at.key("reply").key("text"),
                        "the reply text must be one line",
                    );
                    return None;
                }
                let reply = Reply::policy(reply.code, status, &reply.text);
                if reject {
                    RuleAction::Reject(reply)
                } else {
                    RuleAction::Tempfail(reply)
                }
            }
        })
    }

    fn conditions(&mut self, raw: RawMatch) -> Vec<Condition> {
        let at = self.at.key("match");
        let mut out = Vec::new();
        macro_rules! list {
            ($field:ident, $parse:expr, $make:expr) => {
                if let Some(values) = raw.$field {
                    let key = at.key(stringify!($field));
                    let values = values.into_vec();
                    if values.is_empty() {
                        self.error(
                            key.clone(),
                            "the list is empty (a condition with no values never matches)",
                        );
                    }
                    let single = values.len() == 1;
                    let mut parsed = Vec::with_capacity(values.len());
                    for (n, value) in values.into_iter().enumerate() {
                        let path = if single { key.clone() } else { key.index(n) };
                        match $parse(value.trim()) {
                            Ok(v) => parsed.push(v),
                            Err(message) => self.error(path, message),
                        }
                    }
                    out.push($make(parsed));
                }
            };
        }
        list!(
            client_ip,
            |v: &str| Network::try_from(v.to_string()),
            Condition::ClientIp
        );
        list!(client_host, name_pattern, Condition::ClientHost);
        list!(helo, name_pattern, Condition::Helo);
        list!(
            spf_record,
            |v: &str| DomainName::parse(v).map(|d| d.to_string()),
            Condition::SpfRecord
        );
        list!(envelope_from, address_pattern, Condition::EnvelopeFrom);
        list!(header_from, address_pattern, Condition::HeaderFrom);
        list!(dkim_domain, name_pattern, Condition::DkimDomain);
        list!(spf, result_word, Condition::Spf);
        list!(dmarc, result_word, Condition::Dmarc);
        list!(arc, result_word, Condition::Arc);
        list!(iprev, result_word, Condition::Iprev);
        list!(rcpt, address_pattern, Condition::Rcpt);
        if let Some(tls) = raw.tls {
            out.push(Condition::Tls(tls));
        }
        list!(tls_version, tls_version, Condition::TlsVersion);
        if let Some(own) = raw.own_domain {
            out.push(Condition::OwnDomain(own));
        }
        out
    }
}

fn raw_name(action: &RawAction) -> &'static str {
    match action {
        RawAction::Reject => "reject",
        _ => "tempfail",
    }
}

fn parse_status(text: &str) -> Option<Status> {
    let mut parts = text.split('.');
    let class: u8 = parts.next()?.parse().ok()?;
    let subject: u16 = parts.next()?.parse().ok()?;
    let detail: u16 = parts.next()?.parse().ok()?;
    (parts.next().is_none() && matches!(class, 2 | 4 | 5) && subject < 1000 && detail < 1000)
        .then_some(Status(class, subject, detail))
}

fn name_pattern(text: &str) -> Result<NamePattern, String> {
    match text.strip_prefix("*.") {
        Some(suffix) => DomainName::parse(suffix).map(|d| NamePattern::Below(d.to_string())),
        None => DomainName::parse(text).map(|d| NamePattern::Exact(d.to_string())),
    }
}

fn address_pattern(text: &str) -> Result<AddressPattern, String> {
    match text.rsplit_once('@') {
        Some((local, domain)) => {
            if local.is_empty() || local.contains(['<', '>', ' ', ',']) {
                return Err(format!("`{text}` is not an email address"));
            }
            // Read literally it would match only the address whose local part is `*`:
            // a rule that silently never matches.
            if local.contains('*') {
                return Err(format!(
                    "`{text}` is not a pattern: write `{domain}` for every address in the domain, `*.{domain}` for its subdomains"
                ));
            }
            let domain = DomainName::parse(domain)
                .map_err(|_| format!("`{text}` is not an email address"))?;
            Ok(AddressPattern::Address(format!("{local}@{domain}")))
        }
        None => name_pattern(text).map(AddressPattern::Domain),
    }
}

fn result_word(text: &str) -> Result<AuthResult, String> {
    AuthResult::parse(text).ok_or_else(|| {
        format!(
            "`{text}` is not a result (pass, fail, softfail, neutral, none, temperror, permerror)"
        )
    })
}

fn tls_version(text: &str) -> Result<String, String> {
    match text.trim_start_matches("TLSv").trim_start_matches("tls") {
        "1.2" => Ok("1.2".into()),
        "1.3" => Ok("1.3".into()),
        _ => Err(format!(
            "`{text}` is not a TLS version mxgate speaks (1.2, 1.3)"
        )),
    }
}
