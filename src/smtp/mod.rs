//! The SMTP server protocol: replies, the session state machine and the
//! smuggling-safe message readers. No mail decisions are made here: the session asks
//! the [`stages::Stages`] it is given, and nothing here imports the pipeline, the
//! server or the snapshot.

pub mod address;
pub mod command;
pub mod data;
pub mod extensions;
pub mod metrics;
pub mod proxy_header;
pub mod reply;
pub mod session;
pub mod session_limits;
pub mod stages;
