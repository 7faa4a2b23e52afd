//! mxgate: an inbound SMTP gateway that relays in-line to the mailbox server behind it,
//! after judging each message with SPF, DKIM, DMARC, ARC and iprev and a sender policy.
//!
//! Layers, lowest first. A module names only modules of its own layer or a lower one,
//! and no two modules name each other:
//! - base, naming nothing in the crate: `findings` (what the checks found, as data),
//!   `metrics`, `shutdown`, `spool`, `tls`
//! - formats, rules and the protocol, which open no connections (`config` and `policy`
//!   read their files): `config`, `rewrite`, `policy`, `smtp` (the replies, the
//!   DATA/BDAT readers and the session state machine, which reaches the pipeline only
//!   through the `smtp::stages::Stages` trait and runs under the plain
//!   `smtp::session_limits::SessionLimits`)
//! - adapters to the world: `auth` (DNS), `relay` (the backends), `limits` (the shared
//!   store), `logging`
//! - runtime: `snapshot` (a config compiled into runtime objects), then `pipeline` (the
//!   order of the stages and the verdict; `pipeline::Connection` implements `Stages`)
//! - process: `server` (listeners, reload), then `cmd` (the command line; `cmd::serve`
//!   runs the gateway)
//!
//! The test `layering` below, and `.ci/imports`, fail when a file under
//! `src/{smtp,config,auth,relay,policy,rewrite}` names one of `pipeline`, `server`,
//! `snapshot`, `app` or `cmd` from the crate root. `.ci/imports --graph` prints the
//! whole import graph.

pub mod auth;
pub mod cmd;
pub mod config;
pub mod findings;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod relay;
pub mod rewrite;
pub mod server;
pub mod shutdown;
pub mod smtp;
pub mod snapshot;
pub mod spool;
pub mod tls;

// The paths the integration tests and the bench name, from before the commands moved
// under `cmd`.
pub use cmd::keygen;
pub use cmd::serve as app;

/// Registers every metric so that `/metrics` lists them from the start, at zero.
pub fn metrics_init() {
    metrics::register_build_info();
    smtp::metrics::init();
    auth::metrics::init();
    rewrite::metrics::init();
    policy::metrics::init();
    pipeline::metrics::init();
    relay::metrics::init();
    server::metrics::init();
    limits::metrics::init();
}

#[cfg(test)]
mod layering {
    //! The rule of the module docs above, read from the source: paths from the crate
    //! root and groups of them (over several lines too), in code, tests and comments
    //! alike, as the import graph counts them. (This module spells the root `ROOT`, so
    //! that the graph does not count its own examples.)

    use std::path::{Path, PathBuf};

    const LOWER: [&str; 6] = ["smtp", "config", "auth", "relay", "policy", "rewrite"];
    const UPPER: [&str; 5] = ["pipeline", "server", "snapshot", "app", "cmd"];

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                out.push(path);
            }
        }
    }

    fn ident(text: &str) -> &str {
        let end = text
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(text.len());
        &text[..end]
    }

    const ROOT: &str = concat!("crate", "::");

    /// The top-level modules `text` names from the crate root, each with its line.
    fn named_modules(text: &str) -> Vec<(usize, &str)> {
        let line_of = |at: usize| text[..at].matches('\n').count() + 1;
        let mut named = Vec::new();
        for (at, _) in text.match_indices(ROOT) {
            let after = at + ROOT.len();
            if !text[after..].starts_with('{') {
                named.push((line_of(at), ident(&text[after..])));
                continue;
            }
            // A group: the first segment of each item at its top level.
            let (mut depth, mut item_start) = (0, true);
            for (offset, c) in text[after + 1..].char_indices() {
                let here = after + 1 + offset;
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if depth == 0 && item_start && (c.is_ascii_alphabetic() || c == '_') => {
                        named.push((line_of(here), ident(&text[here..])));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        }
        named
    }

    #[test]
    fn lower_layers_never_name_the_upper_ones() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut offending = Vec::new();
        for module in LOWER {
            let mut files = Vec::new();
            rust_files(&src.join(module), &mut files);
            assert!(!files.is_empty(), "no files under src/{module}");
            for file in files {
                let text = std::fs::read_to_string(&file).unwrap();
                for (line, name) in named_modules(&text) {
                    if UPPER.contains(&name) {
                        let file = file.strip_prefix(&src).unwrap().display();
                        offending.push(format!("src/{file}:{line}: {ROOT}{name}"));
                    }
                }
            }
        }
        assert!(
            offending.is_empty(),
            "lower layers name upper ones:\n{}",
            offending.join("\n")
        );
    }

    #[test]
    fn paths_and_groups_are_both_read() {
        let text =
            "use ROOT::smtp::reply;\nuse ROOT::{\n    config::X,\n    pipeline::{a, b},\n};\n"
                .replace("ROOT::", ROOT);
        assert_eq!(
            named_modules(&text),
            [(1, "smtp"), (3, "config"), (4, "pipeline")]
        );
    }
}
