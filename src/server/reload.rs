//! Reloading: on SIGHUP, or when any file the snapshot was built from changes, build a
//! new snapshot and swap it in atomically. A config that fails to load or compile is
//! logged with all its errors and the running snapshot stays.
//!
//! Files are polled (modification time and size) rather than watched with inotify:
//! polling sees atomic renames, symlink swaps (Kubernetes ConfigMaps) and edits on
//! network file systems alike, and costs a few `stat` calls every few seconds.

use super::metrics;
use crate::config::{self, Diagnostic};
use crate::snapshot::{self, Mode, Snapshot};
use arc_swap::ArcSwap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Records that `snapshot` is now the running one.
pub fn note_running(snapshot: &Snapshot) {
    let backends: Vec<String> = snapshot
        .relay
        .backends()
        .iter()
        .map(|b| b.label.clone())
        .collect();
    crate::relay::metrics::retain_backends(&backends);
    let certificate_expiry = snapshot.tls.as_ref().and_then(|t| t.not_after);
    metrics::running(snapshot.generation, certificate_expiry);
}

pub struct Reloader {
    config_path: PathBuf,
    snapshots: Arc<ArcSwap<Snapshot>>,
}

type Stamps = Vec<(PathBuf, Option<(SystemTime, u64)>)>;

impl Reloader {
    pub fn new(config_path: PathBuf, snapshots: Arc<ArcSwap<Snapshot>>) -> Self {
        Reloader {
            config_path,
            snapshots,
        }
    }

    /// Builds and installs a new snapshot. On failure nothing changes.
    pub fn reload(&self, reason: &str) -> Result<u64, Vec<Diagnostic>> {
        let current = self.snapshots.load_full();
        let generation = current.generation + 1;
        let result = config::load(&self.config_path).and_then(|(loaded, mut warnings)| {
            snapshot::compile(loaded, generation, Mode::Serve, Some(&current)).map(
                |(snapshot, more)| {
                    warnings.extend(more);
                    (snapshot, warnings)
                },
            )
        });
        match result {
            Ok((snapshot, warnings)) => {
                for warning in &warnings {
                    tracing::warn!("{warning}");
                }
                let (new, old) = (
                    &snapshot.loaded.config.server,
                    &current.loaded.config.server,
                );
                if new.listen != old.listen || new.listen_backlog != old.listen_backlog {
                    tracing::warn!(
                        "server.listen or listen_backlog changed: listeners change only on restart"
                    );
                }
                if store_settings(&snapshot) != store_settings(&current) {
                    tracing::warn!(
                        "limits.store, store_timeout, store_key_prefix or store_connection_ttl changed: the limits store changes only on restart"
                    );
                }
                snapshot.relay.inherit_health(&current.relay);
                let changes = describe_changes(&current, &snapshot);
                note_running(&snapshot);
                self.snapshots.store(Arc::new(snapshot));
                // Sessions on the old snapshot still deliver through its pools, but
                // nothing stays idle there: the backend's connection limit is for us all.
                current.relay.retire();
                metrics::reloaded(true);
                tracing::info!(generation, reason, changes = %changes, "configuration reloaded");
                Ok(generation)
            }
            Err(errors) => {
                metrics::reloaded(false);
                for error in &errors {
                    tracing::error!("{error}");
                }
                tracing::error!(
                    reason,
                    errors = errors.len(),
                    running_generation = current.generation,
                    "configuration reload failed; the running configuration stays"
                );
                Err(errors)
            }
        }
    }

    fn stamps(&self) -> Stamps {
        let snapshot = self.snapshots.load();
        let mut files = snapshot.watch_list();
        files.push(self.config_path.clone());
        files.sort();
        files.dedup();
        files
            .into_iter()
            .map(|path| {
                let stamp = stamp(&path);
                (path, stamp)
            })
            .collect()
    }

    /// Runs until the process stops: reloads on SIGHUP and on file changes. The SIGHUP
    /// handler is installed when this is called, not when the task first runs: a
    /// SIGHUP before that (a reload right after start) would end the process, which is
    /// what SIGHUP does by default.
    pub fn run(self, interval: Duration) -> impl std::future::Future<Output = ()> {
        let hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGHUP");
                None
            }
        };
        self.watch(interval, hangup)
    }

    async fn watch(self, interval: Duration, mut hangup: Option<tokio::signal::unix::Signal>) {
        let mut stamps = self.stamps();
        loop {
            let hup = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            // The stamps are taken before the files are read, never after: a file that
            // changes while a reload reads them (a renewed key written just after its
            // certificate) then differs at the next look and is reloaded, instead of
            // being recorded as seen while the reload used the old one.
            tokio::select! {
                _ = hup => {
                    stamps = self.stamps();
                    let _ = self.reload("SIGHUP");
                }
                _ = tokio::time::sleep(interval) => {
                    if self.stamps() != stamps {
                        // Let an editor finish writing before reading.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        stamps = self.stamps();
                        let _ = self.reload("file changed");
                    }
                }
            }
        }
    }
}

/// What the limits store was started with (`Limiter::start`, once, at start-up).
fn store_settings(snapshot: &Snapshot) -> (&str, Duration, &str, Duration) {
    let limits = &snapshot.loaded.config.limits;
    (
        &limits.store,
        limits.store_timeout,
        &limits.store_key_prefix,
        limits.store_connection_ttl,
    )
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn describe_changes(old: &Snapshot, new: &Snapshot) -> String {
    let mut parts = Vec::new();
    let rules = new.policy.describe_changes(&old.policy);
    if rules != "rules unchanged" {
        parts.push(rules);
    }
    if old.loaded.source.text != new.loaded.source.text {
        parts.push("config file".to_string());
    }
    if old.tls.as_ref().and_then(|t| t.not_after) != new.tls.as_ref().and_then(|t| t.not_after) {
        parts.push("certificate".to_string());
    }
    if parts.is_empty() {
        "files touched, content unchanged".to_string()
    } else {
        parts.join(", ")
    }
}
