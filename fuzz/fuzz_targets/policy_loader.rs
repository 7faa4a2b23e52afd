//! The policy loader (`policy::compile::load`) from the YAML text of a policy file.
//!
//! Invariants, beyond "no panic": every diagnostic names the policy file (or the
//! config) and a position inside it; a policy whose diagnostics contain no error
//! compiled every rule it has, and rules are only missing when an error says why.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxgate::config::{LoadedConfig, Severity, SourceFile, load_source};
use mxgate::policy::model::RawFile;
use mxgate_fuzz::yaml_lines;
use std::path::PathBuf;
use std::sync::OnceLock;

struct Fixture {
    _dir: tempfile::TempDir,
    loaded: LoadedConfig,
    policy: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("temp dir");
        let config = dir.path().join("mxgate.yaml");
        let text = "server:\n  hostname: mx.example.test\n  listen: [\"127.0.0.1:25\"]\n  \
                    domains: [example.test]\n\
                    backend:\n  - \"maildir:mail\"\npolicy:\n  files: [\"policy.yaml\"]\n";
        std::fs::write(&config, text).expect("write config");
        let (loaded, _) = load_source(SourceFile {
            path: config,
            text: text.into(),
        })
        .unwrap_or_else(|errors| panic!("fixture config: {errors:?}"));
        Fixture {
            policy: dir.path().join("policy.yaml"),
            _dir: dir,
            loaded,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    std::fs::write(&fixture.policy, data).expect("write policy");
    let (policy, diagnostics) = mxgate::policy::compile::load(&fixture.loaded);
    let text = String::from_utf8_lossy(data);
    let lines = yaml_lines(&text);
    for diagnostic in &diagnostics {
        assert!(
            diagnostic.file == fixture.policy || diagnostic.file == fixture.loaded.source.path,
            "{diagnostic}"
        );
        assert!(
            diagnostic.line >= 1 && diagnostic.column >= 1,
            "{diagnostic}"
        );
        if diagnostic.file == fixture.policy {
            assert!(diagnostic.line <= lines + 1, "{diagnostic} ({lines} lines)");
        }
    }
    let errors = diagnostics.iter().any(|d| d.severity == Severity::Error);
    if !errors {
        // Read independently: every rule the file declares was compiled.
        let declared = serde_yaml_ng::from_slice::<RawFile>(data)
            .expect("a policy without errors is a policy file")
            .rules
            .len();
        assert_eq!(
            policy.rules.len(),
            declared,
            "rules went missing without an error: {diagnostics:?}"
        );
    }
});
