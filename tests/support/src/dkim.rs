//! DKIM keys and signatures for tests: keys are generated at run time (never stored),
//! published in the test DNS, and messages are signed either by mail-auth's signer or by
//! python3-dkim's `dkimsign` (an independent implementation).

use super::dns::TestDns;
use base64::Engine;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;
use mail_auth::dkim::generate::DkimKeyPair;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer};

pub enum Algorithm {
    Rsa,
    Ed25519,
}

pub struct DkimKey {
    pub domain: String,
    pub selector: String,
    algorithm: Algorithm,
    private: Vec<u8>,
    public: Vec<u8>,
}

const SIGNED_HEADERS: [&str; 5] = ["From", "To", "Subject", "Date", "Message-ID"];

impl DkimKey {
    pub fn rsa(domain: &str, selector: &str, bits: usize) -> DkimKey {
        let pair = DkimKeyPair::generate_rsa(bits).expect("RSA key");
        let (private, public) = pair.into_inner();
        DkimKey {
            domain: domain.into(),
            selector: selector.into(),
            algorithm: Algorithm::Rsa,
            private,
            public,
        }
    }

    pub fn ed25519(domain: &str, selector: &str) -> DkimKey {
        let pair = DkimKeyPair::generate_ed25519().expect("Ed25519 key");
        let (private, public) = pair.into_inner();
        DkimKey {
            domain: domain.into(),
            selector: selector.into(),
            algorithm: Algorithm::Ed25519,
            private,
            public,
        }
    }

    /// The `_domainkey` TXT record value.
    pub fn dns_record(&self) -> String {
        let p = base64::engine::general_purpose::STANDARD.encode(&self.public);
        match self.algorithm {
            Algorithm::Rsa => format!("v=DKIM1; k=rsa; p={p}"),
            Algorithm::Ed25519 => format!("v=DKIM1; k=ed25519; p={p}"),
        }
    }

    pub fn publish(&self, dns: &TestDns) {
        dns.txt(
            &format!("{}._domainkey.{}", self.selector, self.domain),
            &self.dns_record(),
        );
    }

    /// The message (CRLF) with a DKIM-Signature prepended, signed by mail-auth.
    pub fn sign(&self, message: &str) -> String {
        let message = super::crlf(message);
        let signature = match self.algorithm {
            Algorithm::Rsa => {
                let key = RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs1(
                    PrivatePkcs1KeyDer::from(self.private.clone()),
                ))
                .expect("RSA signing key");
                DkimSigner::from_key(key)
                    .domain(&self.domain)
                    .selector(&self.selector)
                    .headers(SIGNED_HEADERS)
                    .sign(message.as_bytes())
                    .expect("sign")
                    .to_header()
            }
            Algorithm::Ed25519 => {
                let key = Ed25519Key::from_pkcs8_der(&self.private).expect("Ed25519 signing key");
                DkimSigner::from_key(key)
                    .domain(&self.domain)
                    .selector(&self.selector)
                    .headers(SIGNED_HEADERS)
                    .sign(message.as_bytes())
                    .expect("sign")
                    .to_header()
            }
        };
        format!("{signature}{message}")
    }

    /// The private key as PEM (PKCS#1 for RSA, PKCS#8 for Ed25519), for tools.
    pub fn private_pem(&self) -> String {
        let (label, der) = match self.algorithm {
            Algorithm::Rsa => ("RSA PRIVATE KEY", &self.private),
            Algorithm::Ed25519 => ("PRIVATE KEY", &self.private),
        };
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut pem = format!("-----BEGIN {label}-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(chunk).unwrap());
            pem.push('\n');
        }
        pem.push_str(&format!("-----END {label}-----\n"));
        pem
    }

    /// Signs with python3-dkim's `dkimsign` (RSA keys only), as another MTA would.
    pub fn sign_with_dkimpy(&self, message: &str) -> Option<String> {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("key.pem");
        std::fs::write(&key_path, self.private_pem()).unwrap();
        let mut child = Command::new("dkimsign")
            .arg(&self.selector)
            .arg(&self.domain)
            .arg(&key_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(super::crlf(message).as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "dkimsign failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Some(super::crlf(&String::from_utf8(output.stdout).unwrap()))
    }
}
