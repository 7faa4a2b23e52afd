//! Helpers shared by the fuzz targets.

/// Lines as YAML (and so the positions it reports) counts them: CRLF, CR, LF, and
/// libyaml's NEL, LS and PS each end one.
pub fn yaml_lines(text: &str) -> usize {
    let mut lines = 1;
    let mut chars = text.chars().peekable();
    while let Some(ch) = chars.next() {
        match ch {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                lines += 1;
            }
            '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => lines += 1,
            _ => {}
        }
    }
    lines
}

/// How a peer might cut `data` into reads: pseudo-random sizes from `seed`, each
/// `smallest..smallest + 64` bytes (0 allows empty reads, e.g. an empty BDAT chunk).
pub fn cuts(data: &[u8], seed: u8, smallest: usize) -> Vec<&[u8]> {
    let mut state = u32::from(seed) | 0x100;
    let mut reads = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let size = (((state >> 16) % 64) as usize + smallest).min(rest.len());
        let (read, tail) = rest.split_at(size);
        reads.push(read);
        rest = tail;
    }
    reads
}
