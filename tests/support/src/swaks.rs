//! swaks (Debian's package) as the client a user would type: one message over
//! STARTTLS, its whole transcript returned.

use std::net::SocketAddr;
use std::process::{Command, ExitStatus};

pub struct Transcript {
    pub status: ExitStatus,
    /// stdout and stderr: swaks marks sent lines `~>` and replies `<~` once TLS runs.
    pub text: String,
}

/// Sends one message with `swaks --tls` and the given extra arguments (`--to`, ...).
/// `None` (a skip) when swaks, or its TLS support, is not installed.
pub async fn send_tls(server: SocketAddr, args: &[&str]) -> Option<Transcript> {
    let mut command = Command::new("swaks");
    command
        .args(["--server", &server.to_string()])
        .arg("--tls")
        .args(args);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("swaks task");
    let output = match output {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            super::skip("swaks not installed (apt-get install swaks)");
            return None;
        }
        Err(e) => panic!("run swaks: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if text.contains("TLS not available: requires Net::SSLeay") {
        super::skip("swaks cannot do TLS here (apt-get install libnet-ssleay-perl)");
        return None;
    }
    Some(Transcript {
        status: output.status,
        text,
    })
}

impl Transcript {
    /// swaks succeeded and really used STARTTLS; `context` (a server log) goes into the
    /// failure message.
    pub fn assert_delivered_over_tls(&self, context: &str) {
        assert!(
            self.status.success(),
            "swaks failed ({}):\n{}\n{context}",
            self.status,
            self.text
        );
        assert!(
            self.text.contains("=== TLS started"),
            "no STARTTLS:\n{}",
            self.text
        );
    }
}
