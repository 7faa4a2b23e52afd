//! What idle connections cost: a fresh gateway's resident memory before and after
//! opening N sessions (greeting, EHLO, optional STARTTLS) and holding them.

use crate::SETUP_TIMEOUT;
use crate::client::{Client, ClientTls};
use crate::gateway::Gateway;
use crate::procfs::proc_status_kb;
use crate::report::{kb_to_mb, loud};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub struct IdleResult {
    pub opened: usize,
    pub failed: usize,
    pub before_mb: f64,
    pub after_mb: f64,
}

impl IdleResult {
    pub fn delta_mb(&self) -> f64 {
        self.after_mb - self.before_mb
    }

    pub fn kb_per_conn(&self) -> f64 {
        self.delta_mb() * 1024.0 / self.opened.max(1) as f64
    }
}

pub async fn measure_idle(
    binary: &Path,
    config: &Path,
    dir: &Path,
    count: usize,
    tls: Option<ClientTls>,
) -> Result<IdleResult, String> {
    let mut gateway = Gateway::spawn(binary, config, dir)?;
    // Let start-up (backend probe, first reload poll) settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = proc_status_kb(gateway.pid, "VmRSS:").ok_or("cannot read gateway VmRSS")?;
    let target = gateway.smtp;
    // Open in parallel, but not so many at once that the accept backlog overflows.
    let permits = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let permits = permits.clone();
        let tls = tls.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            tokio::time::timeout(SETUP_TIMEOUT, Client::open(target, tls.as_ref())).await
        }));
    }
    let mut held = Vec::with_capacity(count);
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    for task in tasks {
        match task.await {
            Ok(Ok(Ok(client))) => held.push(client),
            Ok(Ok(Err(err))) => *failures.entry(err.to_string()).or_default() += 1,
            Ok(Err(_)) => *failures.entry("timeout".into()).or_default() += 1,
            Err(err) => *failures.entry(err.to_string()).or_default() += 1,
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = proc_status_kb(gateway.pid, "VmRSS:").ok_or("cannot read gateway VmRSS")?;
    let result = IdleResult {
        opened: held.len(),
        failed: failures.values().sum(),
        before_mb: kb_to_mb(before),
        after_mb: kb_to_mb(after),
    };
    println!(
        "idle connections: {} held ({}), gateway VmRSS {:.1} MB -> {:.1} MB: +{:.1} MB, {:.1} KB per connection{}",
        result.opened,
        if tls.is_some() {
            "greeting, EHLO, STARTTLS, EHLO"
        } else {
            "greeting, EHLO"
        },
        result.before_mb,
        result.after_mb,
        result.delta_mb(),
        result.kb_per_conn(),
        match proc_status_kb(gateway.pid, "VmHWM:") {
            Some(hwm) => format!(" (VmHWM {:.1} MB)", kb_to_mb(hwm)),
            None => String::new(),
        }
    );
    if result.failed > 0 {
        let text = failures
            .iter()
            .map(|(what, n)| format!("{n}x {what}"))
            .collect::<Vec<_>>()
            .join(", ");
        loud(&format!(
            "{} of {count} idle connections could not be set up: {text}",
            result.failed
        ));
    }
    drop(held);
    gateway.stop();
    Ok(result)
}
