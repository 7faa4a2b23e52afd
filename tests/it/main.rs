//! One integration-test binary: each former `tests/<name>.rs` is a module here, so the
//! tests link once instead of once per file (`it::<module>::<test>`;
//! `cargo test --test it reliability::` runs one module). Owns nothing but the list.
//!
//! Tests here may read mxgate's process-wide Prometheus registry only in ways other
//! tests in the same process cannot break: a counter's rise (`>= before + n`), a
//! series' presence, or a label no other test uses (a backend's URL). Kept as binaries
//! of their own (`tests/*.rs`), because they need the registry to themselves:
//! - `own_domain`: `mxgate_rejections_total{reason="own_domain"}` is exactly 2 and
//!   `{reason="dmarc"}` exactly 0 after its own sends (an in-process gateway);
//! - `limits_shared`: asserts that `mxgate_limits_store_up` is 1 as proof its limiter
//!   used the Redis store; every in-memory limiter sets that one process-wide gauge to 1
//!   too, so in a shared process the check would pass without meaning anything.
//!
//! `observability` counts exact increases too, but of a gateway it spawns as a process
//! of its own, so it lives here.

mod arc;
mod authentication;
mod conformance_arc;
mod conformance_dkim;
mod conformance_spf;
mod deploy;
mod dkim_rsa_sha1;
mod dns_cache;
mod e2e_postfix;
mod evidence_temperror;
mod explain;
mod explain_agrees;
mod haproxy;
mod header_differential;
mod hostile_headers;
mod limits;
mod observability;
mod policy;
mod policy_check;
mod profile;
mod proxy_protocol;
mod quickstart;
mod real_client;
mod relay;
mod relay_tls;
mod reliability;
mod shutdown;
mod smtp_session;
mod smuggling;
mod spf;
mod starttls;
