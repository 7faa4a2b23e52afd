//! The ESMTP extensions we offer in the EHLO reply, and the MAIL/RCPT parameters that
//! are only valid when the matching extension was offered.

use smtp_proto::{
    MAIL_BODY_BINARYMIME, MAIL_BY_NOTIFY, MAIL_BY_RETURN, MAIL_BY_TRACE, MAIL_CONPERM,
    MAIL_REQUIRETLS, MAIL_RET_FULL, MAIL_RET_HDRS, MailFrom, RCPT_CONNEG, RCPT_NOTIFY_DELAY,
    RCPT_NOTIFY_FAILURE, RCPT_NOTIFY_NEVER, RCPT_NOTIFY_SUCCESS, RCPT_RRVS_CONTINUE,
    RCPT_RRVS_REJECT, RcptTo,
};
use std::borrow::Cow;

/// EHLO keywords, in the order we list them.
pub fn ehlo_keywords(max_size: u64, starttls: bool) -> Vec<Cow<'static, str>> {
    let mut out: Vec<Cow<'static, str>> = vec![
        "PIPELINING".into(),
        format!("SIZE {max_size}").into(),
        "8BITMIME".into(),
        "SMTPUTF8".into(),
        "ENHANCEDSTATUSCODES".into(),
        "CHUNKING".into(),
    ];
    if starttls {
        out.push("STARTTLS".into());
    }
    out
}

/// The first MAIL parameter that belongs to an extension we did not offer.
pub fn unoffered_mail_parameter(mail: &MailFrom<String>) -> Option<&'static str> {
    let f = mail.flags;
    if f & MAIL_BODY_BINARYMIME != 0 {
        return Some("BODY=BINARYMIME");
    }
    if f & (MAIL_RET_FULL | MAIL_RET_HDRS) != 0 {
        return Some("RET");
    }
    if mail.env_id.is_some() {
        return Some("ENVID");
    }
    if f & MAIL_REQUIRETLS != 0 {
        return Some("REQUIRETLS");
    }
    if f & (MAIL_BY_NOTIFY | MAIL_BY_RETURN | MAIL_BY_TRACE) != 0 || mail.by != 0 {
        return Some("BY");
    }
    if f & MAIL_CONPERM != 0 {
        return Some("CONPERM");
    }
    if mail.auth.is_some() {
        return Some("AUTH");
    }
    if mail.trans_id.is_some() || mail.mtrk.is_some() || mail.solicit.is_some() {
        return Some("MTRK");
    }
    if mail.hold_for != 0 || mail.hold_until != 0 {
        return Some("HOLDFOR");
    }
    if mail.mt_priority != 0 {
        return Some("MT-PRIORITY");
    }
    None
}

pub fn unoffered_rcpt_parameter(rcpt: &RcptTo<String>) -> Option<&'static str> {
    let f = rcpt.flags;
    if f & (RCPT_NOTIFY_SUCCESS | RCPT_NOTIFY_FAILURE | RCPT_NOTIFY_DELAY | RCPT_NOTIFY_NEVER) != 0
    {
        return Some("NOTIFY");
    }
    if rcpt.orcpt.is_some() {
        return Some("ORCPT");
    }
    if f & (RCPT_RRVS_REJECT | RCPT_RRVS_CONTINUE) != 0 || rcpt.rrvs != 0 {
        return Some("RRVS");
    }
    if f & RCPT_CONNEG != 0 {
        return Some("CONNEG");
    }
    None
}
