//! The floor of sealing's cost: RSA-2048 signatures and verifications timed with
//! aws-lc-rs (the library mail-auth signs with) on one thread of this process.

use crate::checks::SenderZone;
use crate::report::loud;
use std::time::{Duration, Instant};

/// Measures the RSA-2048 costs on a thread of their own and prints them.
pub async fn rsa_floor(zone: &SenderZone, signs: usize, when: &str) -> Option<RsaCost> {
    let pem = zone.rsa_pem().to_string();
    match tokio::task::spawn_blocking(move || measure_rsa(&pem, signs)).await {
        Ok(Ok(rsa)) => {
            println!(
                "RSA-2048 with aws-lc-rs (PKCS#1 v1.5 SHA-256, one thread in this process, {when}), CPU per operation, median of {RSA_BATCHES} batches: sign {}, verify {}",
                rsa.sign.describe(),
                rsa.verify.describe()
            );
            Some(rsa)
        }
        Ok(Err(err)) => {
            loud(&format!("RSA measurement failed: {err}"));
            None
        }
        Err(err) => {
            loud(&format!("RSA measurement failed: {err}"));
            None
        }
    }
}

/// CPU per RSA-2048 operation with aws-lc-rs.
pub struct RsaCost {
    pub sign_us: f64,
    pub verify_us: f64,
    sign: BatchTiming,
    verify: BatchTiming,
}

/// Times `signs` RSA-2048 PKCS#1 v1.5 SHA-256 signatures and ten times as many
/// verifications with aws-lc-rs on the calling thread, by that thread's CPU time; the figures
/// are the median of ten batches.
fn measure_rsa(pkcs8_pem: &str, signs: usize) -> Result<RsaCost, String> {
    use aws_lc_rs::signature::{
        KeyPair, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256, RsaKeyPair, UnparsedPublicKey,
    };
    use rustls_pki_types::PrivatePkcs8KeyDer;
    use rustls_pki_types::pem::PemObject;
    let der = PrivatePkcs8KeyDer::from_pem_slice(pkcs8_pem.as_bytes())
        .map_err(|e| format!("RSA key: {e}"))?;
    let key =
        RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).map_err(|e| format!("RSA key: {e}"))?;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    // About what a seal signs: a few header fields.
    let data: Vec<u8> = (0..512u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut signature = vec![0u8; key.public_modulus_len()];
    // Parsed on every verification, as mail-auth does.
    let public = key.public_key().as_ref().to_vec();
    let sign = |signature: &mut [u8]| {
        key.sign(&RSA_PKCS1_SHA256, &rng, &data, signature)
            .map_err(|e| format!("RSA signing: {e}"))
    };
    let verify = |signature: &[u8]| {
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &public)
            .verify(&data, signature)
            .map_err(|e| format!("RSA verification: {e}"))
    };
    for _ in 0..10 {
        sign(&mut signature)?;
        verify(&signature)?;
    }
    let sign = timed_batches(signs, || sign(&mut signature))?;
    let verify = timed_batches(signs * 10, || verify(&signature))?;
    Ok(RsaCost {
        sign_us: sign.median_us,
        verify_us: verify.median_us,
        sign,
        verify,
    })
}

/// Batches an operation is timed in: the median batch is the figure, so that a moment
/// of interference (other processes, a hypervisor's steal) does not move it.
const RSA_BATCHES: usize = 10;

/// CPU per operation, by the calling thread's CPU time, over batches.
struct BatchTiming {
    median_us: f64,
    min_us: f64,
    max_us: f64,
    ops: usize,
    wall: Duration,
}

impl BatchTiming {
    fn describe(&self) -> String {
        format!(
            "{:.1} us ({} in {:.2} s; batches {:.1}..{:.1} us)",
            self.median_us,
            self.ops,
            self.wall.as_secs_f64(),
            self.min_us,
            self.max_us
        )
    }
}

fn timed_batches(
    total: usize,
    mut op: impl FnMut() -> Result<(), String>,
) -> Result<BatchTiming, String> {
    let batches = RSA_BATCHES.min(total.max(1));
    let per_batch = (total / batches).max(1);
    let mut samples = Vec::with_capacity(batches);
    let wall = Instant::now();
    for _ in 0..batches {
        let cpu = thread_cpu_seconds();
        for _ in 0..per_batch {
            op()?;
        }
        samples.push((thread_cpu_seconds() - cpu) * 1e6 / per_batch as f64);
    }
    let wall = wall.elapsed();
    samples.sort_by(f64::total_cmp);
    let middle = samples.len() / 2;
    let median_us = if samples.len() % 2 == 0 {
        (samples[middle - 1] + samples[middle]) / 2.0
    } else {
        samples[middle]
    };
    Ok(BatchTiming {
        median_us,
        min_us: samples[0],
        max_us: samples[samples.len() - 1],
        ops: per_batch * batches,
        wall,
    })
}

/// CPU time of the calling thread, in seconds.
#[allow(unsafe_code)] // clock_gettime into a local
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a local.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
