//! ARC sealing (RFC 8617): our verdict, signed, so that a downstream that trusts us
//! (Exchange Online's trusted ARC sealers, Google) keeps it after an internal relay
//! re-sends the message from its own address.
//!
//! Each relayed message gets ARC-Authentication-Results (our Authentication-Results),
//! ARC-Message-Signature and ARC-Seal with the next instance number and `cv=` from the
//! validation of the incoming chain. A chain whose last seal says `cv=fail`, or that
//! already has 50 sets, is not sealed again. The message itself is never changed: only
//! header fields are added, so DKIM signatures survive.

use mail_auth::arc::ArcSealer;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::Done;
use mail_auth::{ArcOutput, AuthenticatedMessage, AuthenticationResults};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use std::path::Path;

/// Header fields the ARC-Message-Signature covers (those present in the message). They
/// are the ones relays leave alone; Received and Authentication-Results are not signed.
const SIGNED_HEADERS: [&str; 12] = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "DKIM-Signature",
];

/// What became of one relayed message's ARC seal: the closed set of labels of
/// `mxgate_arc_seals_total` (dashboards depend on the strings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealOutcome {
    Sealed,
    SkippedChainFailed,
    SkippedChainFull,
    Error,
}

impl SealOutcome {
    pub const ALL: &'static [SealOutcome] = &[
        SealOutcome::Sealed,
        SealOutcome::SkippedChainFailed,
        SealOutcome::SkippedChainFull,
        SealOutcome::Error,
    ];

    pub fn as_label(self) -> &'static str {
        match self {
            SealOutcome::Sealed => "sealed",
            SealOutcome::SkippedChainFailed => "skipped_chain_failed",
            SealOutcome::SkippedChainFull => "skipped_chain_full",
            SealOutcome::Error => "error",
        }
    }
}

/// RFC 8617 section 4.2.1: at most 50 ARC sets.
pub const MAX_ARC_SETS: u32 = 50;

/// A private key loaded from PEM: RSA (PKCS#1 or PKCS#8) or Ed25519 (PKCS#8).
pub enum SigningKeyPair {
    Rsa(RsaKey<Sha256>),
    Ed25519(Ed25519Key),
}

impl SigningKeyPair {
    pub fn load(path: &Path) -> Result<SigningKeyPair, String> {
        let der = PrivateKeyDer::from_pem_file(path)
            .map_err(|e| format!("cannot read private key {}: {e}", path.display()))?;
        match der {
            PrivateKeyDer::Pkcs1(_) => RsaKey::<Sha256>::from_key_der(der)
                .map(SigningKeyPair::Rsa)
                .map_err(|e| format!("invalid RSA key in {}: {e}", path.display())),
            PrivateKeyDer::Pkcs8(pkcs8) => {
                let bytes = pkcs8.secret_pkcs8_der().to_vec();
                if let Ok(key) = Ed25519Key::from_pkcs8_der(&bytes) {
                    return Ok(SigningKeyPair::Ed25519(key));
                }
                RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs8(bytes.into()))
                    .map(SigningKeyPair::Rsa)
                    .map_err(|e| {
                        format!(
                            "{} is neither an RSA (2048 bits or more) nor an Ed25519 key: {e}",
                            path.display()
                        )
                    })
            }
            _ => Err(format!(
                "{}: only RSA and Ed25519 keys can sign ARC seals",
                path.display()
            )),
        }
    }

    pub fn algorithm(&self) -> &'static str {
        match self {
            SigningKeyPair::Rsa(_) => "rsa",
            SigningKeyPair::Ed25519(_) => "ed25519",
        }
    }

    /// The public key as it goes into the DNS record's `p=`.
    pub fn public_key(&self) -> Vec<u8> {
        match self {
            SigningKeyPair::Rsa(key) => key.public_key(),
            SigningKeyPair::Ed25519(key) => key.public_key(),
        }
    }
}

enum Inner {
    Rsa(ArcSealer<RsaKey<Sha256>, Done>),
    Ed25519(ArcSealer<Ed25519Key, Done>),
}

pub struct Sealer {
    pub domain: String,
    pub selector: String,
    inner: Inner,
}

/// Why a message was not sealed.
#[derive(Debug, PartialEq, Eq)]
pub enum NotSealed {
    /// The incoming chain already failed (its last seal says `cv=fail`).
    ChainFailed,
    /// 50 sets already.
    ChainFull,
    Error(String),
}

impl Sealer {
    pub fn new(key: SigningKeyPair, domain: &str, selector: &str) -> Sealer {
        let inner = match key {
            SigningKeyPair::Rsa(key) => Inner::Rsa(
                ArcSealer::from_key(key)
                    .domain(domain)
                    .selector(selector)
                    .headers(SIGNED_HEADERS),
            ),
            SigningKeyPair::Ed25519(key) => Inner::Ed25519(
                ArcSealer::from_key(key)
                    .domain(domain)
                    .selector(selector)
                    .headers(SIGNED_HEADERS),
            ),
        };
        Sealer {
            domain: domain.to_string(),
            selector: selector.to_string(),
            inner,
        }
    }

    /// The three ARC header fields to prepend. `message` is the message as it will be
    /// relayed (without the header fields we add), `incoming` the validation of its
    /// chain, and `results` our Authentication-Results value on one line.
    pub fn seal(
        &self,
        message: &AuthenticatedMessage<'_>,
        incoming: &ArcOutput<'_>,
        results: &str,
    ) -> Result<Vec<u8>, NotSealed> {
        // Instance numbers run from 1 to 50 (RFC 8617 4.2.1): count the sets and look at
        // the last number, which a broken chain may have pushed past its count.
        let last_instance = incoming.sets().last().map_or(0, |set| set.seal.header.i);
        if incoming.sets().len() as u32 >= MAX_ARC_SETS || last_instance >= MAX_ARC_SETS {
            return Err(NotSealed::ChainFull);
        }
        if !incoming.can_be_sealed() {
            return Err(NotSealed::ChainFailed);
        }
        // mail-auth signs the AAR value as given; relaxed canonicalisation (which every
        // verifier applies) collapses white space, so give it the collapsed form.
        let one_line = collapse_whitespace(results);
        let aar = AuthenticationResults::new(&one_line);
        let set = match &self.inner {
            Inner::Rsa(sealer) => sealer.seal(message, &aar, incoming),
            Inner::Ed25519(sealer) => sealer.seal(message, &aar, incoming),
        }
        .map_err(|e| NotSealed::Error(e.to_string()))?;
        let written = set.to_header();
        Ok(refold_results(&written, &one_line).into_bytes())
    }
}

/// Turns every run of white space into one space and trims the ends.
pub fn collapse_whitespace(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// mail-auth writes ARC-Authentication-Results on one (long) line; fold it at `; `
/// boundaries. Replacing a single space by CRLF + TAB leaves the relaxed form, and so
/// the seal, unchanged.
fn refold_results(headers: &str, one_line: &str) -> String {
    let Some(start) = headers.find("ARC-Authentication-Results: ") else {
        return headers.to_string();
    };
    let end = headers[start..]
        .find("\r\n")
        .map_or(headers.len(), |p| start + p + 2);
    let line = &headers[start..end];
    if !line.contains(one_line) || line.len() <= 78 {
        return headers.to_string();
    }
    let mut folded = String::with_capacity(line.len() + 64);
    let mut width = 0;
    for (n, piece) in line.trim_end_matches("\r\n").split("; ").enumerate() {
        if n > 0 {
            if width + piece.len() + 2 > 78 {
                folded.push_str(";\r\n\t");
                width = 8;
            } else {
                folded.push_str("; ");
                width += 2;
            }
        }
        folded.push_str(piece);
        width += piece.len();
    }
    folded.push_str("\r\n");
    format!("{}{}{}", &headers[..start], folded, &headers[end..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refolding_keeps_the_relaxed_form() {
        let value = format!(
            "mx.test; spf=pass smtp.mailfrom=a@b.test; {}; dmarc=pass header.from=b.test",
            "dkim=pass header.d=b.test header.s=sel"
        );
        let headers = format!(
            "ARC-Seal: i=1; x\r\nARC-Message-Signature: i=1; y\r\nARC-Authentication-Results: i=1; {value}\r\n"
        );
        let folded = refold_results(&headers, &value);
        assert!(folded.contains(";\r\n\t"), "{folded}");
        let relaxed = |h: &str| collapse_whitespace(&h.replace("\r\n", ""));
        assert_eq!(relaxed(&folded), relaxed(&headers));
        assert!(folded.lines().all(|l| l.len() <= 78), "{folded}");
    }
}
