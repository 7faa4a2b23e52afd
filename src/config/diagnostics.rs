//! Configuration errors and warnings that name file, line and column.
//!
//! Every problem found in a config or policy file becomes a [`Diagnostic`] printed as
//! `file:line:column: message` (the format `mxgate check` promises). Problems are
//! collected rather than returned one by one, so an admin sees all of them at once.

use super::locate::{Segment, YamlPath, locate};
use serde::de::DeserializeOwned;
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub severity: Severity,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if self.severity == Severity::Warning {
            f.write_str("warning: ")?;
        }
        f.write_str(&self.message)
    }
}

/// A YAML file as read from disk.
#[derive(Clone, Debug)]
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
}

impl SourceFile {
    pub fn read(path: &Path) -> Result<SourceFile, Diagnostic> {
        std::fs::read_to_string(path)
            .map(|text| SourceFile {
                path: path.to_path_buf(),
                text,
            })
            .map_err(|err| Diagnostic {
                file: path.to_path_buf(),
                line: 1,
                column: 1,
                severity: Severity::Error,
                message: format!("cannot read file: {err}"),
            })
    }

    /// A diagnostic about the node at `path` in this file.
    pub fn diagnostic(
        &self,
        path: &YamlPath,
        severity: Severity,
        message: impl Into<String>,
    ) -> Diagnostic {
        let position = locate(&self.text, path, false);
        Diagnostic {
            file: self.path.clone(),
            line: position.line,
            column: position.column,
            severity,
            message: message.into(),
        }
    }

    pub fn error(&self, path: &YamlPath, message: impl Into<String>) -> Diagnostic {
        self.diagnostic(path, Severity::Error, message)
    }

    pub fn warning(&self, path: &YamlPath, message: impl Into<String>) -> Diagnostic {
        self.diagnostic(path, Severity::Warning, message)
    }

    /// Parses the file into a YAML tree; a syntax error carries serde_yaml_ng's position.
    pub fn parse_tree(&self) -> Result<serde_yaml_ng::Value, Diagnostic> {
        serde_yaml_ng::from_str(&self.text).map_err(|err| {
            let (line, column) = err
                .location()
                .map(|loc| (loc.line(), loc.column()))
                .unwrap_or((1, 1));
            Diagnostic {
                file: self.path.clone(),
                line,
                column,
                severity: Severity::Error,
                message: strip_position(&err.to_string()),
            }
        })
    }

    /// As [`deserialize`](Self::deserialize), but reports every error, not the first:
    /// after each one the map entry holding it is taken out and the rest deserialised
    /// again (a section that then lacks a required key goes too). Returns the value
    /// deserialised without those entries (`None` when even that fails, e.g. for a
    /// required top-level key that was taken out) and the errors. After errors the
    /// value is incomplete: only to look for more errors in, never to run with or to
    /// judge as a whole (checks across keys would report what was taken out).
    pub fn deserialize_all<T: DeserializeOwned>(
        &self,
        at: &YamlPath,
        mut value: serde_yaml_ng::Value,
    ) -> (Option<T>, Vec<Diagnostic>) {
        let mut errors = Vec::new();
        let mut removed: Vec<Vec<Segment>> = Vec::new();
        let value = self.deserialize_pruned(&mut value, &mut errors, &mut removed, at);
        // In the order of the file, not of discovery.
        errors.sort_by_key(|d: &Diagnostic| (d.line, d.column));
        (value, errors)
    }

    fn deserialize_pruned<T: DeserializeOwned>(
        &self,
        value: &mut serde_yaml_ng::Value,
        errors: &mut Vec<Diagnostic>,
        removed: &mut Vec<Vec<Segment>>,
        at: &YamlPath,
    ) -> Option<T> {
        /// Enough for any real file; a bound so that no input can loop.
        const MAX_ERRORS: usize = 50;
        loop {
            let err = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
                Ok(parsed) => return Some(parsed),
                Err(err) => err,
            };
            let message = err.inner().to_string();
            let segments = YamlPath::root().join_serde(err.path()).0;
            // A required key we took out is missing now: a consequence, not an error.
            let consequence = message
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split('`').next())
                .is_some_and(|key| {
                    removed.iter().any(|r| {
                        r.len() == segments.len() + 1
                            && r.starts_with(&segments)
                            && r.last() == Some(&Segment::Key(key.to_string()))
                    })
                });
            if consequence {
                // The section now lacks a key we took out: take the whole section out
                // too and go on looking in the others.
                let mut section = segments;
                while matches!(section.last(), Some(Segment::Index(_))) {
                    section.pop();
                }
                if section.is_empty()
                    || removed.contains(&section)
                    || !remove_entry(value, &section)
                {
                    return None;
                }
                removed.push(section);
                continue;
            }
            let unknown = message
                .strip_prefix("unknown field `")
                .and_then(|rest| rest.split('`').next())
                .map(|key| Segment::Key(key.to_string()));
            errors.push(self.deserialize_error(at, err));
            // The entry to take out: the unknown key itself, else the innermost map
            // entry on the error's path.
            let mut target = segments;
            if let Some(key) = unknown
                && target.last() != Some(&key)
            {
                target.push(key);
            }
            while !matches!(target.last(), None | Some(Segment::Key(_))) {
                target.pop();
            }
            if target.is_empty()
                || removed.contains(&target)
                || errors.len() >= MAX_ERRORS
                || !remove_entry(value, &target)
            {
                return None;
            }
            removed.push(target);
        }
    }

    /// Deserialises `value` (found at `at` in this file) into `T`. An error names the
    /// exact node, and for an unknown key the key itself.
    pub fn deserialize<T: DeserializeOwned>(
        &self,
        at: &YamlPath,
        value: serde_yaml_ng::Value,
    ) -> Result<T, Diagnostic> {
        serde_path_to_error::deserialize(value).map_err(|err| self.deserialize_error(at, err))
    }

    fn deserialize_error(
        &self,
        at: &YamlPath,
        err: serde_path_to_error::Error<serde_yaml_ng::Error>,
    ) -> Diagnostic {
        {
            let mut path = at.join_serde(err.path());
            let message = plain_words(err.inner().to_string());
            let mut on_key = false;
            if let Some(unknown) = message
                .strip_prefix("unknown field `")
                .and_then(|rest| rest.split('`').next())
            {
                if path.0.last() != Some(&super::locate::Segment::Key(unknown.to_string())) {
                    path = path.key(unknown);
                }
                on_key = true;
            }
            let position = locate(&self.text, &path, on_key);
            let shown = if path.0.is_empty() {
                message
            } else {
                format!("{path}: {message}")
            };
            Diagnostic {
                file: self.path.clone(),
                line: position.line,
                column: position.column,
                severity: Severity::Error,
                message: shown,
            }
        }
    }
}

/// Takes the map entry at `path` (whose last segment is a key) out of `value`.
fn remove_entry(value: &mut serde_yaml_ng::Value, path: &[Segment]) -> bool {
    let Some((Segment::Key(key), parents)) = path.split_last() else {
        return false;
    };
    let mut node = value;
    for segment in parents {
        let next = match segment {
            Segment::Key(key) => node.get_mut(key.as_str()),
            Segment::Index(index) => node.get_mut(*index),
        };
        match next {
            Some(next) => node = next,
            None => return false,
        }
    }
    node.as_mapping_mut()
        .and_then(|map| map.remove(key.as_str()))
        .is_some()
}

/// serde's wording where it speaks Rust to an admin: a 0 given for a `NonZero*` field
/// ("invalid value: integer `0`, expected a nonzero usize").
fn plain_words(message: String) -> String {
    if message.starts_with("invalid value: integer `0`, expected a nonzero") {
        return "must be at least 1, not `0`".to_string();
    }
    message
}

/// Removes serde_yaml_ng's " at line N column M" (the position is reported separately).
fn strip_position(message: &str) -> String {
    let Some(at) = message.find(" at line ") else {
        return message.to_string();
    };
    let rest = &message[at + " at line ".len()..];
    let rest = rest.trim_start_matches(|c: char| c.is_ascii_digit());
    let rest = rest.strip_prefix(" column ").unwrap_or(rest);
    let rest = rest.trim_start_matches(|c: char| c.is_ascii_digit());
    format!("{}{}", &message[..at], rest)
}

/// True when any diagnostic is an error (warnings alone do not stop a config).
pub fn has_errors(diagnostics: &[Diagnostic]) -> bool {
    diagnostics.iter().any(|d| d.severity == Severity::Error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        port: u16,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        inner: Inner,
    }

    fn source(text: &str) -> SourceFile {
        SourceFile {
            path: "test.yaml".into(),
            text: text.into(),
        }
    }

    #[test]
    fn unknown_key_points_at_the_key() {
        let file = source("name: x\ninner:\n  port: 25\n  prot: 26\n");
        let tree = file.parse_tree().unwrap();
        let err = file
            .deserialize::<Outer>(&YamlPath::root(), tree)
            .unwrap_err();
        assert_eq!((err.line, err.column), (4, 3), "{err}");
        assert!(err.message.contains("unknown field `prot`"), "{err}");
        assert!(
            err.to_string().starts_with("test.yaml:4:3: inner.prot: "),
            "{err}"
        );
    }

    #[test]
    fn bad_value_points_at_the_value() {
        let file = source("name: x\ninner:\n  port: lots\n");
        let tree = file.parse_tree().unwrap();
        let err = file
            .deserialize::<Outer>(&YamlPath::root(), tree)
            .unwrap_err();
        assert_eq!((err.line, err.column), (3, 9), "{err}");
    }

    #[test]
    fn syntax_error_has_position() {
        let file = source("name: x\ninner: [unclosed\n");
        let err = file.parse_tree().unwrap_err();
        assert!(err.line >= 2, "{err}");
        assert!(
            err.message
                .starts_with("did not find expected ',' or ']', while parsing"),
            "{err}"
        );
    }
}
