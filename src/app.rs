//! `mxgate serve`: load, bind, run, reload, drain.

use crate::config;
use crate::server::listener::{ConnectionSlots, accept_loop};
use crate::server::reload::{self, Reloader};
use crate::server::shutdown::{Phase, Shutdown};
use crate::snapshot::{self, Mode, Snapshot};
use arc_swap::ArcSwap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;

/// Runs the gateway until SIGTERM/SIGINT. Returns the process exit code.
pub fn serve(config_path: &Path) -> i32 {
    let (loaded, warnings) = match config::load(config_path) {
        Ok(ok) => ok,
        Err(errors) => {
            for error in errors {
                eprintln!("{error}");
            }
            return 1;
        }
    };
    crate::logging::init(&loaded.config.log);
    for warning in &warnings {
        tracing::warn!("{warning}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return 1;
        }
    };
    runtime.block_on(run(config_path, loaded))
}

async fn run(config_path: &Path, loaded: config::LoadedConfig) -> i32 {
    crate::metrics_init();
    let snapshot = match snapshot::compile(loaded, 1, Mode::Serve) {
        Ok((snapshot, warnings)) => {
            for warning in &warnings {
                tracing::warn!("{warning}");
            }
            snapshot
        }
        Err(errors) => {
            for error in &errors {
                eprintln!("{error}");
            }
            return 1;
        }
    };
    reload::note_running(&snapshot);
    let listen = snapshot.loaded.config.server.listen.clone();
    let metrics_listen = snapshot.loaded.config.metrics.as_ref().map(|m| m.listen);
    let grace = snapshot.limits.timeouts.shutdown_grace;
    let reload_interval = snapshot
        .loaded
        .config
        .policy
        .reload_interval
        .or(snapshot
            .loaded
            .config
            .tls
            .as_ref()
            .map(|t| t.reload_interval))
        .unwrap_or(Duration::from_secs(5));
    let snapshots = Arc::new(ArcSwap::from_pointee(snapshot));

    let mut listeners = Vec::with_capacity(listen.len());
    for addr in &listen {
        match TcpListener::bind(addr).await {
            Ok(listener) => listeners.push(listener),
            Err(err) => {
                eprintln!("cannot listen on {addr}: {err}");
                return 1;
            }
        }
    }

    let mut shutdown = Shutdown::new();
    let slots = Arc::new(ConnectionSlots::default());
    let bound = Arc::new(AtomicBool::new(true));
    let mut accept_tasks = Vec::new();
    for listener in listeners {
        tracing::info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening for SMTP");
        accept_tasks.push(tokio::spawn(accept_loop(
            listener,
            snapshots.clone(),
            slots.clone(),
            shutdown.listener(),
        )));
    }

    let (metrics_stop, metrics_stop_rx) = tokio::sync::watch::channel(false);
    if let Some(addr) = metrics_listen {
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                tracing::info!(address = %addr, "serving metrics");
                let readiness = readiness(snapshots.clone(), bound.clone());
                tokio::spawn(crate::metrics::serve(listener, readiness, metrics_stop_rx));
            }
            Err(err) => {
                eprintln!("cannot listen for metrics on {addr}: {err}");
                return 1;
            }
        }
    }

    tokio::spawn(probe_backends(snapshots.clone()));
    let reloader = Reloader::new(config_path.to_path_buf(), snapshots.clone());
    let reload_task = tokio::spawn(reloader.run(reload_interval));

    wait_for_stop_signal().await;
    tracing::info!(grace = ?grace, "shutting down: no new connections, finishing transactions in flight");
    bound.store(false, Ordering::Relaxed);
    shutdown.set(Phase::Draining);
    for task in accept_tasks {
        let _ = task.await;
    }
    reload_task.abort();
    let drained = tokio::time::timeout(grace, wait_drained(&mut shutdown)).await;
    if drained.is_err() {
        tracing::warn!("grace period over: closing the remaining sessions");
        shutdown.set(Phase::Forced);
        let _ = tokio::time::timeout(Duration::from_secs(10), shutdown.drained()).await;
    }
    let _ = metrics_stop.send(true);
    tracing::info!("stopped");
    0
}

async fn wait_drained(shutdown: &mut Shutdown) {
    shutdown.drained().await;
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    let term = async {
        match term.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    let int = async {
        match int.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = int => {}
    }
}

/// `/readyz`: listeners bound, a configuration loaded, and at least one backend that
/// answered within the last two probe rounds.
fn readiness(
    snapshots: Arc<ArcSwap<Snapshot>>,
    bound: Arc<AtomicBool>,
) -> crate::metrics::Readiness {
    Arc::new(move || {
        if !bound.load(Ordering::Relaxed) {
            return Err("listeners are closed (shutting down)".into());
        }
        let snapshot = snapshots.load();
        let now = crate::metrics::unix_now();
        let recent = snapshot.relay.backends().iter().any(|b| {
            now - b.last_success_unix() <= crate::relay::PROBE_INTERVAL.as_secs() as i64 * 2 + 5
        });
        if recent {
            Ok(())
        } else {
            Err("no backend reachable recently".into())
        }
    })
}

/// Probes the backends of whatever snapshot is current, forever.
async fn probe_backends(snapshots: Arc<ArcSwap<Snapshot>>) {
    loop {
        let snapshot = snapshots.load_full();
        snapshot.relay.probe().await;
        drop(snapshot);
        tokio::time::sleep(crate::relay::PROBE_INTERVAL).await;
    }
}
