//! `mxgate keygen`: a new ARC sealing key and the DNS record to publish for it.

use base64::Engine;
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyAlgorithm {
    Rsa,
    Ed25519,
}

pub struct Generated {
    /// PKCS#8 PEM.
    pub private_pem: String,
    /// The `_domainkey` TXT record value.
    pub record: String,
}

/// Generates a key pair. RSA keys are 2048 bits unless asked otherwise (RFC 8301:
/// at least 1024, and 2048 is what verifiers expect today).
pub fn generate(algorithm: KeyAlgorithm, bits: usize) -> Result<Generated, String> {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    match algorithm {
        KeyAlgorithm::Rsa => {
            if !(2048..=8192).contains(&bits) {
                return Err(format!("RSA keys must have 2048 to 8192 bits, not {bits}"));
            }
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits)
                .map_err(|e| format!("cannot generate an RSA key: {e}"))?;
            let private_pem = key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| format!("cannot encode the key: {e}"))?
                .to_string();
            // SubjectPublicKeyInfo, the form OpenDKIM and every verifier accept.
            let public = key
                .to_public_key()
                .to_public_key_der()
                .map_err(|e| format!("cannot encode the public key: {e}"))?;
            Ok(Generated {
                private_pem,
                record: format!("v=DKIM1; k=rsa; p={}", b64(public.as_bytes())),
            })
        }
        KeyAlgorithm::Ed25519 => {
            let pkcs8 = mail_auth::common::crypto::Ed25519Key::generate_pkcs8()
                .map_err(|e| format!("cannot generate an Ed25519 key: {e}"))?;
            let key = mail_auth::common::crypto::Ed25519Key::from_pkcs8_der(&pkcs8)
                .map_err(|e| format!("cannot read the generated key: {e}"))?;
            let mut private_pem = String::from("-----BEGIN PRIVATE KEY-----\n");
            for line in b64(&pkcs8).as_bytes().chunks(64) {
                private_pem.push_str(std::str::from_utf8(line).unwrap_or_default());
                private_pem.push('\n');
            }
            private_pem.push_str("-----END PRIVATE KEY-----\n");
            Ok(Generated {
                private_pem,
                record: format!("v=DKIM1; k=ed25519; p={}", b64(&key.public_key())),
            })
        }
    }
}

/// The record in zone-file syntax, split into quoted strings of at most 255 octets.
pub fn zone_line(selector: &str, domain: &str, record: &str) -> String {
    let strings: Vec<String> = record
        .as_bytes()
        .chunks(250)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!(
        "{selector}._domainkey.{domain}. IN TXT ( {} )",
        strings.join("\n    ")
    )
}

/// Runs the command; returns the exit code.
pub fn run(
    algorithm: KeyAlgorithm,
    bits: usize,
    domain: &str,
    selector: &str,
    out: &Path,
    force: bool,
) -> i32 {
    if out.exists() && !force {
        eprintln!("{} exists; use --force to replace it", out.display());
        return 1;
    }
    let domain = match crate::config::DomainName::parse(domain) {
        Ok(d) => d,
        Err(err) => {
            eprintln!("{err}");
            return 1;
        }
    };
    let generated = match generate(algorithm, bits) {
        Ok(g) => g,
        Err(err) => {
            eprintln!("{err}");
            return 1;
        }
    };
    if let Err(err) = crate::tls::write_private(out, generated.private_pem.as_bytes()) {
        eprintln!("{err}");
        return 1;
    }
    println!("Wrote the private key to {} (mode 0600).", out.display());
    println!();
    println!("Publish this TXT record:");
    println!();
    println!(
        "{}",
        zone_line(selector, domain.as_str(), &generated.record)
    );
    println!();
    println!("Then configure mxgate:");
    println!();
    println!(
        "arc:\n  domain: {domain}\n  selector: {selector}\n  private_key: {}",
        out.display()
    );
    println!();
    println!("`mxgate check` verifies that the published key matches.");
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_load_as_sealing_keys() {
        let dir = tempfile::tempdir().unwrap();
        for algorithm in [KeyAlgorithm::Ed25519, KeyAlgorithm::Rsa] {
            let generated = generate(algorithm, 2048).unwrap();
            let path = dir.path().join("key.pem");
            std::fs::write(&path, &generated.private_pem).unwrap();
            let key = crate::rewrite::arc::SigningKeyPair::load(&path).unwrap();
            assert_eq!(
                key.algorithm(),
                match algorithm {
                    KeyAlgorithm::Rsa => "rsa",
                    KeyAlgorithm::Ed25519 => "ed25519",
                }
            );
            assert!(generated.record.starts_with("v=DKIM1; k="));
        }
        assert!(generate(KeyAlgorithm::Rsa, 1024).is_err());
    }

    #[test]
    fn zone_line_splits_long_records() {
        let line = zone_line("s", "example.test", &"x".repeat(600));
        assert_eq!(line.matches('"').count(), 6);
    }
}
