//! What idle connections cost: a fresh gateway's resident memory before and after
//! opening N sessions and holding them. The plaintext ones (greeting, EHLO) are opened
//! first and the memory read, then the TLS ones (STARTTLS and EHLO again), so that each
//! kind gets its own figure.

use crate::SETUP_TIMEOUT;
use crate::client::{Client, ClientTls, client_tls};
use crate::gateway::Gateway;
use crate::procfs::proc_status_kb;
use crate::report::{kb_to_mb, loud};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How many idle connections of each kind.
pub struct IdleSpec {
    pub plain: usize,
    pub tls: usize,
}

/// One kind of idle connection: how many were held and what they added to the RSS.
#[derive(Clone, Copy, Default)]
pub struct IdleBatch {
    pub opened: usize,
    pub delta_mb: f64,
}

impl IdleBatch {
    /// `None` when none of this kind was held.
    pub fn kb_per_conn(&self) -> Option<f64> {
        (self.opened > 0).then(|| self.delta_mb * 1024.0 / self.opened as f64)
    }
}

pub struct IdleResult {
    /// Both kinds together.
    pub opened: usize,
    pub failed: usize,
    pub before_mb: f64,
    /// After the plaintext connections, before the TLS ones.
    pub after_plain_mb: f64,
    pub after_mb: f64,
    pub plain: IdleBatch,
    pub tls: IdleBatch,
}

impl IdleResult {
    pub fn delta_mb(&self) -> f64 {
        self.after_mb - self.before_mb
    }

    pub fn kb_per_conn(&self) -> f64 {
        self.delta_mb() * 1024.0 / self.opened.max(1) as f64
    }
}

/// Opens and holds `spec.plain` plaintext, then `spec.tls` TLS connections against a
/// fresh gateway with `config` (which must offer STARTTLS when `spec.tls` > 0; `cert` is
/// the certificate it presents), reading its VmRSS before and after each kind.
pub async fn measure_idle(
    binary: &Path,
    config: &Path,
    dir: &Path,
    cert: &Path,
    spec: IdleSpec,
) -> Result<IdleResult, String> {
    let mut gateway = Gateway::spawn(binary, config, dir)?;
    // Let start-up (backend probe, first reload poll) settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_mb = |pid| {
        proc_status_kb(pid, "VmRSS:")
            .map(kb_to_mb)
            .ok_or("cannot read gateway VmRSS")
    };
    let before_mb = rss_mb(gateway.pid)?;
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let plain = open_held(gateway.smtp, spec.plain, None, &mut failures).await;
    let after_plain_mb = if spec.plain > 0 {
        settle().await;
        rss_mb(gateway.pid)?
    } else {
        before_mb
    };
    // The gateway generated the certificate as it started, if nothing had before.
    let tls_client = match spec.tls {
        0 => None,
        _ => Some(client_tls(cert)?),
    };
    let tls = open_held(gateway.smtp, spec.tls, tls_client.as_ref(), &mut failures).await;
    if spec.tls > 0 {
        settle().await;
    }
    let after_mb = rss_mb(gateway.pid)?;
    let result = IdleResult {
        opened: plain.len() + tls.len(),
        failed: failures.values().sum(),
        before_mb,
        after_plain_mb,
        after_mb,
        plain: IdleBatch {
            opened: plain.len(),
            delta_mb: after_plain_mb - before_mb,
        },
        tls: IdleBatch {
            opened: tls.len(),
            delta_mb: after_mb - after_plain_mb,
        },
    };
    print_idle(&result, proc_status_kb(gateway.pid, "VmHWM:"));
    if result.failed > 0 {
        let text = failures
            .iter()
            .map(|(what, n)| format!("{n}x {what}"))
            .collect::<Vec<_>>()
            .join(", ");
        loud(&format!(
            "{} of {} idle connections could not be set up: {text}",
            result.failed,
            spec.plain + spec.tls
        ));
    }
    drop((plain, tls));
    gateway.stop();
    Ok(result)
}

/// Time for the gateway to finish with the connections just set up before its RSS is read.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// Opens `count` sessions (with `tls`, STARTTLS too) and returns those that were set up;
/// the others are counted in `failures` by reason.
async fn open_held(
    target: SocketAddr,
    count: usize,
    tls: Option<&ClientTls>,
    failures: &mut BTreeMap<String, usize>,
) -> Vec<Client> {
    // Open in parallel, but not so many at once that the accept backlog overflows.
    let permits = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let permits = permits.clone();
        let tls = tls.cloned();
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            tokio::time::timeout(SETUP_TIMEOUT, Client::open(target, tls.as_ref())).await
        }));
    }
    let mut held = Vec::with_capacity(count);
    for task in tasks {
        match task.await {
            Ok(Ok(Ok(client))) => held.push(client),
            Ok(Ok(Err(err))) => *failures.entry(err.to_string()).or_default() += 1,
            Ok(Err(_)) => *failures.entry("timeout".into()).or_default() += 1,
            Err(err) => *failures.entry(err.to_string()).or_default() += 1,
        }
    }
    held
}

/// The total, then each kind that was opened.
fn print_idle(result: &IdleResult, hwm_kb: Option<u64>) {
    let kinds = match (result.plain.opened, result.tls.opened) {
        (_, 0) => "greeting, EHLO",
        (0, _) => "greeting, EHLO, STARTTLS, EHLO",
        _ => "plaintext and STARTTLS",
    };
    println!(
        "idle connections: {} held ({kinds}), gateway VmRSS {:.1} MB -> {:.1} MB: +{:.1} MB, {:.1} KB per connection{}",
        result.opened,
        result.before_mb,
        result.after_mb,
        result.delta_mb(),
        result.kb_per_conn(),
        match hwm_kb {
            Some(hwm) => format!(" (VmHWM {:.1} MB)", kb_to_mb(hwm)),
            None => String::new(),
        }
    );
    if result.plain.opened == 0 || result.tls.opened == 0 {
        return;
    }
    for (kind, batch, from, to) in [
        (
            "plaintext (greeting, EHLO), opened first",
            &result.plain,
            result.before_mb,
            result.after_plain_mb,
        ),
        (
            "STARTTLS (greeting, EHLO, STARTTLS, EHLO), opened next",
            &result.tls,
            result.after_plain_mb,
            result.after_mb,
        ),
    ] {
        println!(
            "  {kind}: {} held, VmRSS {from:.1} MB -> {to:.1} MB: +{:.1} MB, {:.1} KB per connection",
            batch.opened,
            batch.delta_mb,
            batch.kb_per_conn().unwrap_or(0.0)
        );
    }
}
