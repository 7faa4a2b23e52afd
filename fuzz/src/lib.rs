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
