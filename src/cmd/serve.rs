//! `mxgate serve`: load, bind, run, reload, drain.
//!
//! [`start`] binds every listener and spawns the tasks; [`Running::stop`] drains. The
//! binary wraps them with signal handling; tests use them directly (listeners may be on
//! port 0: [`Running`] reports the bound addresses, and `serve` prints them on stdout).

use crate::config::{self, Diagnostic, LoadedConfig};
use crate::limits::Limiter;
use crate::server::listener::{self, ConnectionSlots, accept_loop};
use crate::server::reload::{self, Reloader};
use crate::shutdown::{Phase, Shutdown};
use crate::snapshot::{self, Mode, Snapshot};
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

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
    runtime.block_on(async {
        let running = match start(config_path, loaded).await {
            Ok(running) => running,
            Err(errors) => {
                for error in &errors {
                    eprintln!("{error}");
                }
                return 1;
            }
        };
        // Machine-readable, for scripts (and tests) that listen on port 0.
        for addr in &running.smtp {
            println!("listening smtp {addr}");
        }
        if let Some(addr) = running.metrics {
            println!("listening metrics {addr}");
        }
        // Handlers first, then `ready`: a signal sent on `ready` must find them.
        let stop = stop_signal();
        println!("ready");
        stop.await;
        running.stop().await;
        0
    })
}

/// A started gateway.
pub struct Running {
    pub smtp: Vec<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub snapshots: Arc<ArcSwap<Snapshot>>,
    config_path: PathBuf,
    shutdown: Shutdown,
    bound: Arc<AtomicBool>,
    accept_tasks: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    metrics_stop: tokio::sync::watch::Sender<bool>,
    grace: Duration,
    limiter: Arc<Limiter>,
    /// Keeps a shared limits store; stopped after the drain, so that the slots of the
    /// last sessions are given back rather than left to expire.
    store_keeper: Option<JoinHandle<()>>,
}

/// Compiles the snapshot, binds every listener and starts serving.
pub async fn start(config_path: &Path, loaded: LoadedConfig) -> Result<Running, Vec<Diagnostic>> {
    crate::metrics_init();
    let (snapshot, warnings) = snapshot::compile(loaded, 1, Mode::Serve, None)?;
    for warning in &warnings {
        tracing::warn!("{warning}");
    }
    reload::note_running(&snapshot);
    let config = &snapshot.loaded.config;
    let listen = config.server.listen.clone();
    let backlog = config.server.listen_backlog.get();
    let metrics_listen = config.metrics.as_ref().map(|m| m.listen);
    let grace = snapshot.limits.timeouts.shutdown_grace;
    let reload_interval = config
        .policy
        .reload_interval
        .or(config.tls.as_ref().map(|t| t.reload_interval))
        .unwrap_or(Duration::from_secs(5));
    let source = snapshot.loaded.source.clone();
    let snapshots = Arc::new(ArcSwap::from_pointee(snapshot));
    let bind_error = |key: &str, n: Option<usize>, addr: SocketAddr, err: std::io::Error| {
        let mut path = config::YamlPath::root();
        path = match key {
            "listen" => path.key("server").key("listen").index(n.unwrap_or(0)),
            _ => path.key("metrics").key("listen"),
        };
        vec![source.error(&path, format!("cannot listen on {addr}: {err}"))]
    };

    let mut listeners = Vec::with_capacity(listen.len());
    for (n, addr) in listen.iter().enumerate() {
        match listener::bind(*addr, backlog) {
            Ok(listener) => listeners.push(listener),
            Err(err) => return Err(bind_error("listen", Some(n), *addr, err)),
        }
    }
    let metrics_listener = match metrics_listen {
        Some(addr) => match TcpListener::bind(addr).await {
            Ok(listener) => Some(listener),
            Err(err) => return Err(bind_error("metrics", None, addr, err)),
        },
        None => None,
    };

    let shutdown = Shutdown::new();
    let slots = Arc::new(ConnectionSlots::default());
    let (limiter, store_keeper) = {
        let snapshot = snapshots.load();
        Limiter::start(
            &snapshot.connections.per_client,
            &snapshot.loaded.config.limits,
        )
        .await
    };
    let bound = Arc::new(AtomicBool::new(true));
    let mut smtp = Vec::with_capacity(listeners.len());
    let mut accept_tasks = Vec::with_capacity(listeners.len());
    for listener in listeners {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(address = %addr, "listening for SMTP");
            smtp.push(addr);
        }
        accept_tasks.push(tokio::spawn(accept_loop(
            listener,
            snapshots.clone(),
            slots.clone(),
            limiter.clone(),
            shutdown.listener(),
        )));
    }

    let mut background = Vec::new();
    let (metrics_stop, metrics_stop_rx) = tokio::sync::watch::channel(false);
    let mut metrics = None;
    if let Some(listener) = metrics_listener {
        metrics = listener.local_addr().ok();
        tracing::info!(address = ?metrics, "serving metrics");
        let readiness = readiness(snapshots.clone(), bound.clone());
        background.push(tokio::spawn(crate::metrics::serve(
            listener,
            readiness,
            metrics_stop_rx,
        )));
    }
    background.push(tokio::spawn(probe_backends(snapshots.clone())));
    background.push(tokio::spawn(warn_about_published_keys(snapshots.clone())));
    let reloader = Reloader::new(config_path.to_path_buf(), snapshots.clone());
    background.push(tokio::spawn(reloader.run(reload_interval)));

    Ok(Running {
        smtp,
        metrics,
        snapshots,
        config_path: config_path.to_path_buf(),
        shutdown,
        bound,
        accept_tasks,
        background,
        metrics_stop,
        grace,
        limiter,
        store_keeper,
    })
}

impl Running {
    /// Reloads the configuration now (what SIGHUP does).
    pub fn reload(&self) -> Result<u64, Vec<Diagnostic>> {
        Reloader::new(self.config_path.clone(), self.snapshots.clone()).reload("request")
    }

    /// Stops accepting, lets transactions in flight finish within the grace period,
    /// then closes what is left.
    pub async fn stop(mut self) {
        // Not ready at once, so load balancers stop sending new connections; they are
        // still accepted for `shutdown_delay` (a balancer takes a while to notice).
        self.bound.store(false, Ordering::Relaxed);
        let delay = self
            .snapshots
            .load()
            .loaded
            .config
            .server
            .timeouts
            .shutdown_delay;
        if !delay.is_zero() {
            tracing::info!(delay = ?delay, "shutting down: not ready; still accepting until the delay is over");
            tokio::time::sleep(delay).await;
        }
        tracing::info!(grace = ?self.grace, "shutting down: no new connections, finishing transactions in flight");
        self.shutdown.set(Phase::Draining);
        for task in self.accept_tasks.drain(..) {
            let _ = task.await;
        }
        let drained = tokio::time::timeout(self.grace, self.shutdown.drained()).await;
        if drained.is_err() {
            tracing::warn!("grace period over: closing the remaining sessions");
            self.shutdown.set(Phase::Forced);
            let _ = tokio::time::timeout(Duration::from_secs(10), self.shutdown.drained()).await;
        }
        if let Some(keeper) = self.store_keeper.take() {
            self.limiter.finish(keeper).await;
        }
        let _ = self.metrics_stop.send(true);
        for task in self.background.drain(..) {
            task.abort();
        }
        tracing::info!("stopped");
    }
}

/// Installs the SIGTERM and SIGINT handlers now; the future ends at the first of them.
fn stop_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    wait_for_stop_signal(term, int)
}

async fn wait_for_stop_signal(
    mut term: Option<tokio::signal::unix::Signal>,
    mut int: Option<tokio::signal::unix::Signal>,
) {
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
        let window = crate::relay::PROBE_INTERVAL.as_secs() as i64 * 2 + 5;
        let recent = snapshot
            .relay
            .backends()
            .iter()
            .any(|b| now - b.last_success_unix() <= window);
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
        if let Some(auth) = &snapshot.auth {
            auth.caches().run_pending_tasks();
        }
        drop(snapshot);
        tokio::time::sleep(crate::relay::PROBE_INTERVAL).await;
    }
}

/// Logs (once, at start) ARC keys whose public half is not published or differs.
async fn warn_about_published_keys(snapshots: Arc<ArcSwap<Snapshot>>) {
    let snapshot = snapshots.load_full();
    if let (Some(auth), Some(_)) = (&snapshot.auth, &snapshot.sealer) {
        for warning in crate::cmd::dnscheck::arc_key_warnings(&snapshot.loaded, auth).await {
            tracing::warn!("{warning}");
        }
    }
}
