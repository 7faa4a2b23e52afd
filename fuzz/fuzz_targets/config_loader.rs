//! The configuration loader (`config::load_source`) from YAML text.
//!
//! Invariants, beyond "no panic": the text is either a configuration (Ok) or at least
//! one error; every diagnostic names the file and a position inside the text (line and
//! column from 1, at most one past the last line; lines as YAML counts them, where a
//! bare CR also ends a line).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxgate::config::{Diagnostic, Severity, SourceFile, load_source};
use mxgate_fuzz::yaml_lines;
use std::path::PathBuf;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = PathBuf::from("/nonexistent/fuzz/mxgate.yaml");
    let source = SourceFile {
        path: path.clone(),
        text: text.to_string(),
    };
    match load_source(source) {
        Ok((_, warnings)) => {
            for warning in &warnings {
                assert_eq!(warning.severity, Severity::Warning, "{warning}");
                check_position(warning, &path, text);
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "refused without saying why");
            assert!(errors.iter().any(|e| e.severity == Severity::Error));
            for error in &errors {
                check_position(error, &path, text);
            }
        }
    }
});

fn check_position(diagnostic: &Diagnostic, path: &PathBuf, text: &str) {
    assert_eq!(&diagnostic.file, path, "{diagnostic}");
    let lines = yaml_lines(text);
    assert!(diagnostic.line >= 1, "{diagnostic}");
    assert!(diagnostic.column >= 1, "{diagnostic}");
    assert!(
        diagnostic.line <= lines + 1,
        "{diagnostic} (the text has {lines} lines)"
    );
}
