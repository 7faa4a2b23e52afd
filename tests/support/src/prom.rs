//! Prometheus from a test: HTTP GET over a plain TCP connection (a metrics endpoint,
//! Prometheus' API), and the text exposition format parsed just enough to read values.
//! Calls nothing of mxgate's: it reads what any scraper would.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET `target` (path and query); returns the status code and the body.
pub async fn http_get(addr: SocketAddr, target: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(15), exchange)
        .await
        .unwrap_or_else(|_| panic!("GET http://{addr}{target} timed out"))
        .unwrap_or_else(|e| panic!("GET http://{addr}{target}: {e}"));
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP header in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    (status, String::from_utf8(body).expect("UTF-8 body"))
}

/// A `Transfer-Encoding: chunked` body's content.
fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
            .expect("chunk size");
        if size == 0 {
            return out;
        }
        let start = eol + 2;
        out.extend_from_slice(&data[start..start + size]);
        data = &data[start + size + 2..];
    }
}

/// `text` as a URL query value (every byte outside the unreserved set as `%XX`).
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

// The text exposition format, parsed just enough to read values.

/// One sample line: metric name, labels, value.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of a text exposition (comments and blank lines skipped).
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).expect("sample line");
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if rest.starts_with('{') {
            let mut chars = rest[1..].char_indices();
            let mut key = String::new();
            let mut consumed = 0;
            while let Some((i, c)) = chars.next() {
                match c {
                    '}' => {
                        consumed = i + 2;
                        break;
                    }
                    ',' | ' ' => {}
                    '=' => {
                        assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
                        let mut value = String::new();
                        while let Some((_, c)) = chars.next() {
                            match c {
                                '\\' => match chars.next().map(|(_, c)| c) {
                                    Some('n') => value.push('\n'),
                                    Some(other) => value.push(other),
                                    None => {}
                                },
                                '"' => break,
                                other => value.push(other),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), value);
                    }
                    other => key.push(other),
                }
            }
            rest = &rest[consumed..];
        }
        let value = rest.split_whitespace().next().expect("sample value");
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    samples
}

/// The sum of every sample of `name` whose labels include `labels`.
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// `"a=x,b=y"` as label pairs.
pub fn label_spec(spec: &str) -> Vec<(&str, &str)> {
    spec.split(',')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').expect("label=value"))
        .collect()
}

/// The samples a metrics endpoint (`/metrics` at `metrics`) exposes now.
pub async fn scrape(metrics: SocketAddr) -> Vec<Sample> {
    parse_exposition(&exposition(metrics).await)
}

/// The exposition text a metrics endpoint (`/metrics` at `metrics`) serves now.
pub async fn exposition(metrics: SocketAddr) -> String {
    let (status, body) = http_get(metrics, "/metrics").await;
    assert_eq!(status, 200, "/metrics: {body}");
    body
}

/// The value of one series, written as exported (`name` or `name{a="x",b="y"}`, every
/// label in the exporter's order), in an exposition text (a scrape, or
/// `mxgate::metrics::render()` for this process's registry); `None` when absent.
pub fn value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.starts_with(' ').then(|| rest.trim().parse().ok())?
    })
}
