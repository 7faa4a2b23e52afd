//! Configuration: YAML model -> validation (every problem at once, with its position) ->
//! a [`LoadedConfig`] that the snapshot compiler turns into runtime types.
//!
//! The runtime never sees YAML. This module reads files but opens no sockets.

pub mod diagnostics;
pub mod locate;
pub mod model;
#[cfg(test)]
mod readme_keys;
mod validate;

pub use diagnostics::{Diagnostic, Severity, SourceFile};
pub use locate::YamlPath;
pub use model::*;

use std::path::{Path, PathBuf};

/// A parsed and validated configuration, with what is needed to report later problems
/// (file contents for positions) and to resolve relative paths.
#[derive(Clone, Debug)]
pub struct LoadedConfig {
    pub config: Config,
    pub source: SourceFile,
    /// Relative paths in the config are relative to the config file's directory, so the
    /// gateway behaves the same whatever directory it is started from.
    pub base_dir: PathBuf,
}

impl LoadedConfig {
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    pub fn error(&self, path: &YamlPath, message: impl Into<String>) -> Diagnostic {
        self.source.error(path, message)
    }

    pub fn warning(&self, path: &YamlPath, message: impl Into<String>) -> Diagnostic {
        self.source.warning(path, message)
    }
}

/// Reads, parses and validates the config file. On success also returns warnings.
pub fn load(path: &Path) -> Result<(LoadedConfig, Vec<Diagnostic>), Vec<Diagnostic>> {
    let source = SourceFile::read(path).map_err(|d| vec![d])?;
    load_source(source)
}

pub fn load_source(source: SourceFile) -> Result<(LoadedConfig, Vec<Diagnostic>), Vec<Diagnostic>> {
    let (loaded, diagnostics) = load_unchecked(source)?;
    if diagnostics::has_errors(&diagnostics) {
        Err(diagnostics)
    } else {
        Ok((loaded, diagnostics))
    }
}

/// For `mxgate check`: the configuration with its validation findings, errors included,
/// so that the files it names (policies) can be checked as well and every error printed
/// at once. `None` when the file does not even parse into the model.
pub fn load_for_check(path: &Path) -> (Option<LoadedConfig>, Vec<Diagnostic>) {
    match SourceFile::read(path)
        .map_err(|d| vec![d])
        .and_then(load_unchecked)
    {
        Ok((loaded, diagnostics)) => (Some(loaded), diagnostics),
        Err(diagnostics) => (None, diagnostics),
    }
}

fn load_unchecked(source: SourceFile) -> Result<(LoadedConfig, Vec<Diagnostic>), Vec<Diagnostic>> {
    let tree = source.parse_tree().map_err(|d| vec![d])?;
    // Every error in the file's shape at once (unknown keys, values of the wrong
    // kind); once the shape is right, everything validation finds.
    let (config, shape_errors) = source.deserialize_all::<Config>(&YamlPath::root(), tree);
    let Some(config) = config else {
        return Err(shape_errors);
    };
    let base_dir = source
        .path
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    let loaded = LoadedConfig {
        config,
        source,
        base_dir,
    };
    // Validation judges the config as a whole, which it is not after shape errors
    // (a section without the key that was wrong would be reported as incomplete).
    let diagnostics = if shape_errors.is_empty() {
        validate::validate(&loaded)
    } else {
        shape_errors
    };
    Ok((loaded, diagnostics))
}
