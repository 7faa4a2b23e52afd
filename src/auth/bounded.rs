//! Bounded authentication work: a message cannot make us verify more than
//! `auth.max_dkim_signatures` DKIM signatures, and the DNS look-ups of one message run
//! concurrently under one deadline (`auth.timeouts.end_of_data`).
//!
//! mail-auth 0.13's `verify_dkim` verifies every signature of a message, one after
//! another, and reports every malformed one: 400 signatures are 400 look-ups in a row
//! and 400 results. So each of the first N signatures is verified on its own (a message
//! that carries only that signature), all of them at once, each under the deadline; the
//! outputs are rebuilt to point at the signatures of the message as parsed.

use super::Authenticator;
use mail_auth::common::headers::Header;
use mail_auth::{AuthenticatedMessage, DkimOutput, DkimResult, DnsError, Error};
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;
use tokio::time::Instant;

/// Bounds on the authentication work of one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub max_dkim_signatures: usize,
    pub end_of_data: Duration,
}

impl Default for Budget {
    /// The configuration's defaults (`auth.max_dkim_signatures`, `auth.timeouts`).
    fn default() -> Self {
        let auth = crate::config::AuthConfig::default();
        Budget {
            max_dkim_signatures: auth.max_dkim_signatures.get(),
            end_of_data: auth.timeouts.end_of_data,
        }
    }
}

/// The error an unfinished check reports: a DNS temperror (RFC 8601: "a temporary
/// (recoverable) error occurred").
pub fn unfinished() -> Error {
    Error::Dns(DnsError::Resolver(
        "not finished within auth.timeouts.end_of_data".into(),
    ))
}

/// One DKIM-Signature field, in the order of the header section.
enum Field<'a, 'm> {
    Parsed(&'a Header<'m, mail_auth::dkim::Signature>),
    /// A signature that does not parse; mail-auth reports `Error::Dkim` ones as neutral.
    Broken(&'a Header<'m, Error>),
}

/// The first `max` DKIM-Signature fields in the order of the header section, parsed or
/// not, and how many were ignored.
fn first_fields<'a, 'm>(
    message: &'a AuthenticatedMessage<'m>,
    max: usize,
) -> (Vec<(usize, Field<'a, 'm>)>, usize) {
    let base = message.raw_message.as_ptr() as usize;
    let at = |value: &[u8]| (value.as_ptr() as usize).wrapping_sub(base);
    let mut fields: Vec<(usize, Field<'_, 'm>)> = message
        .dkim_headers
        .iter()
        .map(|h| (at(h.value), Field::Parsed(h)))
        .chain(
            message
                .errors
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case(b"DKIM-Signature"))
                .map(|h| (at(h.value), Field::Broken(h))),
        )
        .collect();
    fields.sort_by_key(|(offset, _)| *offset);
    let ignored = fields.len().saturating_sub(max);
    fields.truncate(max);
    (fields, ignored)
}

impl Authenticator {
    /// The key names of the signatures [`Authenticator::verify_dkim_bounded`] verifies
    /// whose key mail-auth will look up, for `prefetch`.
    pub(super) fn dkim_key_names(
        &self,
        message: &AuthenticatedMessage<'_>,
        max: usize,
    ) -> Vec<String> {
        let (fields, _) = first_fields(message, max);
        let signatures = fields.iter().filter_map(|(_, field)| match field {
            Field::Parsed(h) => Some(&h.header),
            Field::Broken(_) => None,
        });
        super::prefetch::dkim_key_names(message, signatures)
    }

    /// DKIM for the first `max` DKIM-Signature fields, concurrently, under `deadline`.
    /// Returns the outputs and how many fields were ignored.
    pub(super) async fn verify_dkim_bounded<'m>(
        &'m self,
        message: &'m AuthenticatedMessage<'m>,
        max: usize,
        deadline: Instant,
    ) -> (Vec<DkimOutput<'m>>, usize) {
        let (fields, ignored) = first_fields(message, max);
        if let [(_, Field::Parsed(_))] = fields.as_slice()
            && message.dkim_headers.len() == 1
        {
            // The common case, one signature and nothing else to bound: no copy needed.
            let verify = self.resolver.verify_dkim(self.caches.parameters(message));
            return match tokio::time::timeout_at(deadline, verify).await {
                Ok(outputs) => (outputs, ignored),
                Err(_) => (vec![output(None, &message.dkim_headers[0].header)], ignored),
            };
        }
        let checks = fields.iter().map(|(_, field)| async move {
            match field {
                Field::Broken(h) => match &h.header {
                    err @ Error::Dkim(_) => Some(DkimOutput::neutral(err.clone())),
                    _ => None,
                },
                Field::Parsed(h) => {
                    let single = with_only(message, h);
                    let verify = self.resolver.verify_dkim(self.caches.parameters(&single));
                    let result = match tokio::time::timeout_at(deadline, verify).await {
                        Ok(outputs) => outputs.first().map(|o| o.result().clone()),
                        Err(_) => None,
                    };
                    Some(output(result, &h.header))
                }
            }
        });
        let outputs = join_all(checks.collect()).await;
        (outputs.into_iter().flatten().collect(), ignored)
    }
}

/// The message as mail-auth's DKIM verifier needs it, with one signature.
fn with_only<'m>(
    message: &AuthenticatedMessage<'m>,
    signature: &Header<'m, mail_auth::dkim::Signature>,
) -> AuthenticatedMessage<'m> {
    AuthenticatedMessage {
        headers: message.headers.clone(),
        from: message.from.clone(),
        raw_message: message.raw_message,
        body_offset: message.body_offset,
        body_hashes: message.body_hashes.clone(),
        dkim_headers: vec![signature.clone()],
        ..Default::default()
    }
}

/// A signature's output rebuilt around the signature of the parsed message (`None`:
/// the check did not finish).
fn output<'m>(
    result: Option<DkimResult>,
    signature: &'m mail_auth::dkim::Signature,
) -> DkimOutput<'m> {
    let output = match result {
        Some(DkimResult::Pass) => DkimOutput::pass(),
        Some(DkimResult::Fail(err)) => DkimOutput::fail(err),
        Some(DkimResult::Neutral(err)) => DkimOutput::neutral(err),
        Some(DkimResult::PermError(err)) => DkimOutput::perm_err(err),
        Some(DkimResult::TempError(err)) => DkimOutput::temp_err(err),
        Some(DkimResult::None) | None => DkimOutput::temp_err(unfinished()),
    };
    output.with_signature(signature)
}

/// Runs futures concurrently on this task and collects their outputs in order (a handful
/// at most: the DKIM signatures of one message).
pub(super) async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}
