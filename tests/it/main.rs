//! One integration-test binary for the tests that share nothing process-global: each
//! former `tests/<name>.rs` is a module here, so they link once (`it::<module>::<test>`;
//! `cargo test --test it reliability::` runs one module).
//!
//! Kept as their own binaries (`tests/*.rs`): the tests that read mxgate's in-process
//! Prometheus registry (`mxgate::metrics::render`, `prometheus::gather`, a scrape of an
//! in-process gateway's listener) and assert values other tests in the same process
//! would move, and those that need a process of their own (own_domain, explain_agrees).

mod arc;
mod authentication;
mod conformance_arc;
mod conformance_dkim;
mod conformance_spf;
mod deploy;
mod dkim_rsa_sha1;
mod e2e_postfix;
mod explain;
mod header_differential;
mod policy_check;
mod profile;
mod quickstart;
mod real_client;
mod relay_tls;
mod reliability;
mod shutdown;
mod smtp_session;
mod smuggling;
mod starttls;
