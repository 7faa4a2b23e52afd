//! The command reader (`smtp::command::CommandReader`, smtp-proto underneath).
//!
//! Invariants, beyond "no panic":
//! - one line, up to its LF, is exactly one command or one refusal: never two
//!   commands from one line, never a command from the rest of a refused line, and
//!   nothing from a line that has not ended;
//! - how the input is cut into reads does not change anything;
//! - every read makes progress, and every refusal is a 5xx with an enhanced status.
//!
//! Input: the first byte seeds how the rest is cut into reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxgate_fuzz::cuts;
use mxgate::smtp::command::{Command, CommandReader};

fuzz_target!(|input: &[u8]| {
    let Some((&seed, data)) = input.split_first() else {
        return;
    };
    // Every line ends, so each one must have given its command by the end.
    let mut data = data.to_vec();
    if data.last() != Some(&b'\n') {
        data.push(b'\n');
    }
    let data = data.as_slice();
    let lines = data.iter().filter(|&&b| b == b'\n').count();

    let whole = run(&[data]);
    let bytewise = run(&data.chunks(1).collect::<Vec<_>>());
    let cut = run(&cuts(data, seed, 1));
    assert_eq!(
        whole.len(),
        lines,
        "one command per line: {lines} lines gave {whole:?}"
    );
    assert_eq!(bytewise, whole, "bytewise reads differ from one read");
    assert_eq!(cut, whole, "cut reads differ from one read");
    for command in &whole {
        if let Command::Refused(reply) = command {
            assert!(
                (500..600).contains(&reply.code()) && reply.status().is_some(),
                "refusal {reply:?}"
            );
        }
    }
});

/// Every command and refusal in the reads, in order.
fn run(reads: &[&[u8]]) -> Vec<Command> {
    let mut reader = CommandReader::default();
    let mut commands = Vec::new();
    for read in reads {
        let mut rest = *read;
        while !rest.is_empty() {
            let (used, command) = reader.read(rest);
            assert!(
                used > 0 && used <= rest.len(),
                "used {used} of {}",
                rest.len()
            );
            if let Some(command) = command {
                // A command is complete only at the end of its line (an overlong line
                // is refused at once, and the rest of it skipped).
                let ended = rest[..used].last() == Some(&b'\n');
                let refused_early = matches!(command, Command::Refused(_)) && !ended;
                assert!(ended || refused_early, "{command:?} before its line ended");
                commands.push(command);
            }
            rest = &rest[used..];
        }
    }
    commands
}

