//! `limits.store`, parsed: `memory` or a Redis/Valkey URL. It lives with the config so
//! that validation can check it without reaching up into `limits`; the URL may hold a
//! password, so errors never repeat it and only [`StoreUrl::redacted`] is ever logged.

use redis::Client;

/// `limits.store`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    Memory,
    Redis(String),
}

impl StoreUrl {
    /// The error never repeats the URL, which may hold a password.
    pub fn parse(text: &str) -> Result<StoreUrl, String> {
        if text == "memory" {
            return Ok(StoreUrl::Memory);
        }
        const EXPECTED: &str =
            "expected `memory`, `redis://[:password@]host[:port][/db]` or `rediss://…` (TLS)";
        let scheme = text.split_once("://").map(|(scheme, _)| scheme);
        if !matches!(scheme, Some("redis" | "rediss")) {
            return Err(format!("unknown store; {EXPECTED}"));
        }
        Client::open(text).map_err(|_| format!("not a valid Redis URL; {EXPECTED}"))?;
        Ok(StoreUrl::Redis(text.to_string()))
    }

    /// Scheme, host, port and database: what a log line may say.
    pub fn redacted(&self) -> String {
        match self {
            StoreUrl::Memory => "memory".into(),
            StoreUrl::Redis(url) => redact(url),
        }
    }
}

fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "redis".into();
    };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_are_checked_and_never_echoed() {
        assert_eq!(StoreUrl::parse("memory"), Ok(StoreUrl::Memory));
        for ok in [
            "redis://127.0.0.1:6379/0",
            "redis://:secret@redis.example.net",
            "rediss://user:secret@redis.example.net:6380/2",
        ] {
            assert!(
                matches!(StoreUrl::parse(ok), Ok(StoreUrl::Redis(_))),
                "{ok}"
            );
        }
        for bad in [
            "",
            "Memory",
            "http://secret@host",
            "redis://:secret@host:notaport",
        ] {
            let err = StoreUrl::parse(bad).unwrap_err();
            assert!(!err.contains("secret"), "{err}");
        }
        let url = StoreUrl::parse("rediss://user:secret@redis.example.net:6380/2?x=y").unwrap();
        assert_eq!(url.redacted(), "rediss://redis.example.net:6380/2");
        assert_eq!(
            StoreUrl::parse("redis://:p@ss@h:1/0").unwrap().redacted(),
            "redis://h:1/0"
        );
    }
}
