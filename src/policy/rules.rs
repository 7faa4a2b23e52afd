//! Compiled rules: conditions over facts, and what a match does. Pure data and pure
//! evaluation; facts that need DNS are gathered by the pipeline before evaluating.

use crate::config::Network;
use crate::findings::AuthResult;
use crate::smtp::reply::Reply;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// A host or domain name: exact, or `*.suffix` for any name below `suffix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamePattern {
    Exact(String),
    Below(String),
}

impl NamePattern {
    pub fn matches(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.');
        match self {
            NamePattern::Exact(exact) => name.eq_ignore_ascii_case(exact),
            NamePattern::Below(suffix) => {
                name.len() > suffix.len() + 1
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
                    && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

/// Evidence must name something a stranger cannot get: anyone can register a name under
/// a top-level domain (`*.com`), and anyone can rent an address in a network wider than
/// a /8 (IPv4) or a /16 (IPv6). Without a public-suffix list, `*.co.uk` is not caught.
pub fn too_broad_to_authenticate(condition: &Condition) -> Vec<(usize, String)> {
    match condition {
        Condition::ClientHost(names) | Condition::DkimDomain(names) => names
            .iter()
            .enumerate()
            .filter(|(_, n)| matches!(n, NamePattern::Below(suffix) if !suffix.contains('.')))
            .map(|(i, n)| (i, n.to_string()))
            .collect(),
        Condition::ClientIp(networks) => networks
            .iter()
            .enumerate()
            .filter(|(_, n)| network_too_broad(n))
            .map(|(i, n)| (i, n.0.to_string()))
            .collect(),
        _ => Vec::new(),
    }
}

fn network_too_broad(network: &Network) -> bool {
    match network.0 {
        ipnet::IpNet::V4(net) => net.prefix_len() < 8,
        ipnet::IpNet::V6(net) => {
            // `::ffff:0:0/96` and wider spell IPv4 networks: judge them as IPv4.
            let mapped =
                ipnet::Ipv6Net::new(std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96)
                    .is_ok_and(|v4| v4.contains(&net.network()) && net.prefix_len() >= 96);
            if mapped {
                net.prefix_len() < 96 + 8
            } else {
                net.prefix_len() < 16
            }
        }
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamePattern::Exact(name) => f.write_str(name),
            NamePattern::Below(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// An address (`local@domain`) or a domain pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressPattern {
    Address(String),
    Domain(NamePattern),
}

impl AddressPattern {
    pub fn matches(&self, address: &str) -> bool {
        match self {
            AddressPattern::Address(exact) => address.eq_ignore_ascii_case(exact),
            AddressPattern::Domain(pattern) => address
                .rsplit_once('@')
                .is_some_and(|(_, domain)| pattern.matches(domain)),
        }
    }
}

impl fmt::Display for AddressPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressPattern::Address(address) => f.write_str(address),
            AddressPattern::Domain(pattern) => pattern.fmt(f),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    ClientIp(Vec<Network>),
    ClientHost(Vec<NamePattern>),
    Helo(Vec<NamePattern>),
    SpfRecord(Vec<String>),
    EnvelopeFrom(Vec<AddressPattern>),
    HeaderFrom(Vec<AddressPattern>),
    DkimDomain(Vec<NamePattern>),
    Spf(Vec<AuthResult>),
    Dmarc(Vec<AuthResult>),
    Arc(Vec<AuthResult>),
    Iprev(Vec<AuthResult>),
    Rcpt(Vec<AddressPattern>),
    Tls(bool),
    TlsVersion(Vec<String>),
    /// Every header From address is in one of `server.domains` (or below one).
    OwnDomain(bool),
}

/// The SMTP stage at which a rule decided: each knows more facts than the one before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Mail,
    Rcpt,
    Data,
}

impl Stage {
    pub const ALL: &'static [Stage] = &[Stage::Connect, Stage::Mail, Stage::Rcpt, Stage::Data];

    /// The stage's name in logs and `explain`.
    pub fn as_label(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
            Stage::Data => "data",
        }
    }
}

/// A known condition's value: three-valued, so that DNS trouble is never mistaken for a
/// clean "no". `Temperror`: the condition could hold, but a look-up it depends on failed
/// or did not finish (a PTR that timed out, an SPF record that SERVFAILed, a DKIM key
/// that never came). A permanent answer (`fail`, no such record) is `False`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Truth {
    True,
    False,
    Temperror,
}

impl Truth {
    /// The first of `items` that holds decides; otherwise any temperror; otherwise false.
    fn any<T>(items: impl IntoIterator<Item = T>, mut test: impl FnMut(T) -> Truth) -> Truth {
        let mut found = Truth::False;
        for item in items {
            match test(item) {
                Truth::True => return Truth::True,
                Truth::Temperror => found = Truth::Temperror,
                Truth::False => {}
            }
        }
        found
    }

    /// A fact that holds, or failed only for DNS trouble, or did not.
    fn of(holds: bool, temperror: bool) -> Truth {
        match (holds, temperror) {
            (true, _) => Truth::True,
            (false, true) => Truth::Temperror,
            (false, false) => Truth::False,
        }
    }

    /// The word `explain` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Truth::True => "true",
            Truth::False => "false",
            Truth::Temperror => "temperror",
        }
    }
}

/// What is known about a message at some stage; `None` means "not known yet".
#[derive(Clone, Debug, Default)]
pub struct Facts<'a> {
    pub client_ip: Option<IpAddr>,
    /// Forward-confirmed host names.
    pub client_hosts: Option<&'a [String]>,
    /// Host names that may be the client's but could not be confirmed for DNS trouble
    /// (`IprevCheck::unsure`).
    pub unsure_hosts: &'a [String],
    pub helo: Option<&'a str>,
    /// For each SPF record name the policy uses: its result for the client IP (`pass`:
    /// authorised).
    pub spf_records: Option<&'a HashMap<String, AuthResult>>,
    pub envelope_from: Option<&'a str>,
    /// At RCPT, the recipient being decided; at the end of data, all of them (an `rcpt`
    /// condition of an `accept` must hold for each, of any other action for one).
    pub rcpts: Option<&'a [String]>,
    /// `Some(None)`: plaintext; `Some(Some("1.3"))`: TLS 1.3.
    pub tls: Option<Option<&'a str>>,
    pub spf: Option<AuthResult>,
    pub iprev: Option<AuthResult>,
    pub header_from: Option<&'a [String]>,
    /// Domains with a passing DKIM signature.
    pub dkim_pass: Option<&'a [String]>,
    /// Domains of DKIM signatures whose verification ended in a temperror (a key
    /// look-up that failed or did not finish).
    pub dkim_temperror: &'a [String],
    pub dmarc: Option<AuthResult>,
    pub arc: Option<AuthResult>,
    /// Every From address is in one of our own domains.
    pub own_domain: Option<bool>,
}

fn any<T>(known: Option<T>, test: impl FnOnce(T) -> bool) -> Option<Truth> {
    known.map(|k| if test(k) { Truth::True } else { Truth::False })
}

/// A result-word condition: a temperror it does not name itself could have been any
/// other result, so the condition's truth is unknown.
fn result_in(known: Option<AuthResult>, results: &[AuthResult]) -> Option<Truth> {
    known.map(|r| Truth::of(results.contains(&r), r == AuthResult::TempError))
}

impl Condition {
    /// `Some(truth)` when the facts it needs are known, `None` otherwise.
    pub fn test(&self, facts: &Facts<'_>) -> Option<Truth> {
        match self {
            Condition::ClientIp(nets) => {
                any(facts.client_ip, |ip| nets.iter().any(|n| n.contains(&ip)))
            }
            Condition::ClientHost(patterns) => facts.client_hosts.map(|hosts| {
                let matches =
                    |list: &[String]| list.iter().any(|h| patterns.iter().any(|p| p.matches(h)));
                Truth::of(matches(hosts), matches(facts.unsure_hosts))
            }),
            Condition::Helo(patterns) => {
                any(facts.helo, |helo| patterns.iter().any(|p| p.matches(helo)))
            }
            Condition::SpfRecord(records) => facts.spf_records.map(|known| {
                Truth::any(records, |r| match known.get(r) {
                    Some(AuthResult::Pass) => Truth::True,
                    Some(AuthResult::TempError) => Truth::Temperror,
                    _ => Truth::False,
                })
            }),
            Condition::EnvelopeFrom(patterns) => any(facts.envelope_from, |from| {
                patterns.iter().any(|p| p.matches(from))
            }),
            Condition::HeaderFrom(patterns) => any(facts.header_from, |froms| {
                // Every From address must match: a second, unrelated address in From
                // must not ride on an allowlisted one.
                !froms.is_empty() && froms.iter().all(|f| patterns.iter().any(|p| p.matches(f)))
            }),
            Condition::DkimDomain(patterns) => facts.dkim_pass.map(|domains| {
                let matches =
                    |list: &[String]| list.iter().any(|d| patterns.iter().any(|p| p.matches(d)));
                Truth::of(matches(domains), matches(facts.dkim_temperror))
            }),
            Condition::Spf(results) => result_in(facts.spf, results),
            Condition::Dmarc(results) => result_in(facts.dmarc, results),
            Condition::Arc(results) => result_in(facts.arc, results),
            Condition::Iprev(results) => result_in(facts.iprev, results),
            // Any recipient (see `test_for` for `accept`).
            Condition::Rcpt(patterns) => any(facts.rcpts, |rcpts| {
                rcpts.iter().any(|r| patterns.iter().any(|p| p.matches(r)))
            }),
            Condition::Tls(want) => any(facts.tls, |tls| tls.is_some() == *want),
            Condition::TlsVersion(versions) => any(facts.tls, |tls| {
                tls.is_some_and(|v| versions.iter().any(|w| w == v))
            }),
            Condition::OwnDomain(want) => any(facts.own_domain, |own| own == *want),
        }
    }

    /// As `test`, for a rule with `action`: an `accept` on recipients holds only when
    /// every recipient matches, so one mailbox that takes everything (abuse@) cannot
    /// lift the checks for the others; a restriction (tag, quarantine, reject) holds
    /// when any does, so adding a recipient cannot dodge it.
    pub fn test_for(&self, facts: &Facts<'_>, action: &RuleAction) -> Option<Truth> {
        match (self, action) {
            (Condition::Rcpt(patterns), RuleAction::Accept) => any(facts.rcpts, |rcpts| {
                !rcpts.is_empty() && rcpts.iter().all(|r| patterns.iter().any(|p| p.matches(r)))
            }),
            _ => self.test(facts),
        }
    }

    /// The condition's key in the policy file.
    pub fn key(&self) -> &'static str {
        match self {
            Condition::ClientIp(_) => "client_ip",
            Condition::ClientHost(_) => "client_host",
            Condition::Helo(_) => "helo",
            Condition::SpfRecord(_) => "spf_record",
            Condition::EnvelopeFrom(_) => "envelope_from",
            Condition::HeaderFrom(_) => "header_from",
            Condition::DkimDomain(_) => "dkim_domain",
            Condition::Spf(_) => "spf",
            Condition::Dmarc(_) => "dmarc",
            Condition::Arc(_) => "arc",
            Condition::Iprev(_) => "iprev",
            Condition::Rcpt(_) => "rcpt",
            Condition::Tls(_) => "tls",
            Condition::TlsVersion(_) => "tls_version",
            Condition::OwnDomain(_) => "own_domain",
        }
    }

    /// Whether these conditions of one rule together authenticate the sender (what an
    /// `accept` rule needs besides addresses). `spf: pass` proves only that the MAIL
    /// FROM domain, whichever the sender chose, allows the client: it counts only
    /// beside an `envelope_from` that names that domain (not `*.com`: anyone can
    /// register one and publish SPF for it), never for a `header_from` or a `helo` on
    /// its own. Likewise `dmarc: pass` proves only the header From domain, whichever the
    /// sender wrote: it counts beside a `header_from` or `own_domain`, never for an
    /// `envelope_from` or a `helo` on its own.
    pub fn authenticate_sender(conditions: &[Condition]) -> bool {
        let names_envelope = conditions.iter().any(|c| {
            matches!(c, Condition::EnvelopeFrom(patterns)
                if patterns.iter().all(|p| !matches!(p,
                    AddressPattern::Domain(NamePattern::Below(suffix)) if !suffix.contains('.'))))
        });
        let names_author = conditions
            .iter()
            .any(|c| matches!(c, Condition::HeaderFrom(_) | Condition::OwnDomain(true)));
        conditions.iter().any(|c| match c {
            Condition::Spf(_) => names_envelope && c.is_evidence(),
            Condition::Dmarc(_) => names_author && c.is_evidence(),
            _ => c.is_evidence(),
        })
    }

    /// Whether the condition authenticates something: a fact the sender cannot simply
    /// write in a header (see `authenticate_sender` for what it authenticates).
    pub fn is_evidence(&self) -> bool {
        match self {
            Condition::ClientIp(_) | Condition::ClientHost(_) | Condition::DkimDomain(_) => {
                too_broad_to_authenticate(self).is_empty()
            }
            Condition::SpfRecord(_) => true,
            Condition::Spf(results) | Condition::Dmarc(results) => {
                !results.is_empty() && results.iter().all(|r| *r == AuthResult::Pass)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list<T: fmt::Display>(items: &[T]) -> String {
            items
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
        match self {
            Condition::ClientIp(v) => write!(f, "client_ip in [{}]", list(v)),
            Condition::ClientHost(v) => {
                write!(f, "client_host (forward-confirmed) is [{}]", list(v))
            }
            Condition::Helo(v) => write!(f, "helo is [{}]", list(v)),
            Condition::SpfRecord(v) => {
                write!(f, "client IP authorised by SPF record [{}]", list(v))
            }
            Condition::EnvelopeFrom(v) => write!(f, "envelope_from is [{}]", list(v)),
            Condition::HeaderFrom(v) => write!(f, "header_from is [{}]", list(v)),
            Condition::DkimDomain(v) => write!(f, "dkim=pass for d=[{}]", list(v)),
            Condition::Spf(v) => write!(f, "spf is [{}]", list(v)),
            Condition::Dmarc(v) => write!(f, "dmarc is [{}]", list(v)),
            Condition::Arc(v) => write!(f, "arc is [{}]", list(v)),
            Condition::Iprev(v) => write!(f, "iprev is [{}]", list(v)),
            Condition::Rcpt(v) => write!(f, "rcpt is [{}]", list(v)),
            Condition::Tls(v) => write!(f, "tls is {v}"),
            Condition::TlsVersion(v) => write!(f, "tls_version in [{}]", v.join(", ")),
            Condition::OwnDomain(v) => {
                write!(
                    f,
                    "own_domain is {v} (every From address in server.domains)"
                )
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleAction {
    /// Deliver; a DMARC failure is not enforced.
    Accept,
    /// Add a header field; otherwise as if no rule matched.
    Tag(String, String),
    /// Deliver with the quarantine header, or to this address instead.
    Quarantine(Option<String>),
    Reject(Reply),
    Tempfail(Reply),
    /// Plaintext MAIL from this sender gets 530 5.7.0.
    RequireTls,
    /// This sender may send without TLS although `tls.require` is on.
    AllowPlaintext,
}

impl RuleAction {
    /// Whether this action, had its rule matched, could let through a message that is
    /// otherwise refused for good: what a rule undecided for DNS trouble is weighed by.
    pub fn could_spare(&self) -> bool {
        matches!(self, RuleAction::Accept | RuleAction::Quarantine(_))
    }

    pub fn name(&self) -> &'static str {
        match self {
            RuleAction::Accept => "accept",
            RuleAction::Tag(..) => "tag",
            RuleAction::Quarantine(_) => "quarantine",
            RuleAction::Reject(_) => "reject",
            RuleAction::Tempfail(_) => "tempfail",
            RuleAction::RequireTls => "require_tls",
            RuleAction::AllowPlaintext => "allow_plaintext",
        }
    }

    /// TLS rules decide only whether TLS is required; they are evaluated on their own
    /// (first matching TLS rule wins), apart from the rules that decide the message.
    pub fn is_tls_rule(&self) -> bool {
        matches!(self, RuleAction::RequireTls | RuleAction::AllowPlaintext)
    }
}

#[derive(Debug)]
pub struct Rule {
    pub name: Arc<str>,
    /// `file:line` of the rule, for logs.
    pub origin: String,
    pub file: PathBuf,
    /// Position in its file's `rules:` list (to point diagnostics at it).
    pub index: usize,
    pub conditions: Vec<Condition>,
    pub action: RuleAction,
    pub shadow: bool,
    /// The rule as written, normalised: a reload compares these to report changes.
    pub fingerprint: String,
}

impl Rule {
    /// `Some(False)` as soon as one known condition fails; `Some(True)` when all are
    /// known and hold; `Some(Temperror)` when all are known and none fails, but one
    /// could not be decided for DNS trouble; `None` otherwise.
    pub fn test(&self, facts: &Facts<'_>) -> Option<Truth> {
        let mut unknown = false;
        let mut temperror = false;
        for condition in &self.conditions {
            match condition.test_for(facts, &self.action) {
                Some(Truth::False) => return Some(Truth::False),
                Some(Truth::True) => {}
                Some(Truth::Temperror) => temperror = true,
                None => unknown = true,
            }
        }
        match (unknown, temperror) {
            (true, _) => None,
            (false, true) => Some(Truth::Temperror),
            (false, false) => Some(Truth::True),
        }
    }

    pub fn uses(&self, key: &str) -> bool {
        self.conditions.iter().any(|c| c.key() == key)
    }
}

/// Which rules of one kind match the facts of a stage: the policy's part of a message's
/// evaluation.
#[derive(Debug, Default)]
pub struct RuleMatch<'p> {
    /// The first rule (in order) that matched, if every rule before it is known not to
    /// (or could not be decided for DNS trouble: see `temperror`).
    pub decision: Option<&'p Rule>,
    /// An earlier rule could still match once more facts are known: decide later.
    pub undecided: bool,
    /// Rules before the decision that could not be decided for DNS trouble: each could
    /// have been the decision. The caller must not refuse for good what one of them
    /// would have let through.
    pub temperror: Vec<&'p Rule>,
    /// Shadow rules that matched (counted and logged, not applied).
    pub shadow: Vec<&'p Rule>,
}

/// First match wins, in order. A rule whose facts are not all known yet stops the
/// evaluation (unless a known condition already rules it out), because it could still
/// match and it comes first. A rule undecided for DNS trouble does not stop it (no later
/// fact will decide it): it is noted, and evaluation goes on. Shadow rules never stop
/// anything.
pub fn evaluate<'p>(rules: impl IntoIterator<Item = &'p Rule>, facts: &Facts<'_>) -> RuleMatch<'p> {
    let mut found = RuleMatch::default();
    for rule in rules {
        match rule.test(facts) {
            Some(Truth::False) => {}
            Some(Truth::True) if rule.shadow => found.shadow.push(rule),
            Some(Truth::Temperror) | None if rule.shadow => {}
            Some(Truth::True) => {
                found.decision = Some(rule);
                return found;
            }
            Some(Truth::Temperror) if rule.action.could_spare() => found.temperror.push(rule),
            // Only an accept or a quarantine could spare a refusal; any other rule left
            // undecided is passed over as if it did not match, as before, so it cannot
            // hold back per-recipient decisions that rules after it make.
            Some(Truth::Temperror) => {}
            None => {
                found.undecided = true;
                return found;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, conditions: Vec<Condition>, action: RuleAction) -> Rule {
        Rule {
            name: name.into(),
            origin: String::new(),
            file: PathBuf::new(),
            index: 0,
            conditions,
            action,
            shadow: false,
            fingerprint: String::new(),
        }
    }

    fn net(text: &str) -> Network {
        Network::try_from(text.to_string()).unwrap()
    }

    #[test]
    fn name_patterns() {
        let exact = NamePattern::Exact("smtp.od.visma.fi".into());
        assert!(exact.matches("SMTP.od.visma.fi."));
        assert!(!exact.matches("evil-smtp.od.visma.fi"));
        let below = NamePattern::Below("amazonses.com".into());
        assert!(below.matches("a48-30.smtp-out.amazonses.com"));
        assert!(!below.matches("amazonses.com"));
        assert!(!below.matches("evilamazonses.com"));
    }

    #[test]
    fn address_patterns() {
        let address = AddressPattern::Address("noreply@netvisor.fi".into());
        assert!(address.matches("NoReply@Netvisor.FI"));
        assert!(!address.matches("other@netvisor.fi"));
        let domain = AddressPattern::Domain(NamePattern::Exact("netigate.se".into()));
        assert!(domain.matches("survey@netigate.se"));
        assert!(!domain.matches("survey@x.netigate.se"));
    }

    /// The matcher table: each condition with facts that make it true, false, unknown.
    #[test]
    fn condition_table() {
        let hosts = vec!["smtp.od.visma.fi".to_string()];
        let records: HashMap<String, AuthResult> = [
            ("_spf.netigate.se".to_string(), AuthResult::Pass),
            ("_spf.ntgt.de".to_string(), AuthResult::Fail),
        ]
        .into();
        let froms = vec!["noreply@netvisor.fi".to_string()];
        let two_froms = vec![
            "noreply@netvisor.fi".to_string(),
            "ceo@bank.test".to_string(),
        ];
        let dkim = vec!["amazonses.com".to_string()];
        let rcpts = vec!["bob@example.test".to_string()];
        let full = Facts {
            client_ip: Some("89.45.227.221".parse().unwrap()),
            client_hosts: Some(&hosts),
            unsure_hosts: &[],
            helo: Some("mail.netigate.se"),
            spf_records: Some(&records),
            envelope_from: Some("survey@netigate.se"),
            rcpts: Some(&rcpts),
            tls: Some(Some("1.3")),
            spf: Some(AuthResult::Pass),
            iprev: Some(AuthResult::Pass),
            header_from: Some(&froms),
            dkim_pass: Some(&dkim),
            dkim_temperror: &[],
            dmarc: Some(AuthResult::Fail),
            arc: Some(AuthResult::None),
            own_domain: Some(false),
        };
        let cases: Vec<(Condition, bool)> = vec![
            (Condition::OwnDomain(true), false),
            (Condition::OwnDomain(false), true),
            (Condition::ClientIp(vec![net("89.45.227.221")]), true),
            (
                Condition::ClientIp(vec![net("10.0.0.0/8"), net("89.45.227.0/24")]),
                true,
            ),
            (Condition::ClientIp(vec![net("2001:db8::/32")]), false),
            (
                Condition::ClientHost(vec![NamePattern::Exact("smtp.od.visma.fi".into())]),
                true,
            ),
            (
                Condition::ClientHost(vec![NamePattern::Below("visma.fi".into())]),
                true,
            ),
            (
                Condition::ClientHost(vec![NamePattern::Below("amazonses.com".into())]),
                false,
            ),
            (
                Condition::Helo(vec![NamePattern::Below("netigate.se".into())]),
                true,
            ),
            (Condition::SpfRecord(vec!["_spf.netigate.se".into()]), true),
            (Condition::SpfRecord(vec!["_spf.ntgt.de".into()]), false),
            (
                Condition::SpfRecord(vec!["_spf.ntgt.de".into(), "_spf.netigate.se".into()]),
                true,
            ),
            (
                Condition::EnvelopeFrom(vec![AddressPattern::Address("survey@netigate.se".into())]),
                true,
            ),
            (
                Condition::EnvelopeFrom(vec![AddressPattern::Address("survey@ntgt.de".into())]),
                false,
            ),
            (
                Condition::HeaderFrom(vec![AddressPattern::Domain(NamePattern::Exact(
                    "netvisor.fi".into(),
                ))]),
                true,
            ),
            (
                Condition::DkimDomain(vec![
                    NamePattern::Exact("netvisor.fi".into()),
                    NamePattern::Exact("amazonses.com".into()),
                ]),
                true,
            ),
            (
                Condition::DkimDomain(vec![NamePattern::Exact("netvisor.fi".into())]),
                false,
            ),
            (Condition::Spf(vec![AuthResult::Pass]), true),
            (Condition::Dmarc(vec![AuthResult::Pass]), false),
            (
                Condition::Dmarc(vec![AuthResult::Fail, AuthResult::None]),
                true,
            ),
            (Condition::Arc(vec![AuthResult::Pass]), false),
            (Condition::Iprev(vec![AuthResult::Pass]), true),
            (
                Condition::Rcpt(vec![AddressPattern::Domain(NamePattern::Exact(
                    "example.test".into(),
                ))]),
                true,
            ),
            (Condition::Tls(true), true),
            (Condition::Tls(false), false),
            (Condition::TlsVersion(vec!["1.2".into()]), false),
            (Condition::TlsVersion(vec!["1.3".into()]), true),
        ];
        for (condition, expected) in &cases {
            assert_eq!(
                condition.test(&full),
                Some(Truth::of(*expected, false)),
                "{condition}"
            );
            assert_eq!(
                condition.test(&Facts::default()),
                None,
                "{condition} with nothing known"
            );
        }
        let mixed = Facts {
            header_from: Some(&two_froms),
            ..Facts::default()
        };
        let netvisor =
            Condition::HeaderFrom(vec![AddressPattern::Address("noreply@netvisor.fi".into())]);
        assert_eq!(
            netvisor.test(&mixed),
            Some(Truth::False),
            "a second From address must not ride along"
        );
        let two_rcpts = vec![
            "abuse@example.test".to_string(),
            "ceo@example.test".to_string(),
        ];
        let abuse = Condition::Rcpt(vec![AddressPattern::Address("abuse@example.test".into())]);
        let both = Facts {
            rcpts: Some(&two_rcpts),
            ..Facts::default()
        };
        assert_eq!(
            abuse.test_for(&both, &RuleAction::Accept),
            Some(Truth::False),
            "an accept for one recipient must not decide for the others"
        );
        assert_eq!(
            abuse.test_for(
                &Facts {
                    rcpts: Some(&two_rcpts[..1]),
                    ..Facts::default()
                },
                &RuleAction::Accept
            ),
            Some(Truth::True)
        );
        assert_eq!(
            abuse.test_for(&both, &RuleAction::Quarantine(None)),
            Some(Truth::True),
            "another recipient must not dodge a restriction"
        );
        let plaintext = Facts {
            tls: Some(None),
            ..Facts::default()
        };
        assert_eq!(Condition::Tls(false).test(&plaintext), Some(Truth::True));
        assert_eq!(
            Condition::TlsVersion(vec!["1.3".into()]).test(&plaintext),
            Some(Truth::False)
        );
    }

    #[test]
    fn first_match_wins_but_waits_for_earlier_rules() {
        let rules = vec![
            rule(
                "late",
                vec![Condition::Dmarc(vec![AuthResult::Pass])],
                RuleAction::Accept,
            ),
            rule(
                "early",
                vec![Condition::ClientIp(vec![net("192.0.2.0/24")])],
                RuleAction::Reject(Reply::policy_reject_default("early")),
            ),
        ];
        let at_connect = Facts {
            client_ip: Some("192.0.2.1".parse().unwrap()),
            ..Facts::default()
        };
        let evaluation = evaluate(&rules, &at_connect);
        assert!(
            evaluation.decision.is_none() && evaluation.undecided,
            "rule 1 could still match"
        );
        let at_end = Facts {
            dmarc: Some(AuthResult::Fail),
            ..at_connect.clone()
        };
        assert_eq!(
            evaluate(&rules, &at_end).decision.unwrap().name.as_ref(),
            "early"
        );
        // A rule ruled out early by a known condition does not hold the others back.
        let rules = vec![
            rule(
                "other-ip",
                vec![
                    Condition::ClientIp(vec![net("10.0.0.0/8")]),
                    Condition::Dmarc(vec![AuthResult::Pass]),
                ],
                RuleAction::Accept,
            ),
            rule(
                "early",
                vec![Condition::ClientIp(vec![net("192.0.2.0/24")])],
                RuleAction::Tempfail(Reply::policy_tempfail_default("early")),
            ),
        ];
        assert_eq!(
            evaluate(&rules, &at_connect)
                .decision
                .unwrap()
                .name
                .as_ref(),
            "early"
        );
    }

    #[test]
    fn shadow_rules_are_reported_not_applied() {
        let mut shadow = rule(
            "try-block",
            vec![Condition::ClientIp(vec![net("192.0.2.0/24")])],
            RuleAction::Reject(Reply::policy_reject_default("x")),
        );
        shadow.shadow = true;
        let rules = vec![
            shadow,
            rule(
                "all",
                vec![Condition::ClientIp(vec![net("0.0.0.0/0")])],
                RuleAction::Accept,
            ),
        ];
        let facts = Facts {
            client_ip: Some("192.0.2.1".parse().unwrap()),
            ..Facts::default()
        };
        let evaluation = evaluate(&rules, &facts);
        assert_eq!(evaluation.shadow.len(), 1);
        assert_eq!(evaluation.decision.unwrap().name.as_ref(), "all");
    }

    /// A rule DNS trouble left undecided is weighed only if it could spare a refusal
    /// (accept, quarantine); any other is passed over, so a recipient rule after it
    /// still decides (and at RCPT, for that recipient alone).
    #[test]
    fn only_an_undecided_rule_that_could_spare_is_kept() {
        let iprev_fail = || Condition::Iprev(vec![AuthResult::Fail]);
        let former = || {
            rule(
                "former",
                vec![Condition::Rcpt(vec![AddressPattern::Address(
                    "former@example.test".into(),
                )])],
                RuleAction::Reject(Reply::policy_reject_default("x")),
            )
        };
        let rcpts = vec!["former@example.test".to_string()];
        let facts = Facts {
            iprev: Some(AuthResult::TempError),
            rcpts: Some(&rcpts),
            ..Facts::default()
        };
        for (action, kept) in [
            (RuleAction::Reject(Reply::policy_reject_default("y")), false),
            (RuleAction::Tag("X-A".into(), "b".into()), false),
            (RuleAction::Accept, true),
            (RuleAction::Quarantine(None), true),
        ] {
            let name = action.name();
            let rules = vec![rule(name, vec![iprev_fail()], action), former()];
            let evaluation = evaluate(&rules, &facts);
            assert_eq!(
                evaluation.decision.unwrap().name.as_ref(),
                "former",
                "{name}"
            );
            assert_eq!(evaluation.temperror.len(), usize::from(kept), "{name}");
        }
    }

    #[test]
    fn evidence() {
        assert!(Condition::DkimDomain(vec![]).is_evidence());
        let below = |s: &str| NamePattern::Below(s.to_string());
        let net = |s: &str| Network::try_from(s.to_string()).unwrap();
        assert!(Condition::DkimDomain(vec![below("netvisor.fi")]).is_evidence());
        assert!(!Condition::DkimDomain(vec![below("netvisor.fi"), below("com")]).is_evidence());
        assert!(!Condition::ClientHost(vec![below("fi")]).is_evidence());
        assert!(Condition::ClientHost(vec![below("amazonses.com")]).is_evidence());
        assert!(Condition::ClientIp(vec![net("54.240.0.0/18"), net("3.0.0.0/8")]).is_evidence());
        assert!(!Condition::ClientIp(vec![net("0.0.0.0/0")]).is_evidence());
        assert!(!Condition::ClientIp(vec![net("128.0.0.0/1")]).is_evidence());
        assert!(Condition::ClientIp(vec![net("2a01:111::/32")]).is_evidence());
        assert!(!Condition::ClientIp(vec![net("::/0")]).is_evidence());
        assert!(!Condition::ClientIp(vec![net("2000::/3")]).is_evidence());
        assert!(!Condition::ClientIp(vec![net("::ffff:0:0/96")]).is_evidence());
        assert!(Condition::ClientIp(vec![net("::ffff:10.0.0.0/104")]).is_evidence());
        assert_eq!(
            too_broad_to_authenticate(&Condition::ClientIp(vec![
                net("10.0.0.0/8"),
                net("0.0.0.0/0")
            ])),
            vec![(1, "0.0.0.0/0".to_string())]
        );
        assert!(Condition::Spf(vec![AuthResult::Pass]).is_evidence());
        assert!(!Condition::Spf(vec![AuthResult::Pass, AuthResult::None]).is_evidence());
        assert!(!Condition::HeaderFrom(vec![]).is_evidence());
        assert!(!Condition::Helo(vec![]).is_evidence());
        assert!(!Condition::OwnDomain(true).is_evidence());
        assert!(!Condition::authenticate_sender(&[
            Condition::OwnDomain(true),
            Condition::Spf(vec![AuthResult::Pass])
        ]));
        let spf = Condition::Spf(vec![AuthResult::Pass]);
        let header_from = Condition::HeaderFrom(vec![]);
        let envelope_from = Condition::EnvelopeFrom(vec![]);
        let helo = Condition::Helo(vec![]);
        assert!(!Condition::authenticate_sender(&[
            header_from.clone(),
            spf.clone()
        ]));
        assert!(!Condition::authenticate_sender(&[helo, spf.clone()]));
        assert!(Condition::authenticate_sender(&[envelope_from, spf]));
        let dmarc = Condition::Dmarc(vec![AuthResult::Pass]);
        assert!(Condition::authenticate_sender(&[
            header_from,
            dmarc.clone()
        ]));
        assert!(Condition::authenticate_sender(&[
            Condition::OwnDomain(true),
            dmarc.clone()
        ]));
        // DMARC passes for whatever From the sender wrote: it says nothing of the
        // envelope or the HELO.
        assert!(!Condition::authenticate_sender(&[
            Condition::EnvelopeFrom(vec![AddressPattern::Address("billing@partner.test".into())]),
            dmarc.clone()
        ]));
        assert!(!Condition::authenticate_sender(&[
            Condition::Helo(vec![]),
            dmarc
        ]));
        // Anyone can register a name under a top-level domain and publish SPF for it.
        let any_com = AddressPattern::Domain(NamePattern::Below("com".into()));
        let bank = AddressPattern::Domain(NamePattern::Below("bank.test".into()));
        let spf = Condition::Spf(vec![AuthResult::Pass]);
        assert!(!Condition::authenticate_sender(&[
            Condition::EnvelopeFrom(vec![bank.clone(), any_com]),
            spf.clone()
        ]));
        assert!(Condition::authenticate_sender(&[
            Condition::EnvelopeFrom(vec![bank]),
            spf
        ]));
    }
}
