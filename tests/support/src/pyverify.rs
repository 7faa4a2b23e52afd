//! python3-dkim's verifiers (`arcverify`, `dkimverify`, Debian package python3-dkim) run
//! on a message, with dnspython pointed at the test DNS server instead of
//! /etc/resolv.conf: an independent implementation judging our output.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

/// `None` when python3-dkim is not installed.
pub fn run(tool: &str, dns: SocketAddr, message: &[u8]) -> Option<String> {
    if !std::path::Path::new(&format!("/usr/bin/{tool}")).exists() {
        super::skip(format!(
            "{tool}: python3-dkim is not installed (.ci/run installs it)"
        ));
        return None;
    }
    let module = match tool {
        "arcverify" => "dkim.arcverify",
        "dkimverify" => "dkim.dkimverify",
        other => panic!("unknown tool {other}"),
    };
    let script = format!(
        "import dns.resolver, sys\n\
r = dns.resolver.Resolver(configure=False)\n\
r.nameservers = ['{}']\n\
r.port = {}\n\
dns.resolver.default_resolver = r\n\
from {module} import main\n\
sys.argv = ['{tool}', '-v']\n\
main()\n",
        dns.ip(),
        dns.port()
    );
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child.stdin.take().unwrap().write_all(message).unwrap();
    let output = child.wait_with_output().unwrap();
    Some(format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}
