//! The relay ceiling run: the same load through the byte-copying TCP proxy of
//! [`crate::proxy`] in the gateway's place. Calls the load generator.

use crate::cli::Args;
use crate::load::{LoadSpec, PhaseResult, print_phase, run_load};
use crate::proxy;
use crate::sink::Sink;

/// The relay-ceiling run: the same load through a byte-copying TCP proxy.
pub struct Ceiling {
    pub phase: PhaseResult,
    /// Proxy msgs/s over direct msgs/s.
    pub ratio: f64,
}

impl Ceiling {
    pub fn cpu_us_per_msg(&self) -> Option<f64> {
        self.phase
            .gateway_cpu
            .map(|c| c.total() * 1e6 / self.phase.ok.max(1) as f64)
    }
}

/// Warm-up and measured run through [`proxy`], with the proxy process's CPU.
pub async fn measure_ceiling(
    args: &Args,
    spec: &LoadSpec,
    sink: &Sink,
    direct: &PhaseResult,
) -> Result<Ceiling, String> {
    let proxy = proxy::Proxy::spawn(spec.target)?;
    let spec_for = |messages: usize| LoadSpec {
        target: proxy.addr,
        tls: None,
        messages,
        concurrency: spec.concurrency,
        per_connection: spec.per_connection,
        pool: spec.pool.clone(),
    };
    if args.warmup > 0 {
        run_load(spec_for(args.warmup), Some(proxy.pid), sink).await;
    }
    let phase = run_load(spec_for(args.messages), Some(proxy.pid), sink).await;
    print_phase("proxy  ", "client -> TCP proxy -> sink", &phase);
    let ceiling = Ceiling {
        ratio: phase.msgs_per_s() / direct.msgs_per_s().max(f64::MIN_POSITIVE),
        phase,
    };
    if let Some(cpu) = ceiling.cpu_us_per_msg() {
        println!(
            "proxy CPU: {cpu:.1} us/message (a process that copies bytes both ways and parses nothing)"
        );
    }
    println!(
        "ratio proxy/direct msgs/s: {:.3}: the most an in-line relay reaches on this machine",
        ceiling.ratio
    );
    if ceiling.phase.errors() > 0 {
        return Err(format!(
            "{} failed messages through the proxy ({})",
            ceiling.phase.errors(),
            ceiling.phase.error_summary()
        ));
    }
    Ok(ceiling)
}
