//! The README's quickstart, as a newcomer runs it: `mxgate serve` on the shipped
//! `mxgate.yaml` and policies, a `swaks` message over STARTTLS from localhost, the
//! message in the Maildir. Nothing else is set up: the shipped config must work
//! standalone, without DNS (localhost is a trusted network there) and without a
//! certificate (it generates a development one).
//!
//! The config is copied into a temporary directory with its listen ports set to 0, so
//! that this test neither collides with a gateway a developer runs nor writes into the
//! checkout.

use mxgate_test_kit as support;

use std::path::Path;
use support::gateway::{GatewayProcess, read_maildir};

/// Copies a directory with its subdirectories (`policies/recipes/` ships beside the
/// allowlist and must not be loaded by the shipped config).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shipped_config_delivers_a_swaks_message_over_starttls() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = std::fs::read_to_string(root.join("mxgate.yaml")).unwrap();
    for port in ["127.0.0.1:2525", "127.0.0.1:9425"] {
        assert!(
            shipped.contains(port),
            "the quickstart's {port} is not in mxgate.yaml"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mxgate.yaml");
    std::fs::write(
        &config,
        shipped
            .replace("127.0.0.1:2525", "127.0.0.1:0")
            .replace("127.0.0.1:9425", "127.0.0.1:0"),
    )
    .unwrap();
    copy_dir(&root.join("policies"), &dir.path().join("policies"));

    let gateway = GatewayProcess::spawn(&config);
    assert!(
        dir.path().join("certs/dev-cert.pem").exists(),
        "no development certificate generated:\n{}",
        gateway.log()
    );
    let Some(swaks) = support::swaks::send_tls(
        gateway.smtp,
        &["--to", "alice@example.test", "--from", "bob@sender.example"],
    )
    .await
    else {
        return;
    };
    swaks.assert_delivered_over_tls(&format!("mxgate log:\n{}", gateway.log()));
    let delivered = read_maildir(&dir.path().join("var/mail"));
    assert_eq!(delivered.len(), 1, "{delivered:#?}\n{}", gateway.log());
    let message = &delivered[0];
    assert!(
        message.contains("Delivered-To: alice@example.test"),
        "{message}"
    );
    assert!(message.contains("by mx.example.test (mxgate)"), "{message}");
    assert!(message.contains("This is a test mailing"), "{message}");
    // The metrics listener of the shipped config is up too.
    assert!(gateway.metrics.is_some(), "{}", gateway.log());
}
