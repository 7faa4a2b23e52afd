//! The DATA reader (`smtp::data::DataReader`) against a plain reference decoder.
//!
//! Invariants, beyond "no panic":
//! - the data ends exactly at the first `<CRLF>.<CRLF>` (the CRLF of the DATA command
//!   counts as the first one), never anywhere else;
//! - the decoded content equals the reference: every line ending (CRLF, bare CR, bare
//!   LF) becomes CRLF, a line starting with `.` loses that one dot unless it is a lone
//!   `.`, NUL bytes are dropped; the anomalies flagged are the ones present;
//! - how the input is cut into reads does not change anything;
//! - the output is canonical (no bare CR, LF or NUL) and survives the relay's
//!   re-stuffing: `dot_stuff_into` + `.` CRLF reads back to the same content.
//!
//! Input: the first byte seeds how the rest is cut into reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxgate_fuzz::cuts;
use mxgate::smtp::data::{Anomalies, DataReader, Progress, dot_stuff_into};

fuzz_target!(|input: &[u8]| {
    let Some((&seed, data)) = input.split_first() else {
        return;
    };
    let mut data = data.to_vec();
    if end_of_data(&data).is_none() {
        // Always reach the end, so content and anomalies can be compared in full.
        data.extend_from_slice(b"\r\n.\r\n");
    }
    let (consumed, content, anomalies) = reference(&data);

    let whole = run(&[&data]);
    let bytewise = run(&data.chunks(1).collect::<Vec<_>>());
    let cut = run(&cuts(&data, seed, 1));
    for (name, got) in [("whole", &whole), ("bytewise", &bytewise), ("cut", &cut)] {
        assert_eq!(
            got.0,
            Some(consumed),
            "{name}: end of data at the wrong place"
        );
        assert_eq!(got.1, content, "{name}: content differs from the reference");
        assert_eq!(
            got.2, anomalies,
            "{name}: anomalies differ from the reference"
        );
    }
    assert_canonical(&content);

    let mut wire = Vec::new();
    dot_stuff_into(&content, true, &mut wire);
    wire.extend_from_slice(b".\r\n");
    let again = run(&[&wire]);
    assert_eq!(again.0, Some(wire.len()), "re-stuffed content ended early");
    assert_eq!(
        again.1, content,
        "re-stuffed content reads back differently"
    );
    assert_eq!(
        again.2,
        Anomalies {
            longest_line: anomalies.longest_line,
            ..Anomalies::default()
        }
    );
});

/// Feeds the reads in order; returns where the data ended (counted from the start of
/// all input), the content and the anomalies.
fn run(reads: &[&[u8]]) -> (Option<usize>, Vec<u8>, Anomalies) {
    let mut reader = DataReader::new();
    let mut out = Vec::new();
    let mut offset = 0;
    for read in reads {
        if let Progress::End { consumed } = reader.feed(read, &mut out) {
            assert!(consumed <= read.len());
            return (Some(offset + consumed), out, reader.anomalies());
        }
        offset += read.len();
    }
    (None, out, reader.anomalies())
}


/// Where `.` CRLF ends the data: the first `CRLF . CRLF`, with the CRLF of the DATA
/// command in front of the content. Returns the length of the content part (which
/// keeps that CRLF) and the number of bytes consumed.
fn end_of_data(data: &[u8]) -> Option<(usize, usize)> {
    let mut framed = b"\r\n".to_vec();
    framed.extend_from_slice(data);
    framed
        .windows(5)
        .position(|w| w == b"\r\n.\r\n")
        .map(|at| (at, at + 3))
}

fn reference(data: &[u8]) -> (usize, Vec<u8>, Anomalies) {
    let (content_len, consumed) = end_of_data(data).expect("the input was given an end");
    let raw = &data[..content_len];
    let mut anomalies = Anomalies::default();
    let mut out = Vec::new();
    let mut at = 0;
    while at < raw.len() {
        // A line and its ending: CRLF, or a bare CR, or a bare LF.
        let end = raw[at..]
            .iter()
            .position(|&b| b == b'\r' || b == b'\n')
            .map_or(raw.len(), |p| at + p);
        let line = &raw[at..end];
        at = match (raw.get(end), raw.get(end + 1)) {
            (Some(b'\r'), Some(b'\n')) => end + 2,
            (Some(b'\r'), _) => {
                anomalies.bare_cr = true;
                end + 1
            }
            (Some(b'\n'), _) => {
                anomalies.bare_lf = true;
                end + 1
            }
            _ => unreachable!("content ends with CRLF"),
        };
        let unstuffed = match line {
            b"." => line,
            _ => line.strip_prefix(b".").unwrap_or(line),
        };
        if unstuffed.contains(&0) {
            anomalies.nul = true;
        }
        out.extend(unstuffed.iter().copied().filter(|&b| b != 0));
        out.extend_from_slice(b"\r\n");
    }
    anomalies.longest_line = longest_line(&out);
    (consumed, out, anomalies)
}

/// Octets in the longest line of canonical content, its CRLF not counted (the last
/// line may be unterminated).
fn longest_line(out: &[u8]) -> usize {
    out.split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line).len())
        .max()
        .unwrap_or(0)
}


fn assert_canonical(out: &[u8]) {
    for (n, &b) in out.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(out.get(n + 1), Some(&b'\n'), "bare CR at {n}"),
            b'\n' => assert!(n > 0 && out[n - 1] == b'\r', "bare LF at {n}"),
            0 => panic!("NUL at {n}"),
            _ => {}
        }
    }
}
