//! The DMARC enforcement settings the verdict reads, compiled once per snapshot from
//! `dmarc:`, `arc.trusted_sealers` and `server.domains`. Runtime data, not YAML: it
//! lives here, below `pipeline` and `snapshot`, so that both may name it.
//! May call: `config::model`.

use super::model::TempErrorAction;

/// DMARC enforcement settings (`dmarc:` in the config, and `arc.trusted_sealers`).
#[derive(Clone, Debug)]
pub struct DmarcSettings {
    pub enforce: bool,
    pub quarantine_header: (String, String),
    pub on_temperror: TempErrorAction,
    pub reject_invalid_from: bool,
    /// ARC sealers whose verdict we honour when DMARC fails here (lowercase domains).
    pub trusted_sealers: Vec<String>,
    /// `dmarc.protect_own_domains`: the own-domain guard (`own_domain.rs`).
    pub protect_own_domains: bool,
    /// `server.domains`, lowercase: the domains the guard protects (and those below).
    pub own_domains: Vec<String>,
}
