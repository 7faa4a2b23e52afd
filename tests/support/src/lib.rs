//! Shared test infrastructure: a gateway started in-process on port 0, a raw SMTP
//! client, a scriptable backend SMTP/LMTP server, a DNS server and a private Postfix;
//! test mail (`mail`: the message builder, the sender's zone, sealing keys, one message
//! from a client address) and Prometheus scrapes (`prom`). Everything speaks over real
//! sockets; nothing here stands in for mxgate's own code.
//!
//! A dev-only workspace crate (`mxgate-test-kit`), so the support code compiles once
//! rather than once per test binary. It may call mxgate's library and the mxgate
//! binary Cargo builds for the integration tests ([`mxgate_binary`]).

pub mod backend;
pub mod client;
pub mod dkim;
pub mod dns;
pub mod gateway;
pub mod haproxy;
pub mod mail;
pub mod net;
pub mod postfix;
pub mod prom;
pub mod pyverify;
pub mod redis;
pub mod swaks;

/// Initialises logging once when `RUST_LOG` is set (for debugging a failing test).
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A message with CRLF line endings.
pub fn crlf(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\n', "\r\n")
}

/// A test that cannot run on this machine says why and returns early. Under CI
/// (`CI=true`), where `.ci/run` installed every program the tests use, a skip is a
/// failure: a broken install step must not pass as green.
pub fn skip(why: impl std::fmt::Display) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("this test would skip, which CI does not allow: {why}");
    }
    eprintln!("skipping: {why}");
}

/// The `mxgate` binary Cargo built next to the running test (or bench) binary.
/// `CARGO_BIN_EXE_mxgate` is set only for mxgate's own test targets, not for this
/// crate; a test binary lives in `target/<profile>/deps/`, the binary one level up.
pub fn mxgate_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the running test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("a test binary under target/<profile>/deps/");
    let binary = profile_dir.join(format!("mxgate{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.exists(),
        "{} not found: integration tests and benches build it (cargo test / cargo bench)",
        binary.display()
    );
    binary
}
