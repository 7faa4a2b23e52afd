//! A bounded pool of warm connections to one backend.
//!
//! EHLO and STARTTLS are paid once per connection, not per message. The number of open
//! connections is capped by a semaphore; a recipient probe or a delivery that finds every
//! connection busy waits up to `pool_wait` and then fails with [`RelayError::Busy`] (451
//! to the client). Neither holds a connection while a client sends, so how long a lease
//! lasts depends on the backend, not on the client.
//! A connection is only returned to the pool when its SMTP session is known to be clean
//! (after a final reply or RSET); anything else is dropped, which closes it.
//! A reload builds new pools; the old ones are retired: their idle connections are
//! closed at once and the ones still leased are closed when handed back, so the backend
//! sees at most the new pool's connections plus the transactions still in flight on the
//! old configuration, not one idle pool per generation.

use super::client::ClientConn;
use super::{RelayError, RelaySettings};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

pub struct Pool {
    host: String,
    port: u16,
    lmtp: bool,
    settings: Arc<RelaySettings>,
    idle: Mutex<Idle>,
    permits: Arc<Semaphore>,
}

#[derive(Default)]
struct Idle {
    conns: Vec<ClientConn>,
    /// A newer configuration has its own pool: keep nothing idle here.
    retired: bool,
}

impl Pool {
    pub fn new(host: String, port: u16, lmtp: bool, settings: Arc<RelaySettings>) -> Self {
        Pool {
            host,
            port,
            lmtp,
            permits: Arc::new(Semaphore::new(settings.max_connections)),
            settings,
            idle: Mutex::new(Idle::default()),
        }
    }

    /// A connection for one transaction: a warm one unless `fresh` is asked for.
    pub async fn acquire(self: &Arc<Self>, fresh: bool) -> Result<Lease, RelayError> {
        let permit = match tokio::time::timeout(
            self.settings.pool_wait,
            self.permits.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => permit,
            _ => return Err(RelayError::Busy),
        };
        if !fresh {
            while let Some(conn) = self.pop_idle() {
                if conn.idle_since.elapsed() < self.settings.idle_timeout {
                    return Ok(Lease {
                        conn,
                        pool: self.clone(),
                        _permit: permit,
                        reused: true,
                    });
                }
                tokio::spawn(conn.quit());
            }
        }
        let conn = ClientConn::open(&self.host, self.port, self.lmtp, &self.settings).await?;
        Ok(Lease {
            conn,
            pool: self.clone(),
            _permit: permit,
            reused: false,
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pop_idle(&self) -> Option<ClientConn> {
        self.idle().conns.pop()
    }

    fn put_idle(&self, mut conn: ClientConn) {
        conn.idle_since = Instant::now();
        let mut idle = self.idle();
        if idle.retired {
            drop(idle);
            tokio::spawn(conn.quit());
        } else {
            idle.conns.push(conn);
        }
    }

    /// A reload replaced this pool: closes its idle connections now and every other one
    /// when it is handed back. Transactions on the old configuration still get
    /// connections (fresh ones), within its `max_connections`.
    pub fn retire(&self) {
        let conns = {
            let mut idle = self.idle();
            idle.retired = true;
            std::mem::take(&mut idle.conns)
        };
        // Outside a runtime (a reload run by a tool) dropping the connection closes it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            for conn in conns {
                runtime.spawn(conn.quit());
            }
        }
    }
}

/// A connection checked out of the pool for one transaction.
pub struct Lease {
    conn: ClientConn,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
    /// Came from the idle list (may have been closed by the backend meanwhile).
    pub reused: bool,
}

impl Lease {
    pub fn conn(&mut self) -> &mut ClientConn {
        &mut self.conn
    }

    pub fn settings(&self) -> &Arc<RelaySettings> {
        &self.pool.settings
    }

    /// Hands a clean connection back to the pool.
    pub fn release(self) {
        if !self.conn.broken {
            self.pool.put_idle(self.conn);
        }
    }
}
