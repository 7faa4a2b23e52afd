//! What mail-auth reads leniently, checked strictly before its ARC and DKIM results are
//! trusted: the tag-lists of ARC-Seal and ARC-Message-Signature (RFC 6376 section 3.2,
//! RFC 8617 section 4.1) and the algorithms RFC 8301 forbids.
//!
//! Contract: these functions only find reasons to distrust a pass; they never turn a
//! failure into a pass. A tag-list that does not follow the ABNF (an empty tag, a tag
//! given twice, an invalid tag name), a missing required tag (tag names are
//! case-sensitive, so `S=` is not `s=`), an algorithm other than `rsa-sha256` /
//! `ed25519-sha256`, or an AMS whose `h=` lists ARC-Seal fails the whole ARC chain.

use mail_auth::common::crypto::Algorithm;
use mail_auth::{AuthenticatedMessage, DkimOutput};

const ARC_SEAL: &[u8] = b"ARC-Seal";
const ARC_MESSAGE_SIGNATURE: &[u8] = b"ARC-Message-Signature";

/// Required tags (RFC 8617 4.1.1 and 4.1.2; `t=` on a seal is recommended only).
const SEAL_TAGS: &[&str] = &["i", "a", "b", "cv", "d", "s"];
const SIGNATURE_TAGS: &[&str] = &["i", "a", "b", "bh", "d", "h", "s"];

/// The first reason the message's ARC header fields cannot be trusted, if any.
pub fn arc_problem(headers: &[(&[u8], &[u8])]) -> Option<String> {
    for (name, value) in headers {
        let (kind, required) = if name.eq_ignore_ascii_case(ARC_SEAL) {
            ("ARC-Seal", SEAL_TAGS)
        } else if name.eq_ignore_ascii_case(ARC_MESSAGE_SIGNATURE) {
            ("ARC-Message-Signature", SIGNATURE_TAGS)
        } else {
            continue;
        };
        if let Err(why) = check_arc_header(value, required) {
            return Some(format!("{kind}: {why}"));
        }
    }
    None
}

fn check_arc_header(value: &[u8], required: &[&str]) -> Result<(), String> {
    let tags = tag_list(value)?;
    for tag in required {
        if !tags.iter().any(|(name, _)| name == tag) {
            return Err(format!("no {tag}= tag"));
        }
    }
    for (name, value) in &tags {
        match *name {
            "a" => check_algorithm(value)?,
            "h" if value
                .split(':')
                .any(|field| field.trim().eq_ignore_ascii_case("arc-seal")) =>
            {
                return Err("h= signs ARC-Seal (RFC 8617 4.1.2)".into());
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_algorithm(value: &str) -> Result<(), String> {
    match value {
        "rsa-sha256" | "ed25519-sha256" => Ok(()),
        "rsa-sha1" => Err("a=rsa-sha1 is not accepted (RFC 8301)".into()),
        other => Err(format!("unknown algorithm a={other}")),
    }
}

/// RFC 6376 section 3.2: `tag-list = tag-spec *( ";" tag-spec ) [ ";" ]`,
/// `tag-name = ALPHA *ALNUMPUNC`, `tag-value` of VALCHARs separated by whitespace;
/// duplicate names make the whole list invalid. Values come back with their whitespace
/// (folding included) removed.
fn tag_list(value: &[u8]) -> Result<Vec<(&str, String)>, String> {
    let text = std::str::from_utf8(value).map_err(|_| "bytes that are not UTF-8".to_string())?;
    let specs: Vec<&str> = text.split(';').collect();
    let mut tags: Vec<(&str, String)> = Vec::with_capacity(specs.len());
    for (n, spec) in specs.iter().enumerate() {
        let spec = spec.trim_matches(is_fws);
        if spec.is_empty() {
            // Only the optional `;` after the last tag may leave nothing behind it.
            if n + 1 == specs.len() && n > 0 {
                continue;
            }
            return Err("an empty tag".into());
        }
        let (name, value) = spec
            .split_once('=')
            .ok_or_else(|| format!("{spec:?} is not a tag"))?;
        let name = name.trim_matches(is_fws);
        let valid_name = name.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_name {
            return Err(format!("invalid tag name {name:?}"));
        }
        if tags.iter().any(|(seen, _)| *seen == name) {
            return Err(format!("{name}= given twice"));
        }
        let value: String = value.chars().filter(|c| !is_fws(*c)).collect();
        if let Some(bad) = value
            .bytes()
            .find(|b| !(0x21..=0x7e).contains(b) || *b == b';')
        {
            return Err(format!("{name}= holds byte 0x{bad:02x}"));
        }
        tags.push((name, value));
    }
    Ok(tags)
}

fn is_fws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// RFC 8301 section 3.1: verifiers MUST NOT consider `rsa-sha1` signatures valid. A
/// passing rsa-sha1 signature is turned into a failure (for DMARC too); the reason is
/// what `dkim=fail` shows. So is one whose key look-up failed: it could not pass with
/// the key in hand either, so DNS trouble must not make it count as undecided evidence.
pub const RSA_SHA1_REFUSED: &str = "rsa-sha1 is not accepted (RFC 8301)";

pub fn refuse_rsa_sha1<'m>(outputs: &mut [DkimOutput<'m>], message: &'m AuthenticatedMessage<'m>) {
    use mail_auth::{DkimResult, Error, dkim::DkimError};
    for output in outputs.iter_mut() {
        let refused = output
            .signature()
            .is_some_and(|s| s.a == Algorithm::RsaSha1)
            && matches!(output.result(), DkimResult::Pass | DkimResult::TempError(_));
        if !refused {
            continue;
        }
        // The output borrows the signature from the message; find it there again.
        let signature = output.signature().and_then(|s| {
            message
                .dkim_headers
                .iter()
                .find(|h| std::ptr::eq(&h.header, s))
        });
        let failed = DkimOutput::fail(Error::Dkim(DkimError::UnsupportedAlgorithm));
        *output = match signature {
            Some(header) => failed.with_signature(&header.header),
            None => failed,
        };
    }
}

/// Whether a DKIM output is one [`refuse_rsa_sha1`] refused.
pub fn is_refused_rsa_sha1(output: &DkimOutput<'_>) -> bool {
    use mail_auth::{DkimResult, Error, dkim::DkimError};
    output
        .signature()
        .is_some_and(|s| s.a == Algorithm::RsaSha1)
        && matches!(
            output.result(),
            DkimResult::Fail(Error::Dkim(DkimError::UnsupportedAlgorithm))
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEAL: &str =
        "i=1; a=rsa-sha256; cv=none; d=example.org; s=dummy; t=12345; b=AbC\r\n\tdEf=";

    fn seal(value: &str) -> Option<String> {
        arc_problem(&[(b"ARC-Seal".as_slice(), value.as_bytes())])
    }

    #[test]
    fn a_valid_seal_passes() {
        assert_eq!(seal(SEAL), None);
        assert_eq!(seal(&format!("{SEAL};")), None);
    }

    #[test]
    fn lenient_readings_are_refused() {
        for (bad, why) in [
            (SEAL.replace("s=dummy", "S=dummy"), "no s= tag"),
            (format!("{SEAL}; s=other"), "s= given twice"),
            (SEAL.replace("; t=", ";; t="), "an empty tag"),
            (format!("_=x; {SEAL}"), "invalid tag name"),
            (SEAL.replace("a=rsa-sha256; ", ""), "no a= tag"),
            (SEAL.replace("rsa-sha256", "rsa-sha1"), "rsa-sha1"),
        ] {
            let problem = seal(&bad).unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(problem.contains(why), "{problem}");
        }
        let ams = "i=1; a=rsa-sha256; d=example.org; s=dummy; h=from:to:ARC-Seal; bh=x; b=y";
        assert!(
            arc_problem(&[(b"arc-message-signature".as_slice(), ams.as_bytes())])
                .unwrap()
                .contains("ARC-Seal")
        );
    }
}
