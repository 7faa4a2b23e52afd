//! A real Postfix (Debian's package) as a private, throw-away instance: its own
//! `config_directory`, `queue_directory`, `data_directory`, log file and Maildir in a
//! temporary directory, listening on 127.0.0.1 on a port of its own. The system's
//! instance (/etc/postfix, port 25) is left alone: everything goes through
//! `postfix -c <dir>`, nothing outside the temp dir is written, and /etc/postfix is
//! only read (postfix-script looks up the multi-instance list and the queue directory
//! layout there). No `set-permissions`: that would chown the shared programs too;
//! `postfix start` already creates this instance's queue directories with the right
//! owners and modes.
//!
//! Two modes:
//! - mailbox: accepts mail for some domains and delivers every recipient into one
//!   Maildir (`virtual(8)`), optionally rejecting recipients not in a given list;
//! - relay: accepts mail for some domains and relays everything to one `host:port`,
//!   connecting from a chosen source address.
//!
//! Nothing needs DNS. Postfix's master must run as root; without root or without
//! /usr/sbin/postfix, `Postfix::start` returns `Unavailable` and tests skip.

// geteuid, getpwnam, kill and flock: libc calls on our own children and files.
#![allow(unsafe_code)]

use std::fs::{self, File};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const POSTFIX: &str = "/usr/sbin/postfix";
const POSTCONF: &str = "/usr/sbin/postconf";
/// How long `delivered` waits for mail to show up in the Maildir.
const DELIVERY_WAIT: Duration = Duration::from_secs(20);

/// Why a Postfix instance cannot run on this machine; tests print it and skip.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Debug)]
pub enum Mode {
    /// Deliver every accepted recipient into the instance's one Maildir.
    Mailbox {
        /// `None`: every address in the domains exists. `Some(list)`: only these do;
        /// Postfix answers others itself with `550 5.1.1 ... User unknown in virtual
        /// mailbox table`.
        recipients: Option<Vec<String>>,
    },
    /// Relay all accepted mail to `next_hop` ("host:port", no MX lookup).
    Relay {
        next_hop: String,
        /// Source address of outgoing connections (`smtp_bind_address`), so the next
        /// hop can tell this Postfix apart from other local clients.
        source: Option<IpAddr>,
    },
}

#[derive(Clone, Debug)]
pub struct PostfixOptions {
    /// Domains this instance accepts mail for; anything else gets `554 5.7.1 Relay
    /// access denied`.
    pub domains: Vec<String>,
    pub mode: Mode,
    /// `myhostname`: banner, Received headers, EHLO towards the next hop.
    pub hostname: String,
    /// Extra `name = value` lines for main.cf, written last so they override ours.
    pub main_cf: Vec<String>,
}

impl PostfixOptions {
    /// Delivers all mail for `domains` into one Maildir.
    pub fn mailbox(domains: &[&str]) -> PostfixOptions {
        PostfixOptions {
            domains: domains.iter().map(|d| d.to_string()).collect(),
            mode: Mode::Mailbox { recipients: None },
            hostname: "postfix.example.test".into(),
            main_cf: Vec::new(),
        }
    }

    /// Relays all mail for `domains` to `next_hop` ("host:port"), from `source`.
    pub fn relay(domains: &[&str], next_hop: &str, source: Option<&str>) -> PostfixOptions {
        PostfixOptions {
            domains: domains.iter().map(|d| d.to_string()).collect(),
            mode: Mode::Relay {
                next_hop: next_hop.to_string(),
                source: source.map(|s| s.parse().expect("source must be an IP address")),
            },
            hostname: "relay.example.test".into(),
            main_cf: Vec::new(),
        }
    }

    /// Mailbox mode only: accept just these addresses.
    pub fn only_recipients(mut self, recipients: &[&str]) -> PostfixOptions {
        match &mut self.mode {
            Mode::Mailbox { recipients: list } => {
                *list = Some(recipients.iter().map(|r| r.to_string()).collect());
            }
            Mode::Relay { .. } => panic!("only_recipients applies to mailbox mode"),
        }
        self
    }
}

pub struct Postfix {
    /// Where the instance's smtpd listens.
    pub addr: SocketAddr,
    running: bool,
    /// Removed when dropped, which happens after `Drop::drop` stopped Postfix.
    dir: tempfile::TempDir,
}

/// Starts an instance, or prints why it cannot and returns `None` (the test then
/// returns early: a skip).
pub fn start_or_skip(options: PostfixOptions) -> Option<Postfix> {
    match Postfix::start(options) {
        Ok(postfix) => Some(postfix),
        Err(why) => {
            super::skip(&why);
            None
        }
    }
}

impl Postfix {
    /// Creates and starts a private instance. Errors only when this machine cannot run
    /// Postfix at all; anything else going wrong panics with the Postfix log.
    pub fn start(options: PostfixOptions) -> Result<Postfix, Unavailable> {
        if !Path::new(POSTFIX).exists() {
            return Err(Unavailable(format!(
                "{POSTFIX} not found (install Debian's postfix package to run the Postfix end-to-end tests)"
            )));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(Unavailable(
                "Postfix's master daemon must run as root; run the Postfix end-to-end tests as root (CI does)".into(),
            ));
        }
        let dir = tempfile::Builder::new()
            .prefix("mxgate-postfix-")
            .tempdir()
            .expect("create Postfix temp dir");
        let root = dir.path();
        // The delivery agent runs as nobody and must get through to the Maildir.
        fs::set_permissions(root, fs::Permissions::from_mode(0o755))
            .expect("make the Postfix temp dir traversable");
        fs::create_dir(root.join("etc")).expect("create config_directory");
        // The postfix command chdirs into queue_directory before anything else, so it
        // must exist; `postfix start` creates the subdirectories with the right owners
        // (post-install create-missing, for this instance's directories only).
        fs::create_dir(root.join("queue")).expect("create queue_directory");
        let (uid, gid) = nobody();
        for sub in ["", "tmp", "new", "cur"] {
            let path = root.join("Maildir").join(sub);
            fs::create_dir_all(&path).expect("create Maildir");
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown Maildir");
        }

        let mut postfix = Postfix {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            running: false,
            dir,
        };
        // Postfix's master binds with SO_REUSEPORT: two instances that pick the same
        // port both start and silently share it. Holding this lock (across all test
        // processes on the machine) from picking the port until Postfix listens means
        // no other instance can pick it meanwhile; afterwards the kernel does not hand
        // a port with a listener to anyone binding port 0. Other programs taking the
        // port in that window make Postfix fail with "Address already in use", and we
        // try another port.
        let _lock = PortLock::acquire();
        for attempt in 1..=5 {
            let port = free_port();
            postfix.addr.set_port(port);
            postfix.write_config(&options, uid, gid);
            if attempt == 1 {
                postfix.check_config();
            }
            let output = Command::new(POSTFIX)
                .arg("-c")
                .arg(postfix.config_dir())
                .arg("start")
                .output()
                .expect("run postfix start");
            if output.status.success() {
                postfix.running = true;
                return Ok(postfix);
            }
            let log = postfix.log();
            if !log.contains("Address already in use") {
                panic!(
                    "postfix start failed ({}):\n{}{}\nPostfix log:\n{log}",
                    output.status,
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr),
                );
            }
            eprintln!("postfix: port {port} was taken (attempt {attempt}), trying another");
        }
        panic!(
            "postfix could not bind a free port in 5 attempts; log:\n{}",
            postfix.log()
        );
    }

    fn write_config(&self, options: &PostfixOptions, uid: u32, gid: u32) {
        let root = self.dir.path().display().to_string();
        let domains = options.domains.join(", ");
        let mut main = vec![
            // Current defaults, and no backwards-compatibility warnings in the log.
            "compatibility_level = 3.6".to_string(),
            format!("queue_directory = {root}/queue"),
            format!("data_directory = {root}/data"),
            format!("myhostname = {}", options.hostname),
            // Nothing is delivered locally (no aliases, no /var/mail).
            "mydestination =".into(),
            "alias_maps =".into(),
            "alias_database =".into(),
            "local_recipient_maps =".into(),
            "inet_interfaces = 127.0.0.1".into(),
            "inet_protocols = ipv4".into(),
            "mynetworks = 127.0.0.0/8".into(),
            // Only the configured domains, from any client: no open relay for
            // localhost, and a clear 554 for anything else.
            "smtpd_relay_restrictions = reject_unauth_destination".into(),
            // No DNS anywhere: clients are "unknown[ip]", next hops are IP literals.
            "smtpd_peername_lookup = no".into(),
            "smtp_dns_support_level = disabled".into(),
            "lmtp_dns_support_level = disabled".into(),
            "smtp_host_lookup = native".into(),
            "append_dot_mydomain = no".into(),
            "biff = no".into(),
            // Postfix by default sleeps a second before each error reply and slows
            // down fast senders; tests want answers now.
            "smtpd_error_sleep_time = 0s".into(),
            "in_flow_delay = 0s".into(),
            // Deferred mail (next hop down) is retried within seconds, not minutes.
            "queue_run_delay = 1s".into(),
            "minimal_backoff_time = 1s".into(),
            "maximal_backoff_time = 2s".into(),
            "smtp_connect_timeout = 5s".into(),
            // Log to a file of our own (served by the postlog service in master.cf):
            // there is no syslog here, and the log is what explains a failure. Postfix
            // refuses a maillog_file outside maillog_file_prefixes (default /var).
            "syslog_name = postfix-test".into(),
            format!("maillog_file = {root}/maillog"),
            format!("maillog_file_prefixes = {root}"),
        ];
        match &options.mode {
            Mode::Mailbox { recipients } => {
                main.push(format!("virtual_mailbox_domains = {domains}"));
                main.push(format!("virtual_mailbox_base = {root}"));
                // A trailing slash makes virtual(8) write Maildir format.
                main.push(match recipients {
                    None => "virtual_mailbox_maps = static:Maildir/".into(),
                    Some(list) => format!(
                        "virtual_mailbox_maps = inline:{{ {} }}",
                        list.iter()
                            .map(|r| format!("{r}=Maildir/"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
                main.push(format!("virtual_uid_maps = static:{uid}"));
                main.push(format!("virtual_gid_maps = static:{gid}"));
            }
            Mode::Relay { next_hop, source } => {
                main.push(format!("relay_domains = {domains}"));
                // Brackets: connect to exactly this host, no MX lookup. relayhost is
                // the next hop for relay_domains too (relay_transport has none).
                main.push(format!("relayhost = {}", bracket_host(next_hop)));
                if let Some(source) = source {
                    main.push(format!("smtp_bind_address = {source}"));
                }
                // Like a default Debian install: STARTTLS when offered, unverified.
                main.push("smtp_tls_security_level = may".into());
                main.push("smtp_tls_loglevel = 1".into());
            }
        }
        main.extend(options.main_cf.iter().cloned());
        let mut main_cf = main.join("\n");
        main_cf.push('\n');
        write_settled(&self.config_dir().join("main.cf"), &main_cf);

        // Only the services these modes need, none chrooted (a chroot would need copies
        // of /etc files inside the queue directory).
        let master_cf = format!(
            "\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
",
            listen = self.addr
        );
        write_settled(&self.config_dir().join("master.cf"), &master_cf);
    }

    /// Fails loudly on main.cf mistakes (postconf warns about unknown parameters, which
    /// Postfix itself would silently ignore).
    fn check_config(&self) {
        let output = Command::new(POSTCONF)
            .arg("-c")
            .arg(self.config_dir())
            .arg("-n")
            .output()
            .expect("run postconf");
        let warnings = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && warnings.trim().is_empty(),
            "postconf rejects the generated main.cf:\n{warnings}\nmain.cf:\n{}",
            fs::read_to_string(self.config_dir().join("main.cf")).unwrap_or_default()
        );
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    pub fn maildir(&self) -> PathBuf {
        self.dir.path().join("Maildir")
    }

    /// The instance's log so far (for assertion messages).
    pub fn log(&self) -> String {
        fs::read(self.dir.path().join("maillog"))
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_else(|e| format!("(no Postfix log: {e})"))
    }

    /// Waits (up to 20s) until the log contains `needle`, and returns the log. Postfix
    /// logs through postlogd, so a line shows up a moment after the event.
    pub async fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + DELIVERY_WAIT;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            if Instant::now() > deadline {
                panic!("{needle:?} not in the Postfix log within {DELIVERY_WAIT:?}:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Messages in the Maildir right now, oldest first.
    pub fn messages(&self) -> Vec<String> {
        super::gateway::read_maildir(&self.maildir())
    }

    /// Waits (up to 20s) until at least one message was delivered; returns them all.
    pub async fn delivered(&self) -> Vec<String> {
        self.wait_for_messages(1).await
    }

    /// Waits (up to 20s) until at least `count` messages were delivered; panics with
    /// the Postfix log if they were not.
    pub async fn wait_for_messages(&self, count: usize) -> Vec<String> {
        let deadline = Instant::now() + DELIVERY_WAIT;
        loop {
            let messages = self.messages();
            if messages.len() >= count {
                return messages;
            }
            if Instant::now() > deadline {
                panic!(
                    "Postfix delivered {} of {count} messages within {DELIVERY_WAIT:?}; log:\n{}",
                    messages.len(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the instance and waits until its port refuses connections. Idempotent.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        // `abort` sends the master SIGTERM and returns; `stop` does the same but then
        // polls in whole seconds. We poll faster ourselves.
        let _ = Command::new(POSTFIX)
            .arg("-c")
            .arg(self.config_dir())
            .arg("abort")
            .output();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.master_running() {
            if Instant::now() > deadline {
                eprintln!("postfix: master ignored SIGTERM for 10s; killing its process group");
                if let Some(pid) = self.master_pid() {
                    // SAFETY: plain kill(2) on the master's process group.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Children (smtpd) hold the listening socket too and leave a moment after the
        // master; callers of stop() expect a refused connection, not a hanging one.
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
            if Instant::now() > deadline {
                eprintln!(
                    "postfix: {} still accepts connections after stop",
                    self.addr
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the master holds the lock on its pid file; this is how `postfix`
    /// itself tells (`master -t`), and unlike kill(pid, 0) it is not fooled by a zombie
    /// master that nobody reaped (the master daemonizes away from us).
    fn master_running(&self) -> bool {
        let status = Command::new(daemon_directory().join("master"))
            .arg("-t")
            .env("MAIL_CONFIG", self.config_dir())
            .stderr(std::process::Stdio::null())
            .status();
        matches!(status, Ok(s) if !s.success())
    }

    fn master_pid(&self) -> Option<i32> {
        fs::read_to_string(self.dir.path().join("queue/pid/master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes a configuration file dated a minute ago. Postfix re-reads main.cf in 300ms
/// steps for as long as its mtime is within the last second or two ("let it settle"),
/// which would add about 1.5s to every start of a freshly written instance.
fn write_settled(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    let past = std::time::SystemTime::now() - Duration::from_secs(60);
    File::options()
        .write(true)
        .open(path)
        .and_then(|file| file.set_modified(past))
        .unwrap_or_else(|e| panic!("set mtime of {}: {e}", path.display()));
}

/// `host:port` as a bracketed Postfix next hop (`[host]:port`): no MX lookup.
fn bracket_host(next_hop: &str) -> String {
    let (host, port) = next_hop
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("next hop {next_hop:?} must be host:port"));
    let host = host.trim_start_matches('[').trim_end_matches(']');
    format!("[{host}]:{port}")
}

/// A port nobody listens on right now (the kernel never hands out a port with a
/// listener for port 0).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The uid and gid the delivery agent writes the Maildir as: `virtual(8)` refuses
/// uids below 100 (so not root), and the mail_owner `postfix` is reserved for the
/// queue.
fn nobody() -> (u32, u32) {
    // getpwnam's result lives in static storage shared by all threads; look it up once.
    static IDS: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    *IDS.get_or_init(|| {
        // SAFETY: called once (OnceLock); the pointer is NULL or valid until the next
        // getpwnam call, and read right away.
        let entry = unsafe { libc::getpwnam(c"nobody".as_ptr()) };
        assert!(!entry.is_null(), "no user 'nobody' to deliver mail as");
        // SAFETY: non-null pointer from getpwnam.
        unsafe { ((*entry).pw_uid, (*entry).pw_gid) }
    })
}

fn daemon_directory() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let output = Command::new(POSTCONF)
            .args(["-dh", "daemon_directory"])
            .output()
            .expect("run postconf -dh daemon_directory");
        PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
    })
    .clone()
}

/// An exclusive flock(2) on a file in the system temp dir, shared by every test
/// process on the machine; released on drop (closing the file).
struct PortLock {
    _held: File,
}

impl PortLock {
    fn acquire() -> PortLock {
        let path = std::env::temp_dir().join("mxgate-postfix-port.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(
            rc,
            0,
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        PortLock { _held: file }
    }
}
