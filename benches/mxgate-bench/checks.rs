//! Sender checks: the sender's DNS zone (the test kit's DNS server in this process),
//! the DKIM-signed messages the checking modes send, and the gateway's counters of what
//! its checks found.

use crate::load::{Prepared, build_message};
use crate::{ARC_DOMAIN, ARC_SELECTOR, DKIM_SELECTOR, HELO_NAME, SENDER_DOMAIN};
use mxgate_test_kit::dns;
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The sender's DNS zone, served by the test suite's DNS server in this process.
pub struct SenderZone {
    pub dns: dns::TestDns,
    /// The DKIM signing key (PKCS#8 PEM).
    pub dkim_pem: String,
    /// The ARC sealing key (PKCS#8 PEM) and the file the gateway reads it from.
    arc_pem: Option<String>,
    pub arc_key: Option<PathBuf>,
}

impl SenderZone {
    /// Starts the DNS server and publishes SPF for the sender domain and the HELO name,
    /// DMARC p=reject and a new RSA-2048 DKIM key; with `seal`, also a new RSA-2048 ARC
    /// key for the gateway, written to `dir`.
    pub async fn start(dir: &Path, seal: bool) -> Result<SenderZone, String> {
        use mxgate::keygen::{KeyAlgorithm, generate};
        let dns = dns::TestDns::start().await;
        let spf = "v=spf1 ip4:127.0.0.0/8 -all";
        dns.txt(SENDER_DOMAIN, spf);
        dns.txt(HELO_NAME, spf);
        dns.txt(&format!("_dmarc.{SENDER_DOMAIN}"), "v=DMARC1; p=reject");
        let dkim = generate(KeyAlgorithm::Rsa, 2048)?;
        dns.txt(
            &format!("{DKIM_SELECTOR}._domainkey.{SENDER_DOMAIN}"),
            &dkim.record,
        );
        let (arc_pem, arc_key) = if seal {
            let arc = generate(KeyAlgorithm::Rsa, 2048)?;
            let path = dir.join("arc-key.pem");
            std::fs::write(&path, &arc.private_pem)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            dns.txt(
                &format!("{ARC_SELECTOR}._domainkey.{ARC_DOMAIN}"),
                &arc.record,
            );
            (Some(arc.private_pem), Some(path))
        } else {
            (None, None)
        };
        Ok(SenderZone {
            dns,
            dkim_pem: dkim.private_pem,
            arc_pem,
            arc_key,
        })
    }

    /// The gateway's `dns:` section: this server only.
    pub fn config(&self) -> String {
        format!(
            "dns:\n  nameservers: [\"{}\"]\n  timeout: 2s\n  attempts: 2\n  cache_entries: 10000\n",
            self.dns.addr
        )
    }

    /// An RSA-2048 key for the floor measurement: the sealing key when there is one.
    pub fn rsa_pem(&self) -> &str {
        self.arc_pem.as_deref().unwrap_or(&self.dkim_pem)
    }
}

/// `count` messages DKIM-signed by the sender domain (rsa-sha256, relaxed/relaxed), each
/// `size` bytes with its DKIM-Signature, each with its own Message-ID.
pub fn signed_pool(size: usize, count: usize, pkcs8_pem: &str) -> Result<Vec<Prepared>, String> {
    use mail_auth::common::crypto::{RsaKey, Sha256};
    use mail_auth::common::headers::HeaderWriter;
    use mail_auth::dkim::{Canonicalization, DkimSigner};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let der = PrivatePkcs8KeyDer::from_pem_slice(pkcs8_pem.as_bytes())
        .map_err(|e| format!("DKIM key: {e}"))?;
    let key = RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs8(der))
        .map_err(|e| format!("DKIM key: {e}"))?;
    let signer = DkimSigner::from_key(key)
        .domain(SENDER_DOMAIN)
        .selector(DKIM_SELECTOR)
        .headers([
            "From",
            "To",
            "Subject",
            "Date",
            "Message-ID",
            "MIME-Version",
            "Content-Type",
        ])
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed);
    // The DKIM-Signature's length: a first guess, corrected by the first signature.
    let mut overhead = 0;
    let mut pool = Vec::with_capacity(count);
    for n in 0..count {
        let id = format!("{n:06}");
        let mut attempt = 0;
        let signed = loop {
            let unsigned = build_message(size.saturating_sub(overhead), &id);
            let content = &unsigned[..unsigned.len() - 3];
            let header = signer
                .sign(content)
                .map_err(|e| format!("DKIM signing: {e}"))?
                .to_header();
            attempt += 1;
            if header.len() == overhead || attempt == 3 {
                let mut signed = header.into_bytes();
                signed.extend_from_slice(&unsigned);
                break signed;
            }
            overhead = header.len();
        };
        pool.push(Prepared::new(signed));
    }
    Ok(pool)
}

/// The gateway's counters of what the checks found: `check=result` from
/// `mxgate_auth_results_total`, `arc_seal=result` from `mxgate_arc_seals_total` and
/// `dns_cache_<type>=<hit|miss>` from `mxgate_dns_cache_requests_total`.
pub async fn outcome_counters(metrics: SocketAddr) -> Result<BTreeMap<String, u64>, String> {
    let fetch = async {
        let mut stream = TcpStream::connect(metrics).await?;
        // HTTP/1.0: the body ends when the connection closes, never chunked.
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut body = Vec::new();
        stream.read_to_end(&mut body).await?;
        Ok::<_, io::Error>(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .map_err(|_| "metrics: timeout".to_string())?
        .map_err(|e| format!("metrics: {e}"))?;
    let text = String::from_utf8_lossy(&body);
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let (kind, rest) = if let Some(rest) = line.strip_prefix("mxgate_auth_results_total{") {
            ("auth", rest)
        } else if let Some(rest) = line.strip_prefix("mxgate_arc_seals_total{") {
            ("seal", rest)
        } else if let Some(rest) = line.strip_prefix("mxgate_dns_cache_requests_total{") {
            ("dns", rest)
        } else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let label = |name: &str| {
            labels.split(',').find_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                (key.trim() == name).then(|| value.trim().trim_matches('"').to_string())
            })
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let key = match kind {
            "auth" => format!(
                "{}={}",
                label("check").unwrap_or_default(),
                label("result").unwrap_or_default()
            ),
            "seal" => format!("arc_seal={}", label("result").unwrap_or_default()),
            _ => format!(
                "dns_cache_{}={}",
                label("type").unwrap_or_default(),
                label("result").unwrap_or_default()
            ),
        };
        *out.entry(key).or_default() += value as u64;
    }
    Ok(out)
}
