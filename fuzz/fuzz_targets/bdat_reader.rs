//! The BDAT reader (`smtp::data::BdatReader`) against a plain reference.
//!
//! Invariants, beyond "no panic": every line ending (CRLF, bare CR, bare LF) comes out
//! as CRLF, NUL bytes are dropped, nothing else changes (no dot-unstuffing: chunks are
//! counted, not terminated); the anomalies flagged are the ones present; how the
//! message is cut into chunks and reads does not change anything.
//!
//! Input: the first byte seeds how the rest is cut.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxgate_fuzz::cuts;
use mxgate::smtp::data::{Anomalies, BdatReader};

fuzz_target!(|input: &[u8]| {
    let Some((&seed, data)) = input.split_first() else {
        return;
    };
    let expected = reference(data);
    let whole = run(&[data]);
    let bytewise = run(&data.chunks(1).collect::<Vec<_>>());
    let cut = run(&cuts(data, seed, 0));
    for (name, got) in [("whole", &whole), ("bytewise", &bytewise), ("cut", &cut)] {
        assert_eq!(
            got.0, expected.0,
            "{name}: content differs from the reference"
        );
        assert_eq!(
            got.1, expected.1,
            "{name}: anomalies differ from the reference"
        );
    }
});

fn run(reads: &[&[u8]]) -> (Vec<u8>, Anomalies) {
    let mut reader = BdatReader::new();
    let mut out = Vec::new();
    for read in reads {
        reader.feed(read, &mut out);
    }
    reader.finish(&mut out);
    (out, reader.anomalies())
}


fn reference(data: &[u8]) -> (Vec<u8>, Anomalies) {
    let mut anomalies = Anomalies::default();
    let mut out = Vec::with_capacity(data.len());
    let mut at = 0;
    while at < data.len() {
        match (data[at], data.get(at + 1)) {
            (b'\r', Some(b'\n')) => {
                out.extend_from_slice(b"\r\n");
                at += 2;
                continue;
            }
            (b'\r', _) => {
                anomalies.bare_cr = true;
                out.extend_from_slice(b"\r\n");
            }
            (b'\n', _) => {
                anomalies.bare_lf = true;
                out.extend_from_slice(b"\r\n");
            }
            (0, _) => anomalies.nul = true,
            (b, _) => out.push(b),
        }
        at += 1;
    }
    anomalies.longest_line = longest_line(&out);
    (out, anomalies)
}

/// Octets in the longest line of canonical content, its CRLF not counted (the last
/// line may be unterminated).
fn longest_line(out: &[u8]) -> usize {
    out.split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line).len())
        .max()
        .unwrap_or(0)
}

