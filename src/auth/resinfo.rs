//! Reading Authentication-Results written by someone else (RFC 8601 grammar): the
//! ARC-Authentication-Results of a trusted sealer is what an override relies on.

/// One `method=result` with its properties, e.g. `dmarc=pass header.from=x.test`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodResult {
    pub method: String,
    pub result: String,
    pub properties: Vec<(String, String)>,
}

impl MethodResult {
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The results of an (ARC-)Authentication-Results value. An `i=N;` instance tag and the
/// authserv-id are skipped.
pub fn parse(value: &str) -> Vec<MethodResult> {
    let mut statements = split_statements(value).into_iter();
    let mut first = statements.next().unwrap_or_default();
    if first.trim_start().starts_with("i=") {
        first = statements.next().unwrap_or_default();
    }
    let _authserv_id = first;
    statements.filter_map(|s| parse_resinfo(&s)).collect()
}

/// Splits on `;` outside comments and quoted strings, dropping comments.
fn split_statements(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut depth = 0usize;
    let mut quoted = false;
    let mut chars = value.chars();
    while let Some(ch) = chars.next() {
        match ch {
            // A quoted-pair stays as it is inside a quoted string (the value is
            // unquoted once, at the end, so `\"` can never end it early); inside a
            // comment it is dropped with the comment.
            '\\' if quoted || depth > 0 => {
                if let Some(next) = chars.next()
                    && depth == 0
                {
                    current.push('\\');
                    current.push(next);
                }
            }
            '"' if depth == 0 => {
                quoted = !quoted;
                current.push(ch);
            }
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => {
                depth -= 1;
                current.push(' ');
            }
            ';' if !quoted && depth == 0 => out.push(std::mem::take(&mut current)),
            _ if depth > 0 => {}
            _ => current.push(ch),
        }
    }
    out.push(current);
    out
}

fn parse_resinfo(statement: &str) -> Option<MethodResult> {
    let mut tokens = tokens(statement).into_iter();
    let head = tokens.next()?;
    let (method, result) = head.split_once('=')?;
    let method = method.split('/').next().unwrap_or(method);
    let mut properties = Vec::new();
    for token in tokens {
        if let Some((key, value)) = token.split_once('=') {
            properties.push((key.to_ascii_lowercase(), unquote(value)));
        }
    }
    Some(MethodResult {
        method: method.trim().to_ascii_lowercase(),
        result: result.trim().to_ascii_lowercase(),
        properties,
    })
}

/// A property value: a quoted string loses its quotes and its quoted-pairs become the
/// characters they stand for (RFC 5322 3.2.4); a token is taken as it is.
fn unquote(value: &str) -> String {
    let Some(inner) = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .filter(|_| value.len() >= 2)
    else {
        return value.to_string();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(ch) = chars.next() {
        match ch {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

/// Whitespace-separated tokens, keeping quoted strings (with their quoted-pairs)
/// whole; `a = b` is joined.
fn tokens(statement: &str) -> Vec<String> {
    let mut raw = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = statement.chars();
    while let Some(ch) = chars.next() {
        match ch {
            '\\' if quoted => {
                current.push(ch);
                current.extend(chars.next());
            }
            '"' => {
                quoted = !quoted;
                current.push(ch);
            }
            c if c.is_whitespace() && !quoted => {
                if !current.is_empty() {
                    raw.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        raw.push(current);
    }
    let mut joined: Vec<String> = Vec::new();
    let mut iter = raw.into_iter().peekable();
    while let Some(token) = iter.next() {
        if token == "=" {
            if let (Some(last), Some(next)) = (joined.last_mut(), iter.next()) {
                last.push('=');
                last.push_str(&next);
            }
        } else if token.ends_with('=') && token.len() > 1 {
            let mut token = token;
            if let Some(next) = iter.next() {
                token.push_str(&next);
            }
            joined.push(token);
        } else if token.starts_with('=') && !joined.is_empty() {
            if let Some(last) = joined.last_mut() {
                last.push_str(&token);
            }
        } else {
            joined.push(token);
        }
    }
    joined
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An escaped quote inside a quoted value does not end it: the mail-from below is
    /// at attacker.test, not `@quar.test`.
    #[test]
    fn quoted_pairs_stay_inside_their_value() {
        let aar = r#"i=1; mx.example.test; spf=pass smtp.mailfrom="@quar.test\" x@attacker.test"; dmarc=fail header.from=quar.test"#;
        let results = parse(aar);
        assert_eq!(results.len(), 2, "{results:?}");
        assert_eq!(
            results[0].property("smtp.mailfrom"),
            Some(r#"@quar.test" x@attacker.test"#)
        );
        assert_eq!(results[1].property("header.from"), Some("quar.test"));
        let semicolon = parse(r#"x.test; spf=pass smtp.mailfrom="a\;b@c.test"; dkim=none"#);
        assert_eq!(semicolon.len(), 2);
        assert_eq!(semicolon[0].property("smtp.mailfrom"), Some("a;b@c.test"));
    }

    #[test]
    fn parses_a_google_aar() {
        let aar = "i=1; mx.google.com;\r\n       dkim=pass header.i=@netvisor.fi header.s=s1 header.b=\"AbC/d=\";\r\n       spf=pass (google.com: domain of x@amazonses.com designates 54.240.1.1 as permitted sender) smtp.mailfrom=x@amazonses.com;\r\n       dmarc=pass (p=REJECT sp=REJECT dis=NONE) header.from=netvisor.fi";
        let results = parse(aar);
        assert_eq!(results.len(), 3);
        assert_eq!(results[0].method, "dkim");
        assert_eq!(results[0].property("header.i"), Some("@netvisor.fi"));
        assert_eq!(results[0].property("header.b"), Some("AbC/d="));
        assert_eq!(results[1].result, "pass");
        assert_eq!(
            results[1].property("smtp.mailfrom"),
            Some("x@amazonses.com")
        );
        assert_eq!(results[2].method, "dmarc");
        assert_eq!(results[2].property("header.from"), Some("netvisor.fi"));
    }

    #[test]
    fn comments_and_quotes_cannot_forge_statements() {
        let aar = "i=1; evil.test; spf=fail (dmarc=pass; header.from=bank.test) smtp.mailfrom=\"a;dmarc=pass@x\"";
        let results = parse(aar);
        assert_eq!(results.len(), 1, "{results:?}");
        assert_eq!(results[0].method, "spf");
        assert_eq!(results[0].result, "fail");
    }

    #[test]
    fn none_and_versions() {
        assert!(parse("mx.test; none").iter().all(|r| r.method != "dmarc"));
        let r = parse("mx.test 1; dkim/1=pass header.d = x.test");
        assert_eq!(r[0].method, "dkim");
        assert_eq!(r[0].property("header.d"), Some("x.test"));
    }
}
