//! Header changes: what we add (Received, Authentication-Results, ARC set, policy tags)
//! and what we leave out (forged Authentication-Results). Pure functions over bytes; the
//! body is never touched, so DKIM signatures and ARC seals survive.

pub mod arc;
pub mod auth_results;
pub mod headers;
pub mod metrics;
pub mod received;
pub mod section;
pub mod strip;
