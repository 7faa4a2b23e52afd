//! A policy file as written: `rules:`, each with `name`, `match`, `action` and options.
//! Unknown keys are refused. Checks that need more than one value are in `compile`.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    /// Each rule is deserialised on its own, so one bad rule does not hide the errors of
    /// the others.
    pub rules: Vec<serde_yaml_ng::Value>,
}

/// One value or a list of them ("any of").
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(value) => vec![value],
            OneOrMany::Many(values) => values,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: String,
    #[serde(rename = "match")]
    pub conditions: RawMatch,
    pub action: RawAction,
    #[serde(default)]
    pub mode: RawMode,
    /// For `reject` and `tempfail`: the reply to give.
    #[serde(default)]
    pub reply: Option<RawReply>,
    /// For `tag`: `Header-Name: value` to add.
    #[serde(default)]
    pub header: Option<String>,
    /// For `quarantine`: deliver to this address instead of the recipients.
    #[serde(default)]
    pub quarantine_to: Option<String>,
    /// Allows an `accept` rule that matches only on addresses (a spoofable allowlist).
    #[serde(default)]
    pub unauthenticated: bool,
}

/// Conditions; all given ones must hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub client_ip: Option<OneOrMany<String>>,
    /// Forward-confirmed reverse DNS name, exact or `*.suffix`.
    pub client_host: Option<OneOrMany<String>>,
    pub helo: Option<OneOrMany<String>>,
    /// The client IP is authorised by the SPF record published at this name.
    pub spf_record: Option<OneOrMany<String>>,
    pub envelope_from: Option<OneOrMany<String>>,
    pub header_from: Option<OneOrMany<String>>,
    /// DKIM passed for this `d=` (aligned or not).
    pub dkim_domain: Option<OneOrMany<String>>,
    pub spf: Option<OneOrMany<String>>,
    pub dmarc: Option<OneOrMany<String>>,
    pub arc: Option<OneOrMany<String>>,
    pub iprev: Option<OneOrMany<String>>,
    pub rcpt: Option<OneOrMany<String>>,
    pub tls: Option<bool>,
    pub tls_version: Option<OneOrMany<String>>,
    /// Every header From address is in one of `server.domains` (or below one).
    pub own_domain: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawAction {
    Accept,
    Tag,
    Quarantine,
    Reject,
    Tempfail,
    RequireTls,
    AllowPlaintext,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawMode {
    #[default]
    Enforce,
    Shadow,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReply {
    pub code: u16,
    #[serde(default)]
    pub status: Option<String>,
    pub text: String,
}
