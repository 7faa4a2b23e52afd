//! Every SMTP reply mxgate sends is spelled in this module, and nowhere else.
//!
//! Handlers return outcomes or typed errors; this module turns them into a code, an
//! enhanced status code (RFC 3463) and text. Text that comes from the outside (addresses,
//! the backend's own reply text) passes through [`clean`] so that a peer can never make
//! us emit a CR, an LF or a control character inside a reply line.

use std::borrow::Cow;
use std::fmt;

/// An RFC 3463 enhanced status code such as `5.7.1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status(pub u8, pub u16, pub u16);

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// One complete SMTP reply: a code, an optional enhanced status and one or more lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    code: u16,
    status: Option<Status>,
    lines: Vec<Cow<'static, str>>,
    /// Why a negative reply refuses (a label of `mxgate_rejections_total`).
    reason: RejectReason,
}

/// Why a reply refuses: the closed set of labels of `mxgate_rejections_total`.
/// The label strings are part of the dashboards in `grafana/`; do not rename them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    Protocol,
    RelayDenied,
    RecipientLimit,
    Backend,
    BackendUnavailable,
    Dmarc,
    DmarcTemperror,
    EvidenceTemperror,
    InvalidFrom,
    OwnDomain,
    Policy,
    TlsRequired,
    Size,
    BareLineEnding,
    HeaderSyntax,
    HeaderLimit,
    LongLine,
    Parameters,
    ConnectionLimit,
    RateLimit,
    DataRate,
    TooManyErrors,
    Timeout,
    Shutdown,
    LocalError,
    ProxyProtocol,
    ProxyLocal,
}

impl RejectReason {
    /// Every reason, so the metric can create each series at 0 before the first event.
    pub const ALL: &'static [RejectReason] = &[
        RejectReason::Protocol,
        RejectReason::RelayDenied,
        RejectReason::RecipientLimit,
        RejectReason::Backend,
        RejectReason::BackendUnavailable,
        RejectReason::Dmarc,
        RejectReason::DmarcTemperror,
        RejectReason::EvidenceTemperror,
        RejectReason::InvalidFrom,
        RejectReason::OwnDomain,
        RejectReason::Policy,
        RejectReason::TlsRequired,
        RejectReason::Size,
        RejectReason::BareLineEnding,
        RejectReason::HeaderSyntax,
        RejectReason::HeaderLimit,
        RejectReason::LongLine,
        RejectReason::Parameters,
        RejectReason::ConnectionLimit,
        RejectReason::RateLimit,
        RejectReason::DataRate,
        RejectReason::TooManyErrors,
        RejectReason::Timeout,
        RejectReason::Shutdown,
        RejectReason::LocalError,
        RejectReason::ProxyProtocol,
        RejectReason::ProxyLocal,
    ];

    /// The metric label for this reason.
    pub fn as_label(self) -> &'static str {
        match self {
            RejectReason::Protocol => "protocol",
            RejectReason::RelayDenied => "relay_denied",
            RejectReason::RecipientLimit => "recipient_limit",
            RejectReason::Backend => "backend",
            RejectReason::BackendUnavailable => "backend_unavailable",
            RejectReason::Dmarc => "dmarc",
            RejectReason::DmarcTemperror => "dmarc_temperror",
            RejectReason::EvidenceTemperror => "evidence_temperror",
            RejectReason::InvalidFrom => "invalid_from",
            RejectReason::OwnDomain => "own_domain",
            RejectReason::Policy => "policy",
            RejectReason::TlsRequired => "tls_required",
            RejectReason::Size => "size",
            RejectReason::BareLineEnding => "bare_line_ending",
            RejectReason::HeaderSyntax => "header_syntax",
            RejectReason::HeaderLimit => "header_limit",
            RejectReason::LongLine => "long_line",
            RejectReason::Parameters => "parameters",
            RejectReason::ConnectionLimit => "connection_limit",
            RejectReason::RateLimit => "rate_limit",
            RejectReason::DataRate => "data_rate",
            RejectReason::TooManyErrors => "too_many_errors",
            RejectReason::Timeout => "timeout",
            RejectReason::Shutdown => "shutdown",
            RejectReason::LocalError => "local_error",
            RejectReason::ProxyProtocol => "proxy_protocol",
            RejectReason::ProxyLocal => "proxy_local",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_label())
    }
}

impl Reply {
    fn new(code: u16, status: Option<Status>, text: impl Into<Cow<'static, str>>) -> Self {
        Reply {
            code,
            status,
            lines: vec![text.into()],
            reason: RejectReason::Protocol,
        }
    }

    /// Tags a refusal with its reason.
    fn because(mut self, reason: RejectReason) -> Self {
        self.reason = reason;
        self
    }

    pub fn reason(&self) -> RejectReason {
        self.reason
    }

    fn with(code: u16, status: (u8, u16, u16), text: impl Into<Cow<'static, str>>) -> Self {
        Reply::new(code, Some(Status(status.0, status.1, status.2)), text)
    }

    pub fn code(&self) -> u16 {
        self.code
    }

    pub fn status(&self) -> Option<Status> {
        self.status
    }

    pub fn lines(&self) -> &[Cow<'static, str>] {
        &self.lines
    }

    /// The text of the reply, lines joined by a space (for logs and `explain`).
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// Whether this reply counts towards the session's error limit: every permanent
    /// refusal (so unknown recipients cannot be harvested without end, nor a refused
    /// MAIL repeated), and the temporary ones the client brought on itself. Not counted:
    /// `452 4.5.3` (RFC 5321 section 4.5.3.1.10 tells clients to send the remaining
    /// recipients later, so counting it would cut off the transaction before its DATA)
    /// and our own or the backend's temporary trouble.
    pub fn counts_as_client_error(&self) -> bool {
        self.code >= 500
            || (self.code >= 400
                && matches!(
                    self.reason,
                    RejectReason::Protocol
                        | RejectReason::Parameters
                        | RejectReason::RelayDenied
                        | RejectReason::Policy
                        | RejectReason::TlsRequired
                        | RejectReason::RateLimit
                ))
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// A 421 reply ends the session (RFC 5321 section 3.8).
    pub fn closes_session(&self) -> bool {
        self.code == 421
    }

    /// `2xx`, `4xx` or `5xx`: the label metrics use.
    pub fn class_label(&self) -> &'static str {
        match self.code / 100 {
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        }
    }

    /// Serialises the reply in wire format, one `code-text` line per continuation.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let last = self.lines.len().saturating_sub(1);
        for (n, line) in self.lines.iter().enumerate() {
            out.extend_from_slice(itoa3(self.code).as_slice());
            out.push(if n == last { b' ' } else { b'-' });
            if let Some(status) = self.status {
                use std::io::Write;
                let _ = write!(out, "{status}");
                if !line.is_empty() {
                    out.push(b' ');
                }
            }
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.write_to(&mut out);
        out
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(status) => write!(f, "{} {} {}", self.code, status, self.text()),
            None => write!(f, "{} {}", self.code, self.text()),
        }
    }
}

fn itoa3(code: u16) -> [u8; 3] {
    let code = code.min(999);
    [
        b'0' + (code / 100) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
    ]
}

/// Makes outside text safe to put on a reply line: control characters (CR and LF among
/// them) become spaces and the length is capped, so no peer can inject reply lines.
pub fn clean(text: &str) -> String {
    const MAX: usize = 400;
    let mut out = String::with_capacity(text.len().min(MAX));
    for ch in text.chars() {
        if out.len() >= MAX {
            out.push_str("...");
            break;
        }
        out.push(if ch.is_control() { ' ' } else { ch });
    }
    out
}

// ---------------------------------------------------------------------------------------
// Session and protocol replies.
// ---------------------------------------------------------------------------------------

impl Reply {
    pub fn greeting(hostname: &str) -> Self {
        Reply::new(220, None, format!("{hostname} ESMTP mxgate"))
    }

    /// The EHLO reply: the greeting line followed by one line per extension keyword.
    pub fn ehlo(hostname: &str, client: &str, extensions: Vec<Cow<'static, str>>) -> Self {
        let mut lines = Vec::with_capacity(extensions.len() + 1);
        lines.push(Cow::Owned(format!("{hostname} greets {}", clean(client))));
        lines.extend(extensions);
        Reply {
            code: 250,
            status: None,
            lines,
            reason: RejectReason::Protocol,
        }
    }

    pub fn helo(hostname: &str) -> Self {
        Reply::new(250, None, hostname.to_string())
    }

    pub fn ok() -> Self {
        Reply::with(250, (2, 0, 0), "OK")
    }

    pub fn mail_ok() -> Self {
        Reply::with(250, (2, 1, 0), "Sender OK")
    }

    pub fn rcpt_ok() -> Self {
        Reply::with(250, (2, 1, 5), "Recipient OK")
    }

    pub fn start_data() -> Self {
        Reply::new(354, None, "End data with <CR><LF>.<CR><LF>")
    }

    pub fn bdat_chunk_ok(size: usize) -> Self {
        Reply::with(250, (2, 0, 0), format!("{size} octets received"))
    }

    pub fn quit(hostname: &str) -> Self {
        Reply::with(221, (2, 0, 0), format!("{hostname} closing connection"))
    }

    pub fn vrfy() -> Self {
        Reply::with(
            252,
            (2, 5, 0),
            "Cannot VRFY user, but will accept message and attempt delivery",
        )
    }

    pub fn help() -> Self {
        Reply::with(
            214,
            (2, 0, 0),
            "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS",
        )
    }

    pub fn ready_to_start_tls() -> Self {
        Reply::with(220, (2, 0, 0), "Ready to start TLS")
    }

    pub fn tls_not_available() -> Self {
        Reply::with(454, (4, 7, 0), "TLS not available").because(RejectReason::TlsRequired)
    }

    pub fn tls_already_active() -> Self {
        Reply::with(503, (5, 5, 1), "TLS already active")
    }

    pub fn tls_required() -> Self {
        Reply::with(530, (5, 7, 0), "Must issue a STARTTLS command first")
            .because(RejectReason::TlsRequired)
    }

    pub fn tls_required_for_sender() -> Self {
        Reply::with(
            530,
            (5, 7, 0),
            "Must issue a STARTTLS command first: this sender requires TLS",
        )
        .because(RejectReason::TlsRequired)
    }

    pub fn bad_sequence(what: &'static str) -> Self {
        Reply::with(503, (5, 5, 1), format!("Bad sequence of commands: {what}"))
    }

    pub fn not_implemented(command: &'static str) -> Self {
        Reply::with(502, (5, 5, 1), format!("{command} not implemented"))
    }

    pub fn unknown_command() -> Self {
        Reply::with(500, (5, 5, 2), "Command unrecognized")
    }

    /// A command line that ended before its command did (`RCPT TO` with no path).
    pub fn incomplete_command() -> Self {
        Reply::with(501, (5, 5, 4), "Syntax error: the command ends too early")
    }

    pub fn line_too_long() -> Self {
        Reply::with(500, (5, 5, 2), "Line too long")
    }

    pub fn syntax(expected: &str) -> Self {
        Reply::with(501, (5, 5, 4), format!("Syntax: {}", clean(expected)))
    }

    pub fn bad_helo() -> Self {
        Reply::with(501, (5, 5, 4), "Syntax: EHLO domain-or-address-literal")
    }

    pub fn invalid_parameter(param: &str) -> Self {
        Reply::with(
            501,
            (5, 5, 4),
            format!("Invalid parameter {}", clean(param)),
        )
        .because(RejectReason::Parameters)
    }

    pub fn unsupported_parameter(param: &str) -> Self {
        Reply::with(
            555,
            (5, 5, 4),
            format!("Unsupported parameter {}", clean(param)),
        )
        .because(RejectReason::Parameters)
    }

    pub fn bad_sender_syntax() -> Self {
        Reply::with(553, (5, 1, 7), "Bad sender address syntax")
    }

    pub fn bad_recipient_syntax() -> Self {
        Reply::with(553, (5, 1, 3), "Bad recipient address syntax")
    }

    pub fn smtputf8_required() -> Self {
        Reply::with(
            553,
            (5, 6, 7),
            "Non-ASCII address requires the SMTPUTF8 parameter",
        )
        .because(RejectReason::Parameters)
    }

    pub fn smtputf8_unsupported_by_backend() -> Self {
        Reply::with(
            553,
            (5, 6, 7),
            "Non-ASCII addresses are not supported by the mailbox server",
        )
        .because(RejectReason::Parameters)
    }

    pub fn relay_denied(rcpt: &str) -> Self {
        Reply::with(
            550,
            (5, 7, 1),
            format!(
                "<{}>: Relay access denied: we do not accept mail for this domain",
                clean(rcpt)
            ),
        )
        .because(RejectReason::RelayDenied)
    }

    pub fn routed_recipient(rcpt: &str) -> Self {
        Reply::with(
            550,
            (5, 7, 1),
            format!(
                "<{}>: Relay access denied: % ! or @ in the local part routes elsewhere",
                clean(rcpt)
            ),
        )
        .because(RejectReason::RelayDenied)
    }

    pub fn too_many_recipients() -> Self {
        Reply::with(452, (4, 5, 3), "Too many recipients").because(RejectReason::RecipientLimit)
    }

    pub fn no_valid_recipients() -> Self {
        Reply::with(554, (5, 5, 1), "No valid recipients")
    }

    pub fn message_too_big_declared(max: u64) -> Self {
        Reply::with(
            552,
            (5, 3, 4),
            format!("Message size exceeds fixed maximum message size of {max} bytes"),
        )
        .because(RejectReason::Size)
    }

    pub fn message_too_big() -> Self {
        Reply::with(
            552,
            (5, 3, 4),
            "Message size exceeds fixed maximum message size",
        )
        .because(RejectReason::Size)
    }

    pub fn bare_line_ending() -> Self {
        Reply::with(
            550,
            (5, 5, 2),
            "Message contains a bare CR or LF or a NUL byte; lines must end with CRLF (see https://www.postfix.org/smtp-smuggling.html)",
        )
        .because(RejectReason::BareLineEnding)
    }

    /// A header section that two readers could take differently (see
    /// `rewrite::section`): refused rather than judged by one reading and delivered to
    /// a backend that reads another. RFC 3463 X.6.0: other media error.
    pub fn header_section_malformed(detail: &str) -> Self {
        Reply::with(
            550,
            (5, 6, 0),
            format!(
                "Message refused: malformed header section: {} (RFC 5322 section 2.2)",
                clean(detail)
            ),
        )
        .because(RejectReason::HeaderSyntax)
    }

    /// A header section over `server.max_header_size` or `server.max_header_fields`.
    pub fn header_section_too_large(detail: &str) -> Self {
        Reply::with(
            552,
            (5, 3, 4),
            format!("Message refused: {}", clean(detail)),
        )
        .because(RejectReason::HeaderLimit)
    }

    /// A text line over RFC 5321's limit of 998 octets (section 4.5.3.1.6) under
    /// `server.long_lines: reject`. 550 5.6.0 (other media error), not 552 5.3.4: the
    /// message is not too big for us, its format breaks a limit of the standard, and
    /// sending it again smaller would not help.
    pub fn line_too_long_in_message(longest: usize) -> Self {
        Reply::with(
            550,
            (5, 6, 0),
            format!(
                "Message refused: a text line is {longest} octets long; RFC 5321 section 4.5.3.1.6 allows 998 plus CRLF"
            ),
        )
        .because(RejectReason::LongLine)
    }

    pub fn too_many_errors() -> Self {
        Reply::with(421, (4, 7, 0), "Too many errors, closing connection")
            .because(RejectReason::TooManyErrors)
    }

    pub fn timeout() -> Self {
        Reply::with(421, (4, 4, 2), "Timeout, closing connection").because(RejectReason::Timeout)
    }

    pub fn shutting_down() -> Self {
        Reply::with(421, (4, 3, 2), "Service shutting down, try again later")
            .because(RejectReason::Shutdown)
    }

    pub fn too_many_connections() -> Self {
        Reply::with(421, (4, 7, 0), "Too many connections, try again later")
            .because(RejectReason::ConnectionLimit)
    }

    pub fn too_many_connections_from_ip() -> Self {
        Reply::with(
            421,
            (4, 7, 0),
            "Too many connections from your address, try again later",
        )
        .because(RejectReason::ConnectionLimit)
    }

    /// `limits.connections_per_minute` (Postfix's anvil answers the same).
    pub fn connection_rate_exceeded() -> Self {
        Reply::with(
            421,
            (4, 7, 0),
            "Too many connections from your address in the last minute, try again later",
        )
        .because(RejectReason::RateLimit)
    }

    /// `limits.messages_per_minute`, at MAIL. Counts as an error: a client that keeps
    /// sending MAIL after it is ends up disconnected.
    pub fn message_rate_exceeded() -> Self {
        Reply::with(
            450,
            (4, 7, 1),
            "Too many messages from your address, try again later",
        )
        .because(RejectReason::RateLimit)
    }

    /// `limits.recipients_per_minute`, at RCPT. Not an error (like `452 4.5.3`): the
    /// client delivers to the recipients accepted so far and sends the rest later.
    pub fn recipient_rate_exceeded() -> Self {
        Reply::with(
            450,
            (4, 7, 1),
            "Too many recipients from your address, try again later",
        )
        .because(RejectReason::RecipientLimit)
    }

    /// `limits.min_data_rate`: the message came in too slowly.
    pub fn data_rate_too_low() -> Self {
        Reply::with(421, (4, 4, 2), "Data rate too low, closing connection")
            .because(RejectReason::DataRate)
    }

    /// A balancer's own connection (PROXY `UNKNOWN` / v2 `LOCAL`) tried to send mail.
    pub fn health_check_no_mail() -> Self {
        Reply::with(
            421,
            (4, 3, 2),
            "Load balancer health check connection: no mail transactions, closing",
        )
        .because(RejectReason::ProxyLocal)
    }

    /// A peer in `server.proxy_protocol.trusted_networks` sent no valid PROXY header.
    pub fn proxy_header_required() -> Self {
        Reply::with(
            421,
            (4, 7, 0),
            "PROXY protocol header missing or invalid, closing",
        )
        .because(RejectReason::ProxyProtocol)
    }

    /// A PROXY header from outside `server.proxy_protocol.trusted_networks`.
    pub fn proxy_header_refused() -> Self {
        Reply::with(
            554,
            (5, 7, 1),
            "PROXY protocol header not accepted from your address",
        )
        .because(RejectReason::ProxyProtocol)
    }

    pub fn local_error() -> Self {
        Reply::with(451, (4, 3, 0), "Local error in processing, try again later")
            .because(RejectReason::LocalError)
    }

    /// The mailbox server refused the configured quarantine address.
    pub fn quarantine_refused() -> Self {
        Reply::with(
            451,
            (4, 3, 0),
            "Local error in processing (quarantine unavailable), try again later",
        )
        .because(RejectReason::LocalError)
    }

    pub fn spool_error() -> Self {
        Reply::with(
            452,
            (4, 3, 1),
            "Insufficient system storage, try again later",
        )
        .because(RejectReason::LocalError)
    }
}

// ---------------------------------------------------------------------------------------
// Relay (backend) replies.
// ---------------------------------------------------------------------------------------

impl Reply {
    /// A reply that the backend sent, passed through to the client. The backend's own code
    /// and enhanced status are kept; text is cleaned. A reply outside 2xx..5xx (a broken
    /// backend) becomes a temporary failure rather than something the client misreads.
    pub fn from_backend(code: u16, status: Option<Status>, lines: &[&str]) -> Self {
        // A 3xx is never a final answer to what we pass on (354 to DATA is handled by
        // the relay before this): our client could not act on one.
        if !matches!(code, 200..300 | 400..600) {
            return Reply::backend_protocol_error();
        }
        let mut out: Vec<Cow<'static, str>> = lines
            .iter()
            .take(20)
            .map(|line| Cow::Owned(clean(line)))
            .collect();
        if out.is_empty() {
            out.push(Cow::Borrowed(""));
        }
        // We offer ENHANCEDSTATUSCODES, so every reply carries one (RFC 2034 3); a
        // backend that gives none gets the class's undetailed code (RFC 3463 3.1).
        let class = (code / 100) as u8;
        let status = status.or_else(|| matches!(class, 2 | 4 | 5).then_some(Status(class, 0, 0)));
        Reply {
            code,
            status,
            lines: out,
            reason: RejectReason::Backend,
        }
    }

    pub fn backend_unavailable() -> Self {
        Reply::with(
            451,
            (4, 4, 1),
            "Mailbox server unavailable, try again later",
        )
        .because(RejectReason::BackendUnavailable)
    }

    pub fn backend_timeout() -> Self {
        Reply::with(
            451,
            (4, 4, 2),
            "Mailbox server did not answer in time, try again later",
        )
        .because(RejectReason::BackendUnavailable)
    }

    pub fn backend_connection_lost() -> Self {
        Reply::with(
            451,
            (4, 4, 2),
            "Connection to the mailbox server was lost, try again later",
        )
        .because(RejectReason::BackendUnavailable)
    }

    /// The backend said 421 (it is closing the channel). Never passed on as such: to our
    /// client a 421 would mean that *we* close the session (RFC 5321 section 3.8).
    pub fn backend_closing() -> Self {
        Reply::with(
            451,
            (4, 4, 2),
            "Mailbox server closed the connection, try again later",
        )
        .because(RejectReason::BackendUnavailable)
    }

    /// At delivery the backend refused recipients it had accepted when they were
    /// verified. There is no local queue, so no `250` for a subset: the whole message
    /// is retried.
    pub fn recipients_refused_at_delivery(refused: &[String]) -> Self {
        Reply::with(
            451,
            (4, 3, 0),
            format!(
                "Mailbox server refused {} at delivery; try again later",
                list_recipients(refused)
            ),
        )
        .because(RejectReason::Backend)
    }

    pub fn backend_busy() -> Self {
        Reply::with(451, (4, 4, 5), "Mailbox server busy, try again later")
            .because(RejectReason::BackendUnavailable)
    }

    pub fn backend_protocol_error() -> Self {
        Reply::with(
            451,
            (4, 5, 0),
            "Mailbox server sent an invalid reply, try again later",
        )
        .because(RejectReason::BackendUnavailable)
    }

    pub fn delivered(id: &str) -> Self {
        Reply::with(250, (2, 0, 0), format!("OK: queued as {id}"))
    }

    /// An LMTP backend answered each recipient separately and they disagree, but some
    /// failed temporarily: ask the client to retry the whole message. Recipients that
    /// were already delivered may see it twice; none loses it.
    pub fn partial_delivery_retry(failed: &[String]) -> Self {
        Reply::with(
            451,
            (4, 3, 0),
            format!(
                "Delivery failed temporarily for {}; try again later",
                list_recipients(failed)
            ),
        )
        .because(RejectReason::Backend)
    }

    /// An LMTP backend rejected some recipients permanently and accepted others. The
    /// client is told of the failure (so the sender learns of it and nothing is silently
    /// lost); the text says who was delivered.
    pub fn partial_delivery_failed(
        code: u16,
        status: Option<Status>,
        failed: &[String],
        delivered: &[String],
    ) -> Self {
        Reply::new(
            code.clamp(500, 599),
            status.or(Some(Status(5, 0, 0))),
            format!(
                "Delivery failed for {}; delivered to {}",
                list_recipients(failed),
                list_recipients(delivered)
            ),
        )
        .because(RejectReason::Backend)
    }
}

fn list_recipients(rcpts: &[String]) -> String {
    let mut out = String::new();
    for (n, rcpt) in rcpts.iter().take(10).enumerate() {
        if n > 0 {
            out.push_str(", ");
        }
        out.push('<');
        out.push_str(&clean(rcpt));
        out.push('>');
    }
    if rcpts.len() > 10 {
        out.push_str(&format!(" and {} more", rcpts.len() - 10));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Authentication and policy replies.
// ---------------------------------------------------------------------------------------

impl Reply {
    pub fn dmarc_reject(domain: &str, failure: &str) -> Self {
        Reply::with(
            550,
            (5, 7, 1),
            format!(
                "Message rejected: DMARC policy of {} is reject and the message failed DMARC ({})",
                clean(domain),
                clean(failure)
            ),
        )
        .because(RejectReason::Dmarc)
    }

    pub fn dmarc_temperror(domain: &str) -> Self {
        Reply::with(
            451,
            (4, 7, 5),
            format!(
                "Temporary DNS error while evaluating DMARC for {}, try again later",
                clean(domain)
            ),
        )
        .because(RejectReason::DmarcTemperror)
    }

    pub fn auth_temperror(what: &str) -> Self {
        Reply::with(
            451,
            (4, 7, 5),
            format!(
                "Temporary DNS error while evaluating {}, try again later",
                clean(what)
            ),
        )
        .because(RejectReason::DmarcTemperror)
    }

    /// A refusal for good that evidence DNS trouble kept us from checking would have
    /// spared (an `accept` rule's forward-confirmed host, SPF record or DKIM key, a
    /// trusted sealer's chain, an aligned pass for our own domain): the sender retries.
    /// `what` names the evidence, never the failing name.
    pub fn evidence_temperror(what: &str) -> Self {
        Reply::with(
            451,
            (4, 7, 5),
            format!(
                "Temporary DNS error while checking {}, try again later",
                clean(what)
            ),
        )
        .because(RejectReason::EvidenceTemperror)
    }

    /// The own-domain guard (`dmarc.protect_own_domains`): mail from outside in the name
    /// of one of our own domains, without DMARC's proof or a policy rule's evidence.
    pub fn own_domain_spoof(domain: &str) -> Self {
        Reply::with(
            550,
            (5, 7, 1),
            format!(
                "Message rejected: the From address is in our own domain {} but the message was not sent by a server of ours and does not pass DMARC",
                clean(domain)
            ),
        )
        .because(RejectReason::OwnDomain)
    }

    /// RFC 7489 section 6.6.1: a message without exactly one From header field that names
    /// a domain cannot be evaluated by DMARC; such messages are rejected.
    pub fn from_header_invalid(detail: &str) -> Self {
        Reply::with(
            550,
            (5, 7, 1),
            format!(
                "Message rejected: {} (RFC 5322 requires exactly one From header field; RFC 7489 6.6.1)",
                clean(detail)
            ),
        )
        .because(RejectReason::InvalidFrom)
    }

    /// A policy rule's own reply: admins choose code and text; the class is forced to match
    /// the action so a typo cannot turn a rejection into an acceptance.
    pub fn policy(code: u16, status: Option<Status>, text: &str) -> Self {
        Reply::new(code, status, clean(text)).because(RejectReason::Policy)
    }

    /// The same refusal as a greeting: RFC 5321 section 3.1 allows only 554 (no service
    /// here) and 421 (try later) in place of the 220 greeting.
    pub fn as_greeting(&self) -> Self {
        Reply {
            code: if self.is_permanent() { 554 } else { 421 },
            status: self.status,
            lines: self.lines.clone(),
            reason: self.reason,
        }
    }

    pub fn policy_reject_default(rule: &str) -> Self {
        Reply::with(
            550,
            (5, 7, 1),
            format!("Message rejected by policy ({})", clean(rule)),
        )
        .because(RejectReason::Policy)
    }

    pub fn policy_tempfail_default(rule: &str) -> Self {
        Reply::with(
            451,
            (4, 7, 1),
            format!(
                "Message deferred by policy ({}), try again later",
                clean(rule)
            ),
        )
        .because(RejectReason::Policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reject_reason_is_listed_once_with_its_own_label() {
        let labels: std::collections::HashSet<_> =
            RejectReason::ALL.iter().map(|r| r.as_label()).collect();
        assert_eq!(labels.len(), RejectReason::ALL.len());
        // Adding a variant without listing it in ALL fails here: the count is that of the match.
        assert_eq!(RejectReason::ALL.len(), 27);
    }

    #[test]
    fn single_line_with_status() {
        assert_eq!(Reply::mail_ok().to_wire(), b"250 2.1.0 Sender OK\r\n");
    }

    #[test]
    fn multi_line_ehlo_uses_continuations() {
        let reply = Reply::ehlo(
            "mx.test",
            "client",
            vec!["PIPELINING".into(), "8BITMIME".into()],
        );
        assert_eq!(
            String::from_utf8(reply.to_wire()).unwrap(),
            "250-mx.test greets client\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
        );
    }

    #[test]
    fn outside_text_cannot_inject_lines() {
        let reply = Reply::relay_denied("a@b\r\n250 OK");
        let wire = reply.to_wire();
        assert_eq!(wire.iter().filter(|&&b| b == b'\n').count(), 1);
        let reply = Reply::from_backend(550, Some(Status(5, 1, 1)), &["no\rsuch\nuser"]);
        assert_eq!(reply.to_wire(), b"550 5.1.1 no such user\r\n");
    }

    #[test]
    fn broken_backend_code_becomes_tempfail() {
        assert_eq!(Reply::from_backend(999, None, &["x"]).code(), 451);
        assert_eq!(Reply::from_backend(150, None, &["x"]).code(), 451);
        assert_eq!(Reply::from_backend(354, None, &["x"]).code(), 451);
        assert_eq!(Reply::from_backend(334, None, &["x"]).code(), 451);
    }
}
