//! The compiled, immutable runtime configuration.
//!
//! A [`Snapshot`] is built from a validated config: certificates loaded, backends and
//! their pools created, policy compiled, keys parsed. A connection takes the current
//! snapshot when it is accepted and keeps it to the end, so a reload never changes the
//! rules under a transaction. A reload that fails to compile changes nothing.

use crate::auth::Authenticator;
use crate::config::{
    BackendSpec, BareLineEndings, Diagnostic, DmarcSettings, LoadedConfig, Network, ProxyProtocol,
    RelayTls, ServerTimeouts, YamlPath,
};
use crate::policy::Policy;
use crate::relay::{Relay, RelaySettings};
use crate::rewrite::arc::{Sealer, SigningKeyPair};
use crate::smtp::reply::Reply;
use crate::tls;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

pub struct Snapshot {
    /// Increases with every successful (re)load.
    pub generation: u64,
    pub loaded: LoadedConfig,
    pub hostname: String,
    pub domains: HashSet<String>,
    pub trusted_networks: Vec<Network>,
    pub limits: Limits,
    /// What a new connection is admitted against.
    pub connections: ConnectionLimits,
    /// The balancers whose PROXY header is read before the session (`server.proxy_protocol`).
    pub proxy_protocol: Option<ProxyProtocol>,
    pub tls: Option<ServerTls>,
    pub relay: Relay,
    /// Sender checks; `None` when `auth.enabled` is false.
    pub auth: Option<Arc<Authenticator>>,
    /// Write comments in Authentication-Results.
    pub auth_comments: bool,
    /// Bounds on the authentication work of one message.
    pub auth_budget: crate::auth::Budget,
    pub dmarc: DmarcSettings,
    /// ARC sealing of relayed messages; `None` when off.
    pub sealer: Option<Sealer>,
    /// The sender policy (rules from `policy.files`).
    pub policy: Arc<Policy>,
    /// Every file the snapshot was built from; a change to any of them triggers a reload.
    pub watched_files: Vec<PathBuf>,
}

/// `server.max_connections` in total and the per-client budgets of `limits:`.
pub struct ConnectionLimits {
    pub max_total: usize,
    pub per_client: crate::limits::Settings,
}

pub struct Limits {
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_errors: u32,
    pub spool_threshold: usize,
    pub spool_dir: Option<PathBuf>,
    pub bare_line_endings: BareLineEndings,
    pub timeouts: ServerTimeouts,
    pub header_section: crate::rewrite::section::SectionLimits,
    pub long_lines: crate::config::LongLines,
}

pub struct ServerTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub require: bool,
    /// Expiry of the leaf certificate (seconds since the epoch), for metrics and alerts.
    pub not_after: Option<i64>,
}

/// `serve` creates what is missing (development certificate, Maildir); `check` only
/// looks and reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Serve,
    Check,
}

impl Snapshot {
    /// Files whose change should trigger a reload (re-evaluated on every poll, so a new
    /// file matching a policy glob is noticed).
    pub fn watch_list(&self) -> Vec<PathBuf> {
        let mut files = self.watched_files.clone();
        files.extend(crate::policy::compile::policy_files(&self.loaded));
        files
    }

    pub fn is_trusted(&self, ip: &std::net::IpAddr) -> bool {
        self.trusted_networks.iter().any(|net| net.contains(ip))
    }

    /// Whether we accept mail for this (lowercase, A-label) domain.
    pub fn accepts_domain(&self, domain: &str) -> bool {
        self.domains.contains(domain)
    }

    /// The recipient in the form we relay it, if it is in one of our domains: the one
    /// recipient-domain rule, for RCPT and for `explain`. `<postmaster>` without a
    /// domain must be accepted (RFC 5321 section 4.5.1); smtp-proto reports it as an
    /// empty address. It goes to the postmaster of our first domain.
    pub fn local_recipient(&self, address: &str) -> Result<String, NotLocal> {
        if address.is_empty() || address.eq_ignore_ascii_case("postmaster") {
            let domain = self.loaded.config.server.domains.first();
            return domain
                .map(|d| format!("postmaster@{d}"))
                .ok_or(NotLocal::Domain);
        }
        let (local, domain) = address.rsplit_once('@').ok_or(NotLocal::Domain)?;
        if local.is_empty() {
            return Err(NotLocal::Domain);
        }
        let domain =
            idna::domain_to_ascii(domain.trim_end_matches('.')).map_err(|_| NotLocal::Domain)?;
        if !self.accepts_domain(&domain) {
            return Err(NotLocal::Domain);
        }
        // The backend trusts us to send only its own mail, and many mail servers still
        // route on these: Postfix rewrites `user%evil.test@ours` (allow_percent_hack)
        // and `evil.test!user@ours` (swap_bangpath) to `user@evil.test` and relays it
        // for a trusted client. Postfix at an MX refuses them for the same reason.
        if local.contains(['%', '!', '@']) {
            return Err(NotLocal::RoutedLocalPart);
        }
        Ok(address.to_string())
    }
}

/// Why a recipient is not one we accept mail for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotLocal {
    /// Its domain is not one of `server.domains`.
    Domain,
    /// Its local part holds `%`, `!` or `@`, which mail servers behind us may read as a
    /// route to another domain.
    RoutedLocalPart,
}

impl NotLocal {
    /// The refusal at RCPT (and in `explain`).
    pub fn reply(self, rcpt: &str) -> Reply {
        match self {
            NotLocal::Domain => Reply::relay_denied(rcpt),
            NotLocal::RoutedLocalPart => Reply::routed_recipient(rcpt),
        }
    }
}

/// Builds a snapshot. Returns every problem found, each with its file position.
pub fn compile(
    loaded: LoadedConfig,
    generation: u64,
    mode: Mode,
    previous: Option<&Snapshot>,
) -> Result<(Snapshot, Vec<Diagnostic>), Vec<Diagnostic>> {
    let mut diagnostics = Vec::new();
    let mut watched = vec![loaded.source.path.clone()];
    let config = &loaded.config;
    let root = YamlPath::root();

    let server_tls = match &config.tls {
        None => None,
        Some(tls_config) => {
            let at = root.key("tls");
            let cert = loaded.resolve(&tls_config.certificate);
            let key = loaded.resolve(&tls_config.private_key);
            watched.push(cert.clone());
            watched.push(key.clone());
            let missing = !cert.exists() && !key.exists();
            if missing && tls_config.generate_if_missing && mode == Mode::Serve {
                match tls::generate_development_certificate(
                    config.server.hostname.as_str(),
                    &cert,
                    &key,
                ) {
                    Ok(()) => tracing::warn!(
                        certificate = %cert.display(),
                        "generated a self-signed development certificate; see certs/README.md for real certificates"
                    ),
                    Err(err) => diagnostics.push(loaded.error(&at.key("certificate"), err)),
                }
            }
            if missing && tls_config.generate_if_missing && mode == Mode::Check {
                diagnostics.push(loaded.warning(
                    &at.key("certificate"),
                    "certificate files are missing; `serve` will generate a development certificate",
                ));
                None
            } else {
                match tls::server_config(&cert, &key) {
                    Ok(server_config) => Some(ServerTls {
                        acceptor: tokio_rustls::TlsAcceptor::from(server_config),
                        require: tls_config.require,
                        not_after: tls::certificate_not_after(&cert),
                    }),
                    Err(err) => {
                        diagnostics.push(loaded.error(&at.key("certificate"), err));
                        None
                    }
                }
            }
        }
    };

    // A backend error does not stop here: the checks below add their own errors, so
    // that `mxgate check` reports everything at once.
    let relay = compile_relay(&loaded, mode, &mut diagnostics, &mut watched);

    let auth = compile_auth(&loaded, previous, &mut diagnostics);
    let quarantine_header =
        crate::rewrite::headers::parse_header_line(&config.dmarc.quarantine_header)
            .unwrap_or_else(|| ("X-Spam-Flag".into(), "YES".into()));
    let dmarc = DmarcSettings {
        enforce: config.dmarc.enforce,
        quarantine_header,
        on_temperror: config.dmarc.on_temperror,
        reject_invalid_from: config.dmarc.reject_invalid_from,
        trusted_sealers: config
            .arc
            .as_ref()
            .map(|arc| arc.trusted_sealers.iter().map(|d| d.to_string()).collect())
            .unwrap_or_default(),
        protect_own_domains: config.dmarc.protect_own_domains,
        own_domains: config
            .server
            .domains
            .iter()
            .map(|d| d.to_string().to_ascii_lowercase())
            .collect(),
    };
    let sealer = compile_sealer(&loaded, &mut diagnostics, &mut watched);
    let (policy, policy_diagnostics) = crate::policy::compile::load(&loaded);
    diagnostics.extend(policy_diagnostics);
    watched.extend(policy.files.iter().cloned());

    let relay = match relay {
        Some(relay) if !crate::config::diagnostics::has_errors(&diagnostics) => relay,
        _ => return Err(diagnostics),
    };
    let snapshot = Snapshot {
        generation,
        hostname: config.server.hostname.to_string(),
        domains: config
            .server
            .domains
            .iter()
            .map(|d| d.to_string())
            .collect(),
        trusted_networks: config.server.trusted_networks.clone(),
        limits: Limits {
            max_message_size: config.server.max_message_size.get(),
            max_recipients: config.server.max_recipients.get(),
            max_errors: config.server.max_errors.get(),
            spool_threshold: config.server.spool_threshold.get(),
            spool_dir: config.server.spool_dir.as_ref().map(|d| loaded.resolve(d)),
            bare_line_endings: config.server.bare_line_endings,
            timeouts: config.server.timeouts.clone(),
            header_section: crate::rewrite::section::SectionLimits {
                max_size: config.server.max_header_size,
                max_fields: config.server.max_header_fields.get(),
            },
            long_lines: config.server.long_lines,
        },
        connections: ConnectionLimits {
            max_total: config.server.max_connections.get(),
            per_client: crate::limits::Settings::from_config(config),
        },
        proxy_protocol: config.server.proxy_protocol.clone(),
        tls: server_tls,
        relay,
        auth,
        auth_comments: config.auth.comments,
        auth_budget: crate::auth::Budget {
            max_dkim_signatures: config.auth.max_dkim_signatures.get(),
            end_of_data: config.auth.timeouts.end_of_data,
        },
        dmarc,
        sealer,
        policy: Arc::new(policy),
        watched_files: watched,
        loaded,
    };
    Ok((snapshot, diagnostics))
}

fn compile_relay(
    loaded: &LoadedConfig,
    mode: Mode,
    diagnostics: &mut Vec<Diagnostic>,
    watched: &mut Vec<PathBuf>,
) -> Option<Relay> {
    let config = &loaded.config;
    let at = YamlPath::root().key("relay");
    let relay_config = &config.relay;

    let verification = if !relay_config.verify_certificate {
        tls::ServerVerification::None
    } else {
        match &relay_config.ca_certificates {
            None => tls::ServerVerification::Roots(None),
            Some(path) => {
                let path = loaded.resolve(path);
                watched.push(path.clone());
                match tls::read_ca_certificates(&path) {
                    Ok(certs) => tls::ServerVerification::Roots(Some(certs)),
                    Err(err) => {
                        diagnostics.push(loaded.error(&at.key("ca_certificates"), err));
                        tls::ServerVerification::None
                    }
                }
            }
        }
    };
    let identity = match (&relay_config.client_certificate, &relay_config.client_key) {
        (Some(cert), Some(key)) => {
            let (cert, key) = (loaded.resolve(cert), loaded.resolve(key));
            watched.push(cert.clone());
            watched.push(key.clone());
            match tls::read_identity(&cert, &key) {
                Ok(identity) => Some(identity),
                Err(err) => {
                    diagnostics.push(loaded.error(&at.key("client_certificate"), err));
                    None
                }
            }
        }
        _ => None,
    };
    let client_tls = match tls::client_config(verification, identity) {
        Ok(config) => config,
        Err(err) => {
            diagnostics.push(loaded.error(&at, err));
            return None;
        }
    };
    if relay_config.tls == RelayTls::Required
        && let Some(name) = &relay_config.server_name
        && tls::server_name(name).is_err()
    {
        diagnostics.push(loaded.error(
            &at.key("server_name"),
            format!("`{name}` is not a valid TLS server name"),
        ));
    }
    let settings = Arc::new(RelaySettings {
        helo: relay_config
            .helo
            .as_ref()
            .unwrap_or(&config.server.hostname)
            .to_string(),
        tls_mode: relay_config.tls,
        client_tls,
        server_name: relay_config.server_name.clone(),
        timeouts: relay_config.timeouts.clone(),
        max_connections: relay_config.max_connections.get(),
        pool_wait: relay_config.pool_wait,
        idle_timeout: relay_config.idle_timeout,
        recipient_cache: relay_config.recipient_cache.clone(),
    });

    let mut specs = Vec::with_capacity(config.backend.len());
    for (n, spec) in config.backend.iter().enumerate() {
        let path = match spec {
            BackendSpec::Maildir { path } => {
                let path = loaded.resolve(path);
                if mode == Mode::Check && !path.exists() {
                    diagnostics.push(loaded.warning(
                        &YamlPath::root().key("backend").index(n),
                        format!(
                            "{} does not exist yet; `serve` will create it",
                            path.display()
                        ),
                    ));
                }
                path
            }
            _ => PathBuf::new(),
        };
        specs.push((spec.clone(), path));
    }
    if mode == Mode::Check {
        // Do not create directories while only checking.
        specs.retain(|(spec, path)| !matches!(spec, BackendSpec::Maildir { .. }) || path.exists());
    }
    match Relay::new(&specs, settings) {
        Ok(relay) => Some(relay),
        Err(err) => {
            diagnostics.push(loaded.error(&YamlPath::root().key("backend"), err));
            None
        }
    }
}

/// The authenticator: reused from the previous snapshot when the DNS settings did not
/// change, so a reload keeps the warm DNS cache.
fn compile_auth(
    loaded: &LoadedConfig,
    previous: Option<&Snapshot>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<Arc<Authenticator>> {
    let config = &loaded.config;
    if !config.auth.enabled {
        return None;
    }
    let hostname = config.server.hostname.as_str();
    if let Some(existing) = previous.and_then(|p| p.auth.clone())
        && existing.dns_config == config.dns
        && existing.host_domain() == hostname
    {
        existing.set_spf_timeout(config.auth.timeouts.spf);
        return Some(existing);
    }
    match Authenticator::new(&config.dns, hostname) {
        Ok((auth, warning)) => {
            if let Some(warning) = warning {
                diagnostics.push(loaded.warning(&YamlPath::root().key("dns"), warning));
            }
            auth.set_spf_timeout(config.auth.timeouts.spf);
            Some(Arc::new(auth))
        }
        Err(err) => {
            diagnostics.push(loaded.error(&YamlPath::root().key("dns"), err));
            None
        }
    }
}

/// The ARC sealer: on when `arc.seal` says so, or by default when a key is configured.
/// Every configured key (the sealing one and those listed for rotation) must load.
fn compile_sealer(
    loaded: &LoadedConfig,
    diagnostics: &mut Vec<Diagnostic>,
    watched: &mut Vec<PathBuf>,
) -> Option<Sealer> {
    let arc = loaded.config.arc.as_ref()?;
    let at = YamlPath::root().key("arc");
    for (n, key) in arc.keys.iter().enumerate() {
        let path = loaded.resolve(&key.private_key);
        watched.push(path.clone());
        if let Err(err) = SigningKeyPair::load(&path) {
            diagnostics.push(loaded.error(&at.key("keys").index(n).key("private_key"), err));
        }
    }
    let (Some(domain), Some(selector), Some(key_path)) =
        (&arc.domain, &arc.selector, &arc.private_key)
    else {
        return None;
    };
    if arc.seal == Some(false) {
        return None;
    }
    let path = loaded.resolve(key_path);
    watched.push(path.clone());
    match SigningKeyPair::load(&path) {
        Ok(key) => Some(Sealer::new(key, domain.as_str(), selector)),
        Err(err) => {
            diagnostics.push(loaded.error(&at.key("private_key"), err));
            None
        }
    }
}
