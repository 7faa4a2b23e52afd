//! A whole SMTP session (`smtp::session::Session`, which feeds smtp-proto the command
//! lines, and the DATA/BDAT readers the content) driven by fuzzed client bytes over
//! `tokio::io::duplex`, in front of a `maildir:` backend, with authentication off (no
//! DNS).
//!
//! Invariants, beyond "no panic":
//! - the first reply is a greeting (220), or a refusal that ends the session;
//! - every reply line is `<code><SP or -><text>CRLF` with a code from 200 to 599, at
//!   most 512 octets (RFC 5321 4.5.3.1.5), no CR or LF inside, and the lines of a
//!   multi-line reply share their code; the last reply is complete;
//! - the number of `250 2.0.0 OK: queued as` replies equals the number of messages the
//!   backend stored: never a 250 for a transaction it did not accept, never a stored
//!   message the client was not told about.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxgate::limits::Limiter;
use mxgate::pipeline::Connection;
use mxgate::shutdown::Shutdown;
use mxgate::smtp::session::{Ending, Session};
use mxgate::snapshot::{self, Mode, Snapshot};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Fixture {
    _dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    snapshot: Arc<Snapshot>,
    maildir: PathBuf,
    shutdown: Shutdown,
    limiter: Arc<Limiter>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // fsync on tmpfs costs nothing: stored messages do not slow the fuzzer down.
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("temp dir");
        let maildir = dir.path().join("mail");
        let config = dir.path().join("mxgate.yaml");
        let text = format!(
            "server:\n  hostname: mx.example.test\n  listen: [\"127.0.0.1:0\"]\n  \
             domains: [example.test]\n  max_message_size: 65536\n  spool_threshold: 16384\n\
             auth:\n  enabled: false\nlimits:\n  connections_per_minute: 0\n  \
             messages_per_minute: 0\n  recipients_per_minute: 0\nbackend:\n  - \"maildir:{}\"\n",
            maildir.display()
        );
        std::fs::write(&config, &text).expect("write config");
        let (loaded, _) = mxgate::config::load(&config)
            .unwrap_or_else(|errors| panic!("fixture config: {errors:?}"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (snapshot, _) = runtime
            .block_on(async { snapshot::compile(loaded, 1, Mode::Serve, None) })
            .unwrap_or_else(|errors| panic!("fixture snapshot: {errors:?}"));
        let limiter = Limiter::new(&snapshot.connections.per_client);
        Fixture {
            _dir: dir,
            limiter,
            runtime,
            snapshot: Arc::new(snapshot),
            maildir,
            shutdown: Shutdown::new(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let replies = fixture.runtime.block_on(converse(fixture, data));
    let queued = check_replies(&replies);
    let stored = take_stored(&fixture.maildir);
    assert_eq!(
        queued,
        stored,
        "{queued} messages acknowledged, {stored} stored; replies:\n{}",
        String::from_utf8_lossy(&replies)
    );
});

/// Runs one session: the client sends `data`, closes its side and reads every reply.
async fn converse(fixture: &Fixture, data: &[u8]) -> Vec<u8> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    // A TEST-NET-1 client address that depends on the input only: per-client counters
    // stay low and a crash reproduces from its input alone.
    let hash = data.iter().fold(2_166_136_261u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(16_777_619)
    });
    let peer = SocketAddr::from((Ipv4Addr::new(192, 0, 2, (hash % 254 + 1) as u8), 40_000));
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 25));
    let budget = fixture
        .limiter
        .admit(peer.ip(), false, fixture.snapshot.connections.per_client)
        .await
        .expect("the fixture's limits admit every session (rates off, one at a time)");
    let conn = Connection::new(fixture.snapshot.clone(), peer, local, budget);
    let limits = conn.session_limits();
    let session = Session::new(server, conn, limits, fixture.shutdown.listener());
    let (mut reader, mut writer) = tokio::io::split(client);
    let send = async move {
        // The session may close first (QUIT, too many errors): the rest is not read.
        let _ = writer.write_all(data).await;
        let _ = writer.shutdown().await;
        writer
    };
    let receive = async move {
        let mut replies = Vec::new();
        let _ = reader.read_to_end(&mut replies).await;
        replies
    };
    let run = async move {
        match session.run(true).await {
            Ending::Closed => {}
            // No TLS is configured, so STARTTLS is never accepted.
            Ending::StartTls(..) => panic!("STARTTLS accepted without TLS configured"),
        }
    };
    let (_, _, replies) = tokio::join!(run, send, receive);
    replies
}

/// Checks the form of every reply line; returns how many replies said a message was
/// accepted.
fn check_replies(stream: &[u8]) -> usize {
    let text = String::from_utf8_lossy(stream);
    assert!(
        stream.is_empty() || stream.ends_with(b"\r\n"),
        "last reply line incomplete: {text}"
    );
    let mut queued = 0;
    let mut continued: Option<&[u8]> = None;
    let mut first = true;
    for line in stream.split_inclusive(|&b| b == b'\n') {
        assert!(line.len() <= 512, "reply line over 512 octets: {text}");
        assert!(line.ends_with(b"\r\n"), "bare LF in a reply: {text}");
        let body = &line[..line.len() - 2];
        assert!(!body.contains(&b'\r'), "bare CR in a reply: {text}");
        assert!(body.len() >= 3, "short reply line: {text}");
        let code = &body[..3];
        assert!(
            code.iter().all(u8::is_ascii_digit) && (b'2'..=b'5').contains(&code[0]),
            "reply code {:?} outside 2xx-5xx: {text}",
            String::from_utf8_lossy(code)
        );
        if let Some(previous) = continued {
            assert_eq!(previous, code, "continuation with another code: {text}");
        }
        let separator = body.get(3).copied().unwrap_or(b' ');
        assert!(matches!(separator, b' ' | b'-'), "bad separator: {text}");
        if separator == b'-' {
            continued = Some(code);
            continue;
        }
        continued = None;
        if first {
            assert!(
                matches!(code, b"220" | b"421" | b"554"),
                "first reply is not a greeting: {text}"
            );
            first = false;
        }
        if body.starts_with(b"250 2.0.0 OK: queued as ") {
            queued += 1;
        }
    }
    assert!(continued.is_none(), "multi-line reply never ended: {text}");
    queued
}

/// Counts the messages the backend stored since the last call, and removes them.
fn take_stored(maildir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(maildir.join("new")) else {
        return 0;
    };
    let mut stored = 0;
    for entry in entries.flatten() {
        let _ = std::fs::remove_file(entry.path());
        stored += 1;
    }
    stored
}
