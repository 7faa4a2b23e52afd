//! The settings one SMTP session runs under, as plain data: built by whoever starts
//! the session (the pipeline, from the connection's snapshot) before it starts, and
//! never looked up again while it runs. Tests build one by hand.

use crate::config::{BareLineEndings, LongLines};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct SessionLimits {
    /// Waiting for the next command.
    pub command_timeout: Duration,
    /// Waiting for the next block of DATA/BDAT content.
    pub data_block_timeout: Duration,
    /// Writing a batch of replies.
    pub write_timeout: Duration,
    /// Client errors before `421` and close (per connection, across STARTTLS).
    pub max_errors: u32,
    /// Largest message, announced in EHLO SIZE and enforced while receiving.
    pub max_message_size: u64,
    /// Message bytes kept in memory before spooling to a file.
    pub spool_threshold: usize,
    pub spool_dir: Option<PathBuf>,
    pub bare_line_endings: BareLineEndings,
    pub long_lines: LongLines,
    pub tls: Tls,
}

/// STARTTLS as this session sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tls {
    /// No certificate configured: never offered, STARTTLS is refused.
    Unavailable,
    /// Offered in EHLO; STARTTLS ends the session with `Ending::StartTls`.
    Offered,
    /// The session already runs over TLS.
    Active,
}
