//! The command line: `serve`, `check`, `explain`, `keygen`, `profile`, one module each
//! (`check`'s DNS checks in `dnscheck` and `hostcheck`). The top layer: it may call
//! every other module, and none calls it.

pub mod dnscheck;
pub mod explain;
pub mod hostcheck;
pub mod keygen;
pub mod profile;
pub mod serve;

use crate::config;
use crate::snapshot::{self, Mode};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "mxgate",
    version,
    about = "Inbound SMTP gateway: in-line relay with SPF, DKIM, DMARC, ARC and sender policy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, default_value = "mxgate.yaml")]
        config: PathBuf,
    },
    /// Validate the configuration (and everything it refers to) and exit.
    Check {
        #[arg(long, default_value = "mxgate.yaml")]
        config: PathBuf,
    },
    /// Evaluate one message offline, against the configured DNS: every check, its
    /// result, and the verdict the gateway would give.
    Explain {
        #[arg(long, default_value = "mxgate.yaml")]
        config: PathBuf,
        /// The connecting client's IP address.
        #[arg(long)]
        ip: std::net::IpAddr,
        /// The name the client gave in EHLO/HELO.
        #[arg(long)]
        helo: String,
        /// The envelope sender (`""` for the null sender).
        #[arg(long = "mail-from")]
        mail_from: String,
        /// An envelope recipient (repeat for several).
        #[arg(long = "rcpt", required = true)]
        rcpt: Vec<String>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// The client used TLS (for rules matching on tls / tls_version: 1.3).
        #[arg(long)]
        tls: bool,
        /// The message file (LF or CRLF line endings).
        message: PathBuf,
    },
    /// Generate an ARC sealing key (mode 0600) and print the DNS record to publish.
    Keygen {
        #[arg(long, value_enum, default_value = "rsa")]
        algorithm: crate::cmd::keygen::KeyAlgorithm,
        /// RSA key size.
        #[arg(long, default_value_t = 2048)]
        bits: usize,
        /// The `d=` of the seals (arc.domain).
        #[arg(long)]
        domain: String,
        /// The selector (arc.selector).
        #[arg(long)]
        selector: String,
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print what to configure on the mailbox side (Exchange Server, Exchange Online,
    /// Google Workspace).
    Profile {
        #[arg(value_enum)]
        target: crate::cmd::profile::Target,
        #[arg(long, default_value = "mxgate.yaml")]
        config: PathBuf,
        /// An address (or CIDR range) mxgate connects to the mailbox side from (repeat
        /// for several); default: the specific addresses of `server.listen`.
        #[arg(long = "address", value_parser = address)]
        address: Vec<String>,
    },
}

/// `--address`: an IP address or network, written back as the address alone when the
/// network is one host.
fn address(text: &str) -> Result<String, String> {
    let network = config::Network::try_from(text.to_string())?.0;
    Ok(if network.prefix_len() == network.max_prefix_len() {
        network.addr().to_string()
    } else {
        network.to_string()
    })
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => crate::cmd::serve::serve(&config),
        Command::Check { config } => check(&config),
        Command::Explain {
            config,
            ip,
            helo,
            mail_from,
            rcpt,
            json,
            tls,
            message,
        } => crate::cmd::explain::run(crate::cmd::explain::Request {
            tls,
            config,
            ip,
            helo,
            mail_from,
            rcpts: rcpt,
            message,
            json,
        }),
        Command::Keygen {
            algorithm,
            bits,
            domain,
            selector,
            out,
            force,
        } => crate::cmd::keygen::run(algorithm, bits, &domain, &selector, &out, force),
        Command::Profile {
            target,
            config,
            address,
        } => match config::load(&config) {
            Ok((loaded, _)) => {
                print!(
                    "{}",
                    crate::cmd::profile::render(target, &loaded.config, &address)
                );
                0
            }
            Err(errors) => {
                for error in errors {
                    eprintln!("{error}");
                }
                1
            }
        },
    }
}

fn check(path: &std::path::Path) -> i32 {
    let (loaded, mut diagnostics) = config::load_for_check(path);
    let loaded = match loaded {
        Some(loaded) if !config::diagnostics::has_errors(&diagnostics) => loaded,
        found => {
            // Errors in the main file: still read the policy files it names, so one
            // run shows everything there is to fix.
            if let Some(loaded) = found {
                diagnostics.extend(crate::policy::compile::load(&loaded).1);
            }
            for d in &diagnostics {
                eprintln!("{d}");
            }
            return 1;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return 1;
        }
    };
    let result = runtime.block_on(async {
        let (snapshot, mut warnings) = snapshot::compile(loaded, 1, Mode::Check, None)?;
        if let Some(auth) = &snapshot.auth {
            warnings.extend(crate::cmd::dnscheck::arc_key_warnings(&snapshot.loaded, auth).await);
            warnings.extend(crate::cmd::dnscheck::spf_record_warnings(&snapshot, auth).await);
            warnings.extend(crate::cmd::hostcheck::client_host_warnings(&snapshot, auth).await);
        }
        Ok::<_, Vec<config::Diagnostic>>(warnings)
    });
    match result {
        Ok(warnings) => {
            diagnostics.extend(warnings);
            for d in &diagnostics {
                eprintln!("{d}");
            }
            println!("{}: OK", path.display());
            0
        }
        Err(errors) => {
            diagnostics.extend(errors);
            for d in &diagnostics {
                eprintln!("{d}");
            }
            1
        }
    }
}
