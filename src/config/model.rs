//! The configuration file's model: what an admin may write in `mxgate.yaml`.
//!
//! Key names are a contract (ops scripts and tests outside the repo use them): add keys,
//! never rename them. Unknown keys are refused. Values that can be checked on their own
//! (domain names, networks, backend URLs, durations) are checked while deserialising, so
//! their errors point at the exact line and column; checks that need several values or
//! the file system live in `validate`.

use ipnet::IpNet;
use serde::Deserialize;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The SMTP listener: names, addresses, sizes, connection limits, timeouts.
    pub server: ServerConfig,
    /// STARTTLS for clients; absent: no STARTTLS offered.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Mailbox servers accepted mail is relayed to (at least one).
    pub backend: Vec<BackendSpec>,
    /// How we talk to the backends.
    #[serde(default)]
    pub relay: RelayConfig,
    /// The resolver used by the sender checks.
    #[serde(default)]
    pub dns: DnsConfig,
    /// Sender checks (SPF, DKIM, DMARC, ARC, iprev).
    #[serde(default)]
    pub auth: AuthConfig,
    /// What DMARC results do to a message.
    #[serde(default)]
    pub dmarc: DmarcConfig,
    /// ARC sealing and trusted sealers; absent: no sealing.
    #[serde(default)]
    pub arc: Option<ArcConfig>,
    /// Policy rule files and how often they are reloaded.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Prometheus endpoint; absent: none.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// Log format and filter.
    #[serde(default)]
    pub log: LogConfig,
    /// Per-client rates and budgets.
    #[serde(default)]
    pub limits: LimitsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Our name: greeting, Received, authserv-id of Authentication-Results.
    pub hostname: DomainName,
    /// Addresses the SMTP listener binds (at least one).
    pub listen: Vec<SocketAddr>,
    /// Recipient domains we accept mail for; nothing else (no open relay).
    pub domains: Vec<DomainName>,
    /// Largest message in bytes (SIZE); default 25 MiB.
    #[serde(default = "defaults::max_message_size")]
    pub max_message_size: NonZeroU64,
    /// RCPT commands per transaction; default 100.
    #[serde(default = "defaults::max_recipients")]
    pub max_recipients: NonZeroUsize,
    /// Clients relayed without sender checks. Absent or `[]`: trust nobody.
    #[serde(default)]
    pub trusted_networks: Vec<Network>,
    /// Open client connections in all; default 1000.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: NonZeroUsize,
    /// Open connections per client address; default 20.
    #[serde(default = "defaults::max_connections_per_ip")]
    pub max_connections_per_ip: NonZeroUsize,
    /// Connections the kernel completes and queues for us before we accept them (the
    /// listen(2) backlog; Linux caps it at `net.core.somaxconn`); default 1024. Beyond
    /// it a burst's handshakes are dropped and those clients wait for a greeting that
    /// never comes.
    #[serde(default = "defaults::listen_backlog")]
    pub listen_backlog: NonZeroU32,
    /// Refusals a client may cause before it gets 421 and is disconnected (see
    /// `Reply::counts_as_client_error`).
    #[serde(default = "defaults::max_errors")]
    pub max_errors: NonZeroU32,
    /// Bare CR/LF and NUL in messages: `normalize` (default) or `reject`.
    #[serde(default)]
    pub bare_line_endings: BareLineEndings,
    /// Messages larger than this are spooled to a temporary file instead of memory.
    #[serde(default = "defaults::spool_threshold")]
    pub spool_threshold: NonZeroUsize,
    /// Where large messages are spooled; default: the system temporary directory.
    #[serde(default)]
    pub spool_dir: Option<PathBuf>,
    /// Client-side deadlines (RFC 5321 section 4.5.3.2).
    #[serde(default)]
    pub timeouts: ServerTimeouts,
    /// Bytes of the header section (up to and including the empty line); more: `552 5.3.4`.
    #[serde(default = "defaults::max_header_size")]
    pub max_header_size: usize,
    /// Header fields in one message; more: `552 5.3.4`.
    #[serde(default = "defaults::max_header_fields")]
    pub max_header_fields: NonZeroUsize,
    /// Text lines over 998 octets: relayed as they are, or refused.
    #[serde(default)]
    pub long_lines: LongLines,
    /// Load balancers that put a PROXY protocol header in front of the SMTP stream.
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocol>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LongLines {
    /// Relay unchanged; the backend decides (much generated mail has such lines).
    #[default]
    Pass,
    /// Answer `550 5.6.0` at the end of data.
    Reject,
}

/// `server.proxy_protocol`: connections from `trusted_networks` must begin with a PROXY
/// header (v1 or v2), whose source address then is the client address; connections
/// from anywhere else must not.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocol {
    /// Load balancer networks whose connections must start with a PROXY header.
    pub trusted_networks: Vec<Network>,
    /// How long a trusted peer has to send the whole header.
    #[serde(default = "defaults::proxy_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl ProxyProtocol {
    pub fn is_trusted(&self, ip: &IpAddr) -> bool {
        self.trusted_networks.iter().any(|net| net.contains(ip))
    }
}

/// RFC 5321 section 4.5.3.2 defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerTimeouts {
    /// Waiting for the next command (RFC 5321 4.5.3.2.7: at least 5 minutes).
    #[serde(with = "humantime_serde")]
    pub command: Duration,
    /// Waiting for the next block of DATA/BDAT content (4.5.3.2.5: 3 minutes).
    #[serde(with = "humantime_serde")]
    pub data_block: Duration,
    /// Writing a reply to the client.
    #[serde(with = "humantime_serde")]
    pub write: Duration,
    /// After SIGTERM: how long in-flight transactions may take before they are cut.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// After SIGTERM: how long `/readyz` answers 503 while connections are still
    /// accepted, before the drain begins (so a load balancer stops sending first).
    #[serde(with = "humantime_serde")]
    pub shutdown_delay: Duration,
}

impl Default for ServerTimeouts {
    fn default() -> Self {
        ServerTimeouts {
            command: Duration::from_secs(300),
            data_block: Duration::from_secs(180),
            write: Duration::from_secs(180),
            shutdown_grace: Duration::from_secs(30),
            shutdown_delay: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BareLineEndings {
    /// Turn bare CR/LF into CRLF and drop NUL bytes (Postfix 3.9's `normalize`).
    #[default]
    Normalize,
    /// Answer `550 5.5.2` to a message that contains any of them.
    Reject,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, relative to the config file.
    pub certificate: PathBuf,
    /// PEM private key for `certificate`.
    pub private_key: PathBuf,
    /// `true`: MAIL before STARTTLS gets `530 5.7.0`.
    #[serde(default)]
    pub require: bool,
    /// Create a self-signed development certificate when both files are missing.
    #[serde(default)]
    pub generate_if_missing: bool,
    /// How often certificate files are checked for changes.
    #[serde(default = "defaults::reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

/// One mailbox server behind us: `smtp://host:port`, `lmtp://host:port`, `maildir:PATH`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum BackendSpec {
    Smtp { host: String, port: u16 },
    Lmtp { host: String, port: u16 },
    Maildir { path: PathBuf },
}

impl TryFrom<String> for BackendSpec {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        if let Some(path) = value.strip_prefix("maildir:") {
            if path.is_empty() {
                return Err("maildir: needs a directory, e.g. maildir:./var/mail".into());
            }
            return Ok(BackendSpec::Maildir { path: path.into() });
        }
        let (scheme, rest) = value.split_once("://").ok_or_else(|| {
            format!("invalid backend `{value}`: expected smtp://host:port, lmtp://host:port or maildir:PATH")
        })?;
        let (host, port) = split_host_port(rest).ok_or_else(|| {
            format!("invalid backend `{value}`: expected host:port after {scheme}://")
        })?;
        match scheme {
            "smtp" => Ok(BackendSpec::Smtp { host, port }),
            "lmtp" => Ok(BackendSpec::Lmtp { host, port }),
            other => Err(format!(
                "unknown backend scheme `{other}`: expected smtp, lmtp or maildir"
            )),
        }
    }
}

fn split_host_port(text: &str) -> Option<(String, u16)> {
    let text = text.trim_end_matches('/');
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        host.parse::<IpAddr>().ok()?;
        (host, port)
    } else {
        text.rsplit_once(':')?
    };
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpec::Smtp { host, port } if host.contains(':') => {
                write!(f, "smtp://[{host}]:{port}")
            }
            BackendSpec::Smtp { host, port } => write!(f, "smtp://{host}:{port}"),
            BackendSpec::Lmtp { host, port } if host.contains(':') => {
                write!(f, "lmtp://[{host}]:{port}")
            }
            BackendSpec::Lmtp { host, port } => write!(f, "lmtp://{host}:{port}"),
            BackendSpec::Maildir { path } => write!(f, "maildir:{}", path.display()),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// STARTTLS to the backend: `off`, `opportunistic` (if offered) or `required`.
    pub tls: RelayTls,
    /// Verify the backend's certificate (against `ca_certificates`, else public roots).
    pub verify_certificate: bool,
    /// PEM bundle to verify backends against; default: public roots.
    pub ca_certificates: Option<PathBuf>,
    /// Name to verify and send as SNI; default: the backend's host.
    pub server_name: Option<String>,
    /// Client certificate presented to the backend (Exchange Online connectors match
    /// gateways by certificate subject).
    pub client_certificate: Option<PathBuf>,
    /// PEM private key for `client_certificate`.
    pub client_key: Option<PathBuf>,
    /// Name we send in EHLO/LHLO to the backend; default `server.hostname`.
    pub helo: Option<DomainName>,
    /// Open connections per backend (pooled; RSET between transactions).
    pub max_connections: NonZeroUsize,
    /// How long a transaction waits for a pooled connection before answering 451.
    #[serde(with = "humantime_serde")]
    pub pool_wait: Duration,
    /// Idle pooled connections older than this are closed rather than reused.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Deadlines for each step of a relay transaction.
    pub timeouts: RelayTimeouts,
    /// Backend answers to recipient probes, kept so that a recipient is not probed for
    /// every message.
    pub recipient_cache: RelayRecipientCache,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            tls: RelayTls::Opportunistic,
            verify_certificate: false,
            ca_certificates: None,
            server_name: None,
            client_certificate: None,
            client_key: None,
            helo: None,
            max_connections: nonzero(100),
            pool_wait: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            timeouts: RelayTimeouts::default(),
            recipient_cache: RelayRecipientCache::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayTls {
    Off,
    Opportunistic,
    Required,
}

/// RFC 5321 section 4.5.3.2 client timeouts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayTimeouts {
    /// Opening the TCP connection; default 30s.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// The backend's greeting, and the TLS handshake after STARTTLS; default 5m.
    #[serde(with = "humantime_serde")]
    pub greeting: Duration,
    /// Replies to EHLO/LHLO and MAIL; default 5m.
    #[serde(with = "humantime_serde")]
    pub mail: Duration,
    /// Reply to each RCPT; default 5m.
    #[serde(with = "humantime_serde")]
    pub rcpt: Duration,
    /// Reply to DATA; default 2m.
    #[serde(with = "humantime_serde")]
    pub data_init: Duration,
    /// Writing each block of message content; default 3m.
    #[serde(with = "humantime_serde")]
    pub data_block: Duration,
    /// Reply after the final dot; default 10m.
    #[serde(with = "humantime_serde")]
    pub data_done: Duration,
}

impl Default for RelayTimeouts {
    fn default() -> Self {
        RelayTimeouts {
            connect: Duration::from_secs(30),
            greeting: Duration::from_secs(300),
            mail: Duration::from_secs(300),
            rcpt: Duration::from_secs(300),
            data_init: Duration::from_secs(120),
            data_block: Duration::from_secs(180),
            data_done: Duration::from_secs(600),
        }
    }
}

/// How long the backend's definite answers to recipient probes are kept (2xx and 5xx;
/// 4xx and errors are never kept), and how many at most.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayRecipientCache {
    /// `0s` keeps no accepts: every recipient is probed.
    #[serde(with = "humantime_serde")]
    pub ttl_accept: Duration,
    /// `0s` keeps no rejections.
    #[serde(with = "humantime_serde")]
    pub ttl_reject: Duration,
    /// Answers kept at most (at most 10,000,000); default 100,000.
    pub max_entries: u64,
}

impl Default for RelayRecipientCache {
    fn default() -> Self {
        RelayRecipientCache {
            ttl_accept: Duration::from_secs(600),
            ttl_reject: Duration::from_secs(60),
            max_entries: 100_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// `ip:port` list, UDP with TCP fallback; absent = the system's resolv.conf.
    pub nameservers: Option<Vec<SocketAddr>>,
    /// One DNS query; default 5s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Tries per query; default 2.
    pub attempts: NonZeroUsize,
    /// DNS answers cached; default 50,000.
    pub cache_entries: NonZeroU64,
    /// Heap bytes the cached DNS answers may hold together; default 32 MiB.
    pub cache_max_bytes: NonZeroU64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: None,
            timeout: Duration::from_secs(5),
            attempts: nonzero(2),
            cache_entries: NonZeroU64::new(50_000).expect("not 0"),
            cache_max_bytes: NonZeroU64::new(32 * 1024 * 1024).expect("not 0"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Run SPF, DKIM, DMARC, ARC and iprev on mail from untrusted clients.
    pub enabled: bool,
    /// Write explanatory comments in Authentication-Results. Set `false` for Exchange
    /// Online, which rejects ARC results whose comments contain `;`.
    pub comments: bool,
    /// DKIM-Signature fields verified per message (the first ones); the rest are ignored.
    pub max_dkim_signatures: NonZeroUsize,
    /// Deadlines for the sender checks.
    pub timeouts: AuthTimeouts,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            enabled: true,
            comments: true,
            max_dkim_signatures: nonzero(10),
            timeouts: AuthTimeouts::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthTimeouts {
    /// DKIM, ARC and DMARC of one message, together; what is unfinished is temperror.
    #[serde(with = "humantime_serde")]
    pub end_of_data: Duration,
    /// One SPF evaluation (`check_host()`, all its look-ups); over it: temperror.
    #[serde(with = "humantime_serde")]
    pub spf: Duration,
}

impl Default for AuthTimeouts {
    fn default() -> Self {
        AuthTimeouts {
            end_of_data: Duration::from_secs(15),
            // RFC 7208 section 4.6.4: such a limit SHOULD allow at least 20 seconds.
            spf: Duration::from_secs(20),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DmarcConfig {
    /// Apply the sender's published policy (reject / quarantine).
    pub enforce: bool,
    /// Header added to quarantined mail, `Name: value`.
    pub quarantine_header: String,
    /// What a DNS temperror during DMARC evaluation does: `tempfail` (451 4.7.5, the
    /// sender retries) or `accept` (deliver, recording temperror).
    pub on_temperror: TempErrorAction,
    /// Reject messages without exactly one From header field naming a domain.
    pub reject_invalid_from: bool,
    /// Refuse mail from untrusted clients whose header From is one of `server.domains`
    /// (or below one) unless it passes DMARC aligned or an `accept` rule with evidence
    /// matches, whatever the domain's published policy.
    pub protect_own_domains: bool,
}

impl Default for DmarcConfig {
    fn default() -> Self {
        DmarcConfig {
            enforce: true,
            quarantine_header: "X-Spam-Flag: YES".into(),
            on_temperror: TempErrorAction::Tempfail,
            reject_invalid_from: true,
            protect_own_domains: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TempErrorAction {
    Tempfail,
    Accept,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArcConfig {
    /// Seal relayed messages; default: on when a key is configured.
    #[serde(default)]
    pub seal: Option<bool>,
    /// `d=` of our seals: what downstream admins list as a trusted sealer.
    pub domain: Option<DomainName>,
    /// `s=` of our seals: where the public key is published under `domain`.
    pub selector: Option<String>,
    /// PEM key used to seal (RSA or Ed25519).
    pub private_key: Option<PathBuf>,
    /// Further keys (rotation): `mxgate check` verifies each is published; sealing uses
    /// `selector` / `private_key`.
    #[serde(default)]
    pub keys: Vec<ArcKey>,
    /// Sealers whose ARC chains we honour when DMARC fails.
    #[serde(default)]
    pub trusted_sealers: Vec<DomainName>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArcKey {
    /// Selector this key is published under.
    pub selector: String,
    /// PEM private key.
    pub private_key: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Glob patterns of policy files, relative to the config file.
    pub files: Vec<String>,
    /// How often config and policy files are checked for changes (SIGHUP reloads at once).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint serving `/metrics`, `/healthz` and `/readyz`.
    pub listen: SocketAddr,
}

/// The `limits:` section: what one client (an IPv4 address, or an IPv6 prefix) may make
/// us spend. 0 turns a rate or budget off.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// IPv6 clients are counted by this prefix (one host can hold a whole /64).
    pub ipv6_prefix_length: u8,
    /// New connections per client per minute; over it `421 4.7.0` at connect.
    pub connections_per_minute: u32,
    /// MAIL commands per client per minute; over it `450 4.7.1`.
    pub messages_per_minute: u32,
    /// RCPT commands per client per minute; over it `450 4.7.1`.
    pub recipients_per_minute: u32,
    /// Commands that do nothing (NOOP, VRFY, HELP; RSET with no transaction open) per
    /// connection, reset when a message is accepted; each one past it counts toward
    /// `server.max_errors`.
    pub max_junk_commands: u32,
    /// Bytes per second a client must keep up while sending a message, measured after
    /// the first `server.timeouts.data_block`.
    pub min_data_rate: u64,
    /// Clients whose rates are remembered at once; past it, clients not yet tracked are
    /// not rate-limited until entries expire (two minutes after their last count).
    pub max_tracked_clients: NonZeroUsize,
    /// Where the connection count and the rates live: `memory` (this process) or
    /// `redis://[:password@]host:port/db` (`rediss://` for TLS; Redis or Valkey), shared
    /// by every instance that names the same store. Read at start-up only.
    pub store: String,
    /// Every store call must answer within this, or the instance counts in memory.
    #[serde(with = "humantime_serde")]
    pub store_timeout: Duration,
    /// Prepended to every key the store holds, so that several deployments can share it.
    pub store_key_prefix: String,
    /// A connection slot held in the store lives this long unless its instance renews
    /// it (every third of it): a killed instance's slots free themselves within it.
    #[serde(with = "humantime_serde")]
    pub store_connection_ttl: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            ipv6_prefix_length: 64,
            connections_per_minute: 600,
            messages_per_minute: 1200,
            recipients_per_minute: 6000,
            max_junk_commands: 100,
            min_data_rate: 500,
            max_tracked_clients: nonzero(100_000),
            store: "memory".into(),
            store_timeout: Duration::from_millis(200),
            store_key_prefix: "mxgate:limits:".into(),
            store_connection_ttl: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (default) or `json` lines on stderr.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `mxgate=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A DNS domain name, lowercased and in A-label (ASCII) form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct DomainName(String);

impl DomainName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.trim().trim_end_matches('.');
        let ascii = idna::domain_to_ascii(trimmed)
            .map_err(|_| format!("`{text}` is not a valid domain name"))?;
        if ascii.is_empty() || ascii.len() > 253 {
            return Err(format!("`{text}` is not a valid domain name"));
        }
        for label in ascii.split('.') {
            let ok = !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return Err(format!("`{text}` is not a valid domain name"));
            }
        }
        Ok(DomainName(ascii))
    }
}

impl TryFrom<String> for DomainName {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        DomainName::parse(&value)
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An IP network; a bare address means that one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Network(pub IpNet);

impl Network {
    pub fn contains(&self, ip: &IpAddr) -> bool {
        let ip = canonical_ip(*ip);
        self.0.contains(&ip)
    }
}

impl TryFrom<String> for Network {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        let text = value.trim();
        if let Ok(net) = text.parse::<IpNet>() {
            return Ok(Network(net.trunc()));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Network(IpNet::from(ip)));
        }
        Err(format!(
            "`{value}` is not an IP address or network (expected e.g. 192.0.2.0/24 or 2001:db8::/32)"
        ))
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`, what a dual-stack socket reports)
/// are treated as the IPv4 address they carry.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// A default that is at least 1: the fields that must never be 0 are `NonZero*`, so that
/// a 0 in the file is refused while parsing, at its line and column.
const fn nonzero(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(n) => n,
        None => panic!("a NonZero default is 0"),
    }
}

mod defaults {
    use super::nonzero;
    use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
    use std::time::Duration;

    pub fn proxy_timeout() -> Duration {
        Duration::from_secs(5)
    }

    pub fn max_message_size() -> NonZeroU64 {
        NonZeroU64::new(25 * 1024 * 1024).expect("not 0")
    }
    pub fn max_recipients() -> NonZeroUsize {
        nonzero(100)
    }
    pub fn max_connections() -> NonZeroUsize {
        nonzero(1000)
    }
    pub fn max_connections_per_ip() -> NonZeroUsize {
        nonzero(20)
    }
    pub fn listen_backlog() -> NonZeroU32 {
        // nginx uses 511 and the kernel's own default cap is 4096: 1024 holds a burst
        // of a thousand connections while the workers are busy signing.
        NonZeroU32::new(1024).expect("not 0")
    }
    pub fn max_errors() -> NonZeroU32 {
        // Postfix's smtpd_hard_error_limit: room for a message to a few unknown
        // recipients, not for harvesting a directory.
        NonZeroU32::new(20).expect("not 0")
    }
    pub fn spool_threshold() -> NonZeroUsize {
        nonzero(1024 * 1024)
    }
    pub fn max_header_size() -> usize {
        256 * 1024
    }
    pub fn max_header_fields() -> NonZeroUsize {
        nonzero(1000)
    }
    pub fn reload_interval() -> Duration {
        Duration::from_secs(5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_specs() {
        assert_eq!(
            BackendSpec::try_from("smtp://127.0.0.1:2526".to_string()).unwrap(),
            BackendSpec::Smtp {
                host: "127.0.0.1".into(),
                port: 2526
            }
        );
        assert_eq!(
            BackendSpec::try_from("lmtp://[::1]:24".to_string()).unwrap(),
            BackendSpec::Lmtp {
                host: "::1".into(),
                port: 24
            }
        );
        assert_eq!(
            BackendSpec::try_from("maildir:./var/mail".to_string()).unwrap(),
            BackendSpec::Maildir {
                path: "./var/mail".into()
            }
        );
        for bad in [
            "smtp://host",
            "ftp://h:1",
            "maildir:",
            "127.0.0.1:25",
            "smtp://:25",
        ] {
            assert!(BackendSpec::try_from(bad.to_string()).is_err(), "{bad}");
        }
    }

    #[test]
    fn domain_names_are_normalised() {
        assert_eq!(
            DomainName::parse("MX.Example.TEST.").unwrap().as_str(),
            "mx.example.test"
        );
        assert_eq!(
            DomainName::parse("bücher.example").unwrap().as_str(),
            "xn--bcher-kva.example"
        );
        assert!(DomainName::parse("bad domain").is_err());
        assert!(DomainName::parse("").is_err());
        assert!(DomainName::parse("-x.test").is_err());
    }

    #[test]
    fn networks() {
        let net = Network::try_from("192.0.2.0/24".to_string()).unwrap();
        assert!(net.contains(&"192.0.2.9".parse().unwrap()));
        assert!(net.contains(&"::ffff:192.0.2.9".parse().unwrap()));
        assert!(!net.contains(&"192.0.3.1".parse().unwrap()));
        let host = Network::try_from("2001:db8::1".to_string()).unwrap();
        assert!(host.contains(&"2001:db8::1".parse().unwrap()));
        assert!(Network::try_from("300.1.1.1/8".to_string()).is_err());
    }
}
