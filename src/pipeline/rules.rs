//! The sender policy's rules applied at each stage: which facts are known, which rule
//! (if any) decides, and what a decision does at that stage. Trusted networks bypass
//! the policy, as they bypass the other sender checks.

use super::{Connection, Pending, Transaction};
use crate::auth::Authenticator;
use crate::findings::{AuthReport, AuthResult};
use crate::policy::{Facts, Policy, Rule, RuleAction, RuleMatch, Stage, evaluate, metrics};
use crate::smtp::reply::Reply;
use std::collections::HashMap;
use std::sync::Arc;

/// A rule that decided, and what it decided.
#[derive(Clone, Debug)]
pub struct PolicyHit {
    pub rule: Arc<str>,
    pub action: RuleAction,
    pub stage: Stage,
    /// The rule's conditions authenticate the sender (`Condition::authenticate_sender`):
    /// only such an `accept` lifts the own-domain guard.
    pub evidence: bool,
}

/// The policy's decision at the end of data, with the rules before it that DNS trouble
/// left undecided (each could have been the decision instead).
#[derive(Clone, Debug, Default)]
pub struct PolicyDecision {
    pub hit: Option<PolicyHit>,
    pub temperror: Vec<PolicyHit>,
}

impl PolicyDecision {
    pub fn decided(hit: Option<PolicyHit>) -> Self {
        PolicyDecision {
            hit,
            temperror: Vec::new(),
        }
    }
}

/// Facts that need DNS, gathered at MAIL for the rules that use them.
#[derive(Clone, Debug, Default)]
pub struct DnsFacts {
    pub hosts: Option<Vec<String>>,
    /// Host names DNS trouble kept from being confirmed (`IprevCheck::unsure`).
    pub unsure_hosts: Vec<String>,
    pub iprev: Option<AuthResult>,
    pub spf_records: Option<HashMap<String, AuthResult>>,
    pub spf: Option<AuthResult>,
}

impl Connection {
    fn policy(&self) -> Option<Arc<Policy>> {
        (!self.trusted && !self.snapshot.policy.rules.is_empty())
            .then(|| self.snapshot.policy.clone())
    }

    /// Starts the SPF-record checks rules refer to, at MAIL: they run beside the MAIL
    /// FROM SPF check, with the HELO name and sender their macros may use.
    pub(super) fn start_policy_checks(&mut self, mail_from: &str) {
        let (Some(policy), Some(auth)) = (self.policy(), self.auth.clone()) else {
            return;
        };
        if policy.spf_records.is_empty() {
            return;
        }
        let ip = self.client_ip;
        let records = policy.spf_records.clone();
        // The same identities as the MAIL FROM SPF check.
        let helo = self.helo.clone().unwrap_or_default();
        let mail_from = mail_from.to_string();
        self.spf_records = Some(Pending::spawn(async move {
            spf_record_results(&auth, ip, &records, &helo, &mail_from).await
        }));
    }

    /// Connect stage: only the client IP is known without waiting for DNS.
    pub(super) fn policy_at_connect(&mut self) -> Result<(), Reply> {
        let Some(policy) = self.policy() else {
            return Ok(());
        };
        let facts = connect_facts(self.client_ip);
        let mut seen = std::mem::take(&mut self.shadow_seen);
        let decided = decide(policy.disposition_rules(), &facts, &mut seen);
        self.shadow_seen = seen;
        let Some(rule) = decided else {
            return Ok(());
        };
        metrics::hit(rule);
        match &rule.action {
            RuleAction::Reject(reply) | RuleAction::Tempfail(reply) => Err(reply.as_greeting()),
            action => {
                self.policy_hit = Some(hit(rule, action, Stage::Connect));
                Ok(())
            }
        }
    }

    /// MAIL stage: TLS rules, then the disposition rules with the envelope sender, the
    /// HELO name and the DNS facts the rules need.
    pub(super) async fn policy_at_mail(&mut self, tx: &mut Transaction) -> Result<(), Reply> {
        let tls_required_globally = self.snapshot.tls.as_ref().is_some_and(|t| t.require);
        let Some(policy) = self.policy() else {
            return match (tls_required_globally, &self.tls) {
                (true, None) => Err(Reply::tls_required()),
                _ => Ok(()),
            };
        };
        tx.dns_facts = self.gather_dns_facts(&policy, tx).await;
        let dns = tx.dns_facts.clone();
        let tls_version = self.tls.as_ref().map(|t| t.version_label());
        let facts = Facts {
            client_ip: Some(self.client_ip),
            client_hosts: dns.hosts.as_deref(),
            unsure_hosts: &dns.unsure_hosts,
            helo: self.helo.as_deref(),
            spf_records: dns.spf_records.as_ref(),
            envelope_from: Some(&tx.mail_from),
            tls: Some(tls_version),
            spf: dns.spf,
            iprev: dns.iprev,
            ..Facts::default()
        };
        let mut seen = std::mem::take(&mut tx.shadow_seen);
        // A TLS rule DNS trouble left undecided is passed over, as one that does not
        // match: TLS rules decide only whether STARTTLS is needed, which the client can
        // give.
        let tls_rule = count_shadow(evaluate(policy.tls_rules(), &facts), &mut seen).decision;
        let required = match tls_rule.map(|r| &r.action) {
            Some(RuleAction::RequireTls) => true,
            Some(RuleAction::AllowPlaintext) => false,
            _ => tls_required_globally,
        };
        if required && self.tls.is_none() {
            tx.shadow_seen = seen;
            return Err(if tls_rule.is_some() {
                Reply::tls_required_for_sender()
            } else {
                Reply::tls_required()
            });
        }
        let decided = if self.policy_hit.is_none() {
            decide(policy.disposition_rules(), &facts, &mut seen)
        } else {
            None
        };
        tx.shadow_seen = seen;
        if let Some(rule) = decided {
            metrics::hit(rule);
            tx.policy_hit = Some(hit(rule, &rule.action, Stage::Mail));
            if let RuleAction::Reject(reply) | RuleAction::Tempfail(reply) = &rule.action {
                return Err(reply.clone());
            }
        }
        Ok(())
    }

    /// RCPT stage: a refusal applies to this recipient only. Any other decision waits
    /// for the end of data, where it must hold for every recipient: otherwise the first
    /// recipient would decide for all, and a rule for one mailbox could wave through
    /// mail for the others, or spare a later recipient the refusal meant for it.
    pub(super) fn policy_at_rcpt(&mut self, tx: &mut Transaction, rcpt: &str) -> Option<Reply> {
        let policy = self.policy()?;
        if self.policy_hit.is_some() || tx.policy_hit.is_some() {
            return None;
        }
        let rcpts = [rcpt.to_string()];
        let tls_version = self.tls.as_ref().map(|t| t.version_label());
        let dns = &tx.dns_facts;
        let facts = Facts {
            client_ip: Some(self.client_ip),
            client_hosts: dns.hosts.as_deref(),
            unsure_hosts: &dns.unsure_hosts,
            helo: self.helo.as_deref(),
            spf_records: dns.spf_records.as_ref(),
            envelope_from: Some(&tx.mail_from),
            rcpts: Some(&rcpts),
            tls: Some(tls_version),
            spf: dns.spf,
            iprev: dns.iprev,
            ..Facts::default()
        };
        let mut seen = std::mem::take(&mut tx.shadow_seen);
        let refusal = decide(policy.disposition_rules(), &facts, &mut seen).and_then(|rule| {
            let (RuleAction::Reject(reply) | RuleAction::Tempfail(reply)) = &rule.action else {
                return None;
            };
            metrics::hit(rule);
            tracing::info!(rule = %rule.name, action = rule.action.name(), "recipient refused by policy");
            Some(reply.clone())
        });
        tx.shadow_seen = seen;
        refusal
    }

    /// End of data: every fact is known; the decision made at an earlier stage stands.
    pub(super) fn policy_at_data(
        &mut self,
        tx: &mut Transaction,
        report: Option<&AuthReport>,
    ) -> PolicyDecision {
        if let Some(hit) = self.policy_hit.clone().or_else(|| tx.policy_hit.clone()) {
            return PolicyDecision::decided(Some(hit));
        }
        let Some(policy) = self.policy() else {
            return PolicyDecision::default();
        };
        let facts = data_facts(self, tx, report);
        let mut seen = std::mem::take(&mut tx.shadow_seen);
        let evaluation = count_shadow(
            evaluate(policy.disposition_rules(), &facts.facts()),
            &mut seen,
        );
        tx.shadow_seen = seen;
        let decision = at_data(&evaluation);
        if let Some(rule) = evaluation.decision {
            metrics::hit(rule);
        }
        decision
    }

    async fn gather_dns_facts(&mut self, policy: &Policy, tx: &mut Transaction) -> DnsFacts {
        let mut facts = DnsFacts::default();
        if policy.needs_hosts {
            // No pending check: sender checks are off (none); a check that died: temperror.
            let (hosts, unsure, result) = match &mut self.iprev {
                Some(pending) => match pending.get().await {
                    Some(iprev) => (iprev.confirmed.clone(), iprev.unsure.clone(), iprev.result),
                    None => (Vec::new(), Vec::new(), AuthResult::TempError),
                },
                None => (Vec::new(), Vec::new(), AuthResult::None),
            };
            facts.hosts = Some(hosts);
            facts.unsure_hosts = unsure;
            facts.iprev = Some(result);
        }
        if !policy.spf_records.is_empty() {
            facts.spf_records = Some(match &mut self.spf_records {
                // A check that died is a temperror for every record, not a "no".
                Some(pending) => match pending.get().await {
                    Some(results) => results.clone(),
                    None => (policy.spf_records.iter())
                        .map(|record| (record.clone(), AuthResult::TempError))
                        .collect(),
                },
                None => HashMap::new(),
            });
        }
        if policy.needs_spf {
            facts.spf = Some(match &mut tx.spf {
                Some(pending) => pending
                    .get()
                    .await
                    .map_or(AuthResult::TempError, |s| s.result),
                None => AuthResult::None,
            });
        }
        facts
    }
}

/// Every fact, owned, for the end-of-data evaluation (and `explain`).
pub struct DataFacts {
    client_ip: std::net::IpAddr,
    helo: Option<String>,
    tls: Option<&'static str>,
    envelope_from: String,
    rcpts: Vec<String>,
    hosts: Vec<String>,
    unsure_hosts: Vec<String>,
    spf_records: HashMap<String, AuthResult>,
    spf: AuthResult,
    iprev: AuthResult,
    header_from: Vec<String>,
    dkim_pass: Vec<String>,
    dkim_temperror: Vec<String>,
    dmarc: AuthResult,
    arc: AuthResult,
    own_domain: bool,
}

impl DataFacts {
    /// What is known at RCPT for one recipient (what `policy_at_rcpt` sees live).
    pub fn at_rcpt<'a>(&'a self, rcpt: &'a String) -> Facts<'a> {
        Facts {
            rcpts: Some(std::slice::from_ref(rcpt)),
            // Known only once the data is in.
            header_from: None,
            dkim_pass: None,
            dmarc: None,
            arc: None,
            own_domain: None,
            ..self.facts()
        }
    }

    pub fn facts(&self) -> Facts<'_> {
        Facts {
            client_ip: Some(self.client_ip),
            client_hosts: Some(&self.hosts),
            unsure_hosts: &self.unsure_hosts,
            helo: Some(self.helo.as_deref().unwrap_or("")),
            spf_records: Some(&self.spf_records),
            envelope_from: Some(&self.envelope_from),
            rcpts: Some(&self.rcpts),
            tls: Some(self.tls),
            spf: Some(self.spf),
            iprev: Some(self.iprev),
            header_from: Some(&self.header_from),
            dkim_pass: Some(&self.dkim_pass),
            dkim_temperror: &self.dkim_temperror,
            dmarc: Some(self.dmarc),
            arc: Some(self.arc),
            own_domain: Some(self.own_domain),
        }
    }
}

fn data_facts(conn: &Connection, tx: &Transaction, report: Option<&AuthReport>) -> DataFacts {
    full_facts(
        conn.client_ip,
        conn.helo.as_deref(),
        conn.tls.as_ref().map(|t| t.version_label()),
        &tx.mail_from,
        &tx.rcpts,
        &tx.dns_facts,
        report,
        &conn.snapshot.dmarc.own_domains,
    )
}

/// Builds the complete facts from the checks' report; what was never checked (sender
/// checks disabled) counts as absent. `own_domains` is `server.domains`.
#[allow(clippy::too_many_arguments)]
pub fn full_facts(
    client_ip: std::net::IpAddr,
    helo: Option<&str>,
    tls: Option<&'static str>,
    mail_from: &str,
    rcpts: &[String],
    dns: &DnsFacts,
    report: Option<&AuthReport>,
    own_domains: &[String],
) -> DataFacts {
    // Every From address, the unusable ones too: a rule that needs all of them to
    // match must not be satisfied because one was left out of the DMARC view.
    let header_from: Vec<String> = report
        .map(|r| [r.from.addresses.as_slice(), r.from.unusable.as_slice()].concat())
        .unwrap_or_default();
    DataFacts {
        own_domain: super::own_domain::all_own(&header_from, own_domains),
        client_ip,
        helo: helo.map(str::to_string),
        tls,
        envelope_from: mail_from.to_string(),
        rcpts: rcpts.to_vec(),
        hosts: report
            .map(|r| r.iprev.confirmed.clone())
            .or_else(|| dns.hosts.clone())
            .unwrap_or_default(),
        unsure_hosts: report.map_or_else(|| dns.unsure_hosts.clone(), |r| r.iprev.unsure.clone()),
        spf_records: dns.spf_records.clone().unwrap_or_default(),
        spf: report.map_or(AuthResult::None, |r| r.spf.result),
        iprev: report.map_or(AuthResult::None, |r| r.iprev.result),
        header_from,
        dkim_pass: dkim_domains(report, AuthResult::Pass),
        dkim_temperror: dkim_domains(report, AuthResult::TempError),
        dmarc: report.map_or(AuthResult::None, |r| r.dmarc.result),
        arc: report.map_or(AuthResult::None, |r| r.arc.result),
    }
}

/// The `d=` of the DKIM signatures with this result.
fn dkim_domains(report: Option<&AuthReport>, result: AuthResult) -> Vec<String> {
    report
        .map(|r| {
            r.dkim
                .iter()
                .filter(|d| d.result == result)
                .map(|d| d.domain.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// What is known at connect, before waiting for DNS: the client IP.
pub fn connect_facts(client_ip: std::net::IpAddr) -> Facts<'static> {
    Facts {
        client_ip: Some(client_ip),
        ..Facts::default()
    }
}

/// The SPF result of each record the rules refer to for the client (`pass`: it
/// authorises the client; `temperror`: DNS trouble), with the same identities as the
/// MAIL FROM SPF check: for the SMTP path (started at MAIL) and `explain` alike.
pub async fn spf_record_results(
    auth: &Authenticator,
    ip: std::net::IpAddr,
    records: &[String],
    helo: &str,
    mail_from: &str,
) -> HashMap<String, AuthResult> {
    let mut results = HashMap::with_capacity(records.len());
    for record in records {
        let result = auth
            .spf_record_authorizes(ip, record, helo, mail_from)
            .await;
        results.insert(record.clone(), result);
    }
    results
}

/// Counts and logs the shadow rules that matched, once per transaction; the caller
/// counts the decision when it applies it.
fn count_shadow<'p>(evaluation: RuleMatch<'p>, seen: &mut Vec<Arc<str>>) -> RuleMatch<'p> {
    for rule in &evaluation.shadow {
        if !seen.contains(&rule.name) {
            seen.push(rule.name.clone());
            metrics::hit(rule);
            tracing::info!(rule = %rule.name, action = rule.action.name(), origin = %rule.origin, "shadow rule matched (not applied)");
        }
    }
    evaluation
}

/// Evaluates `rules` at a stage before the end of data. A rule that DNS trouble left
/// undecided holds the decision back to the end of data, where the verdict can weigh
/// what it would have decided (see `at_data`).
fn decide<'p>(
    rules: impl Iterator<Item = &'p Rule>,
    facts: &Facts<'_>,
    seen: &mut Vec<Arc<str>>,
) -> Option<&'p Rule> {
    let evaluation = count_shadow(evaluate(rules, facts), seen);
    if evaluation.temperror.is_empty() {
        evaluation.decision
    } else {
        None
    }
}

/// The decision at the end of data, with the rules DNS trouble left undecided.
pub fn at_data(evaluation: &RuleMatch<'_>) -> PolicyDecision {
    PolicyDecision {
        hit: evaluation
            .decision
            .map(|rule| hit(rule, &rule.action, Stage::Data)),
        temperror: evaluation
            .temperror
            .iter()
            .map(|rule| hit(rule, &rule.action, Stage::Data))
            .collect(),
    }
}

pub fn hit(rule: &Rule, action: &RuleAction, stage: Stage) -> PolicyHit {
    PolicyHit {
        rule: rule.name.clone(),
        action: action.clone(),
        stage,
        evidence: crate::policy::rules::Condition::authenticate_sender(&rule.conditions),
    }
}
