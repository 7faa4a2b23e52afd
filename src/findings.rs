//! What the checks found, as plain data: RFC 8601 result words and the identities they
//! are about. These types are what the policy matches on, what Authentication-Results
//! is written from, what `explain --json` prints and what metrics count.
//! It names nothing else in the crate, so that every layer may use it.

use serde::Serialize;

/// An RFC 8601 result word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthResult {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    None,
    TempError,
    PermError,
}

impl AuthResult {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthResult::Pass => "pass",
            AuthResult::Fail => "fail",
            AuthResult::SoftFail => "softfail",
            AuthResult::Neutral => "neutral",
            AuthResult::None => "none",
            AuthResult::TempError => "temperror",
            AuthResult::PermError => "permerror",
        }
    }

    pub fn parse(word: &str) -> Option<AuthResult> {
        Some(match word.to_ascii_lowercase().as_str() {
            "pass" => AuthResult::Pass,
            "fail" | "hardfail" => AuthResult::Fail,
            "softfail" => AuthResult::SoftFail,
            "neutral" => AuthResult::Neutral,
            "none" => AuthResult::None,
            "temperror" => AuthResult::TempError,
            "permerror" => AuthResult::PermError,
            _ => return None,
        })
    }
}

impl std::fmt::Display for AuthResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SpfCheck {
    pub result: AuthResult,
    /// The domain whose record was evaluated (MAIL FROM domain, or the HELO name).
    pub domain: String,
    /// `smtp.mailfrom` / `smtp.helo` value: the address (or `postmaster@helo` for `<>`).
    pub identity: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanation: Option<String>,
    /// For permerror and temperror: what was wrong (`two v=spf1 records at ...`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The same as a closed-set label (`multiple_records`, `void_lookup_limit`, ...),
    /// as the metrics count it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason_kind: Option<&'static str>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DkimCheck {
    pub result: AuthResult,
    pub domain: String,
    pub selector: String,
    /// The first 8 characters of `b=` (RFC 6008 `header.b`), naming the signature.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub b: String,
    pub algorithm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ArcCheck {
    pub result: AuthResult,
    /// Number of ARC sets in the message.
    pub instances: u32,
    /// `d=` of the newest ARC-Seal: who sealed last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sealer: Option<String>,
    /// The newest ARC-Authentication-Results, as that sealer wrote it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sealer_results: Option<String>,
    /// `d=` of the newest ARC-Message-Signature: whose key validation looks up first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DmarcPolicy {
    None,
    Quarantine,
    Reject,
}

impl DmarcPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DmarcPolicy::None => "none",
            DmarcPolicy::Quarantine => "quarantine",
            DmarcPolicy::Reject => "reject",
        }
    }

    /// One step less strict (RFC 7489 6.6.4 `pct` sampling, RFC 9989 `t=y`).
    pub fn relaxed(self) -> DmarcPolicy {
        match self {
            DmarcPolicy::Reject => DmarcPolicy::Quarantine,
            _ => DmarcPolicy::None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DmarcCheck {
    pub result: AuthResult,
    /// The RFC5322.From domain (the Author Domain).
    pub domain: String,
    /// The policy the domain publishes for this message (after `sp`/`np`/`t`).
    pub policy: DmarcPolicy,
    /// The policy to apply: `policy`, or one step less strict when `pct` sampled this
    /// message out.
    pub applied_policy: DmarcPolicy,
    pub spf_aligned: bool,
    pub dkim_aligned: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pct: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IprevCheck {
    pub result: AuthResult,
    /// Names the client's address maps to (PTR).
    pub ptr: Vec<String>,
    /// PTR names whose A/AAAA records lead back to the client: forward-confirmed.
    pub confirmed: Vec<String>,
    /// On a temperror: names that may be the client's but could not be confirmed for
    /// DNS trouble (a PTR name whose address look-up failed; with the PTR look-up
    /// itself failed, a name the policy trusts whose addresses hold the client's or
    /// could not be looked up). A policy condition on them is a temperror, not false.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unsure: Vec<String>,
}

/// The header From as the DMARC check sees it (RFC 7489 section 6.6.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FromHeader {
    /// How many From header fields the message has.
    pub fields: usize,
    /// Every address in them.
    pub addresses: Vec<String>,
    /// Their domains, lowercased and deduplicated.
    pub domains: Vec<String>,
    /// Addresses left out of `addresses` because their domain is not a usable domain
    /// name (`ceo@bank..test`).
    pub unusable: Vec<String>,
}

impl FromHeader {
    /// What is wrong with the From header field for DMARC, if anything.
    pub fn problem(&self) -> Option<&'static str> {
        match self.fields {
            1 if self.too_many_domains() => {
                Some("the From header field names more than 10 domains")
            }
            0 => Some("the message has no From header field"),
            1 if !self.unusable.is_empty() => {
                Some("the From header field has an address without a usable domain")
            }
            1 if self.domains.is_empty() => Some("the From header field names no domain"),
            1 => None,
            _ => Some("the message has several From header fields"),
        }
    }
}

/// Author domains evaluated per message at most: DMARC is evaluated for each distinct
/// From domain (RFC 7489 6.6.1), so without a bound one From field listing thousands
/// of domains would cost thousands of DNS look-ups. Past it the message is refused
/// whatever `dmarc.reject_invalid_from` says, and DMARC looks nothing up.
pub const MAX_AUTHOR_DOMAINS: usize = 10;

impl FromHeader {
    /// More distinct From domains than [`MAX_AUTHOR_DOMAINS`].
    pub fn too_many_domains(&self) -> bool {
        self.domains.len() > MAX_AUTHOR_DOMAINS
    }
}

/// Every check's result for one message.
#[derive(Clone, Debug, Serialize)]
pub struct AuthReport {
    pub iprev: IprevCheck,
    pub helo_spf: SpfCheck,
    pub spf: SpfCheck,
    pub dkim: Vec<DkimCheck>,
    pub arc: ArcCheck,
    pub dmarc: DmarcCheck,
    pub from: FromHeader,
}

impl AuthReport {
    /// DKIM passed for this signing domain (aligned or not).
    pub fn dkim_pass_for(&self, domain: &str) -> bool {
        self.dkim
            .iter()
            .any(|d| d.result == AuthResult::Pass && d.domain.eq_ignore_ascii_case(domain))
    }
}
