//! Accepting connections: the PROXY header of a trusted load balancer (read first, so
//! its client address is the one every later step sees, limits included), limits, the
//! per-connection snapshot, STARTTLS upgrade.
//!
//! Each accepted connection takes a global slot, then its client's budget from the
//! [`Limiter`] (connections per client address or IPv6 prefix, checked and taken in one
//! step so two connections cannot both squeeze under the limit, and the connection
//! rate), and the snapshot that is current at that moment; it keeps all three until it
//! ends.

use super::proxy::{self, Header};
use crate::config::ProxyProtocol;
use crate::limits::Limiter;
use crate::pipeline::Connection;
use crate::shutdown::{Phase, ShutdownListener};
use crate::smtp::metrics as smtp_metrics;
use crate::smtp::reply::Reply;
use crate::smtp::session::{Ending, Session};
use crate::snapshot::Snapshot;
use crate::tls::TlsInfo;
use arc_swap::ArcSwap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

/// The SMTP listener on `addr`, with room for `backlog` connections the kernel has
/// completed but we have not yet accepted (`server.listen_backlog`). Binding as std
/// does (address reuse, so a restart does not wait out TIME-WAIT), with our backlog
/// instead of std's 128.
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Open connections in total (per client: [`Limiter`]).
#[derive(Default)]
pub struct ConnectionSlots {
    total: AtomicUsize,
}

pub struct Slot {
    slots: Arc<ConnectionSlots>,
}

impl ConnectionSlots {
    pub fn current(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    fn take(self: &Arc<Self>, max_total: usize) -> Result<Slot, Reply> {
        let previous = self.total.fetch_add(1, Ordering::AcqRel);
        if previous >= max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            smtp_metrics::CONNECTIONS_REFUSED
                .with_label_values(&["global_limit"])
                .inc();
            return Err(Reply::too_many_connections());
        }
        smtp_metrics::CONNECTIONS_CURRENT.inc();
        Ok(Slot {
            slots: self.clone(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.total.fetch_sub(1, Ordering::AcqRel);
        smtp_metrics::CONNECTIONS_CURRENT.dec();
    }
}

/// Accepts connections on one socket until shutdown starts.
pub async fn accept_loop(
    listener: TcpListener,
    snapshots: Arc<ArcSwap<Snapshot>>,
    slots: Arc<ConnectionSlots>,
    limiter: Arc<Limiter>,
    mut shutdown: ShutdownListener,
) {
    let label = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown".into());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.reached(Phase::Draining) => return,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        smtp_metrics::CONNECTIONS_TOTAL
            .with_label_values(&[&label])
            .inc();
        let snapshot = snapshots.load_full();
        let session_shutdown = shutdown.clone();
        let slots = slots.clone();
        let limiter = limiter.clone();
        tokio::spawn(async move {
            serve_connection(tcp, peer, snapshot, slots, limiter, session_shutdown).await;
        });
    }
}

/// The client and local address of a connection, and whether it is a balancer's health
/// check; `None` when a trusted balancer sent no valid PROXY header (refused here).
async fn proxied(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    proxy_protocol: Option<&ProxyProtocol>,
) -> Option<(SocketAddr, SocketAddr, bool)> {
    let Some(proxy) = proxy_protocol else {
        return Some((peer, local, false));
    };
    if !proxy.is_trusted(&peer.ip()) {
        return Some((peer, local, false));
    }
    match proxy::read_trusted(tcp, peer, proxy).await {
        Ok(Header::Client {
            source,
            destination,
        }) => Some((source, destination, false)),
        Ok(Header::Local) => Some((peer, local, true)),
        Err(_) => {
            let reply = Reply::proxy_header_required();
            smtp_metrics::reply(&reply);
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                let _ = tcp.write_all(&reply.to_wire()).await;
                let _ = tcp.shutdown().await;
            })
            .await;
            None
        }
    }
}

async fn serve_connection(
    mut tcp: TcpStream,
    peer: SocketAddr,
    snapshot: Arc<Snapshot>,
    slots: Arc<ConnectionSlots>,
    limiter: Arc<Limiter>,
    shutdown: ShutdownListener,
) {
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().unwrap_or(peer);
    // Behind a PROXY protocol balancer the client is the address in its header: from
    // here on (limits included) `peer` is that address.
    let Some((peer, local, health_check)) = Box::pin(proxied(
        &mut tcp,
        peer,
        local,
        snapshot.proxy_protocol.as_ref(),
    ))
    .await
    else {
        return;
    };
    let ip = crate::config::canonical_ip(peer.ip());
    let admitted = match slots.take(snapshot.connections.max_total) {
        Ok(slot) => {
            // A balancer's health checks are exempt from the rates, as trusted clients
            // are (they come every few seconds, for as long as the balancer runs), and
            // from the per-address count: every instance's checks come from the
            // balancer's one address, and with a shared store they would add up and
            // mark healthy instances down. `server.max_connections` still bounds them.
            let trusted = snapshot.is_trusted(&ip) || health_check;
            let mut limits = snapshot.connections.per_client;
            if health_check {
                limits.max_connections_per_ip = usize::MAX;
            }
            Box::pin(limiter.admit(ip, trusted, limits))
                .await
                .map(|budget| (slot, budget))
        }
        Err(reply) => Err(reply),
    };
    let (_slot, budget) = match admitted {
        Ok(admitted) => admitted,
        Err(reply) => {
            smtp_metrics::reply(&reply);
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                let _ = tcp.write_all(&reply.to_wire()).await;
                let _ = tcp.shutdown().await;
            })
            .await;
            return;
        }
    };
    let started = tokio::time::Instant::now();
    let conn = if health_check {
        Connection::health_check(snapshot, peer, local, budget)
    } else {
        Connection::new(snapshot, peer, local, budget)
    };
    // Each stage of the connection runs in a future of its own on the heap, so that the
    // task holds only the stage it is in: a thousand idle connections must stay cheap,
    // and an inline state machine would be as large as its largest stage.
    // One statement, so that the plain session's box is freed before TLS begins.
    // Likewise the handshake's box (it holds the whole handshake state) is freed
    // before the session on the TLS stream begins, and the established stream is
    // moved into that session's box within one statement: a local that lived across
    // the session's `.await` would be reserved in this task by every connection.
    let ending = plain_session(tcp, conn, shutdown.clone()).await;
    if let Ending::StartTls(tcp, conn, errors) = ending {
        let session = Box::pin(start_tls(tcp, conn, shutdown.clone()))
            .await
            .map(|(stream, conn)| tls_session(stream, conn, errors, shutdown));
        if let Some(session) = session {
            let _ = session.await;
        }
    }
    smtp_metrics::SESSION_SECONDS.observe(started.elapsed().as_secs_f64());
}

fn plain_session(
    tcp: TcpStream,
    conn: Connection,
    shutdown: ShutdownListener,
) -> Pin<Box<impl Future<Output = Ending<TcpStream, Connection>> + Send>> {
    let limits = conn.session_limits();
    Box::pin(Session::new(tcp, conn, limits, shutdown).run(true))
}

/// The TLS handshake after STARTTLS: the stream to go on with, or `None` when the
/// handshake failed (logged and counted here) or shutdown came first.
async fn start_tls(
    tcp: TcpStream,
    mut conn: Box<Connection>,
    shutdown: ShutdownListener,
) -> Option<(TlsStream<TcpStream>, Connection)> {
    let tls = conn.snapshot.tls.as_ref()?;
    let acceptor = tls.acceptor.clone();
    let limit = conn.snapshot.limits.timeouts.command;
    let mut stop = shutdown.clone();
    let handshake = tokio::select! {
        result = tokio::time::timeout(limit, acceptor.accept(tcp)) => result,
        _ = stop.reached(Phase::Forced) => return None,
    };
    match handshake {
        Ok(Ok(stream)) => {
            let info = TlsInfo::from_connection(stream.get_ref().1);
            smtp_metrics::TLS_HANDSHAKES
                .with_label_values(&[info.version_label()])
                .inc();
            conn.on_tls_established(info);
            Some((stream, *conn))
        }
        Ok(Err(err)) => {
            smtp_metrics::TLS_HANDSHAKES
                .with_label_values(&["failed"])
                .inc();
            tracing::info!(client_ip = %conn.client_ip, error = %err, "TLS handshake failed");
            None
        }
        Err(_) => {
            smtp_metrics::TLS_HANDSHAKES
                .with_label_values(&["failed"])
                .inc();
            tracing::info!(client_ip = %conn.client_ip, "TLS handshake timed out");
            None
        }
    }
}

fn tls_session(
    stream: TlsStream<TcpStream>,
    conn: Connection,
    errors: u32,
    shutdown: ShutdownListener,
) -> Pin<Box<impl Future<Output = Ending<TlsStream<TcpStream>, Connection>> + Send>> {
    let limits = conn.session_limits();
    Box::pin(
        Session::new(stream, conn, limits, shutdown)
            .with_errors(errors)
            .run(false),
    )
}
