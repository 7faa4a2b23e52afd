//! The SMTP server protocol: replies, the session state machine and the
//! smuggling-safe message readers. No mail decisions are made here.

pub mod address;
pub mod data;
pub mod extensions;
pub mod metrics;
pub mod reply;
pub mod session;
