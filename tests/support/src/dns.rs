//! A real DNS server for tests: UDP and TCP on 127.0.0.1, answering from an in-memory
//! zone that tests fill in (and change) while the gateway runs. Names can be told to
//! time out or to fail with SERVFAIL, which is how DNS trouble reaches a mail server.

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, PTR, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

/// What a name answers.
#[derive(Clone, Debug, Default)]
pub struct Entry {
    pub records: Vec<RData>,
    /// Queries for types without records get no answer at all (the client times out)
    /// instead of an empty NOERROR.
    pub timeout_other_types: bool,
    /// Queries of these types get no answer at all, even when records exist.
    pub timeout_types: Vec<RecordType>,
    pub servfail: bool,
    /// TTL of the answers; 300 s when not set.
    pub ttl: Option<u32>,
    /// Answers are sent this long after the query (a slow authoritative server).
    pub delay: Option<std::time::Duration>,
}

#[derive(Default)]
struct Zone {
    names: HashMap<String, Entry>,
    /// Names absent from the zone that start with one of these prefixes time out
    /// instead of answering NXDOMAIN.
    timeout_prefixes: Vec<String>,
    /// Queries seen per name (lowercase, no trailing dot).
    asked: HashMap<String, usize>,
}

pub struct TestDns {
    pub addr: SocketAddr,
    zone: Arc<RwLock<Zone>>,
    queries: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The zone key of a name from the wire: its labels as they are (no escaping), joined.
fn wire_key(name: &Name) -> String {
    let labels: Vec<String> = name
        .iter()
        .map(|label| String::from_utf8_lossy(label).into_owned())
        .collect();
    key(&labels.join("."))
}

impl TestDns {
    pub async fn start() -> TestDns {
        // UDP and TCP on the same port, as resolvers expect for TCP fallback.
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let port = udp.local_addr().unwrap().port();
            if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let zone = Arc::new(RwLock::new(Zone::default()));
        let queries = Arc::new(AtomicUsize::new(0));
        let udp = Arc::new(udp);
        let (z, q) = (zone.clone(), queries.clone());
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                    return;
                };
                q.fetch_add(1, Ordering::Relaxed);
                let delay = delay_of(&z, &buf[..n]);
                if let Some(response) = answer(&z, &buf[..n], 1232) {
                    match delay {
                        Some(delay) => {
                            let udp = udp.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let _ = udp.send_to(&response, peer).await;
                            });
                        }
                        None => {
                            let _ = udp.send_to(&response, peer).await;
                        }
                    }
                }
            }
        });
        let (z, q) = (zone.clone(), queries.clone());
        let tcp_task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = tcp.accept().await else {
                    return;
                };
                let (z, q) = (z.clone(), q.clone());
                tokio::spawn(async move {
                    loop {
                        let mut len = [0u8; 2];
                        if stream.read_exact(&mut len).await.is_err() {
                            return;
                        }
                        let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
                        if stream.read_exact(&mut query).await.is_err() {
                            return;
                        }
                        q.fetch_add(1, Ordering::Relaxed);
                        if let Some(delay) = delay_of(&z, &query) {
                            tokio::time::sleep(delay).await;
                        }
                        if let Some(response) = answer(&z, &query, 65535) {
                            let mut out = (response.len() as u16).to_be_bytes().to_vec();
                            out.extend_from_slice(&response);
                            if stream.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        TestDns {
            addr,
            zone,
            queries,
            tasks: vec![udp_task, tcp_task],
        }
    }

    /// The YAML for the gateway's `dns:` section pointing at this server.
    pub fn config(&self) -> String {
        format!(
            "dns:\n  nameservers: [\"{}\"]\n  timeout: 500ms\n  attempts: 1\n",
            self.addr
        )
    }

    /// How many queries (any type) asked for `name`.
    pub fn queries_for(&self, name: &str) -> usize {
        self.zone
            .read()
            .unwrap()
            .asked
            .get(&key(name))
            .copied()
            .unwrap_or(0)
    }

    /// Answers for `name` carry this TTL.
    pub fn ttl(&self, name: &str, seconds: u32) {
        self.with_entry(name, |e| e.ttl = Some(seconds));
    }

    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::Relaxed)
    }

    fn with_entry(&self, name: &str, change: impl FnOnce(&mut Entry)) {
        let mut zone = self.zone.write().unwrap();
        change(zone.names.entry(key(name)).or_default());
    }

    pub fn add(&self, name: &str, rdata: RData) {
        self.with_entry(name, |e| e.records.push(rdata));
    }

    /// A TXT record; long values are split into 255-octet strings of one record.
    pub fn txt(&self, name: &str, value: &str) {
        self.txt_bytes(name, value.as_bytes());
    }

    pub fn txt_bytes(&self, name: &str, value: &[u8]) {
        let parts: Vec<&[u8]> = if value.is_empty() {
            vec![value]
        } else {
            value.chunks(255).collect()
        };
        self.add(name, RData::TXT(TXT::from_bytes(parts)));
    }

    /// A TXT record made of several character-strings, exactly as given.
    pub fn txt_strings(&self, name: &str, strings: &[&[u8]]) {
        self.add(name, RData::TXT(TXT::from_bytes(strings.to_vec())));
    }

    pub fn a(&self, name: &str, ip: &str) {
        match ip.parse::<IpAddr>().unwrap() {
            IpAddr::V4(v4) => self.add(name, RData::A(A(v4))),
            IpAddr::V6(v6) => self.add(name, RData::AAAA(AAAA(v6))),
        }
    }

    pub fn mx(&self, name: &str, preference: u16, host: &str) {
        self.add(name, RData::MX(MX::new(preference, fqdn(host))));
    }

    pub fn cname(&self, name: &str, target: &str) {
        self.add(name, RData::CNAME(CNAME(fqdn(target))));
    }

    /// A PTR for an IP address (the reverse name is derived).
    pub fn ptr(&self, ip: &str, host: &str) {
        let ip: IpAddr = ip.parse().unwrap();
        self.ptr_name(&reverse_name(ip), host);
    }

    pub fn ptr_name(&self, reverse: &str, host: &str) {
        self.add(reverse, RData::PTR(PTR(fqdn(host))));
    }

    /// Queries for `name` are never answered.
    pub fn timeout(&self, name: &str) {
        self.with_entry(name, |e| e.timeout_other_types = true);
    }

    /// Queries of types `name` has no records for are never answered.
    pub fn timeout_other_types(&self, name: &str) {
        self.timeout(name);
    }

    /// `name` answers again: undoes `timeout`, `timeout_type` and `servfail`.
    pub fn answer_again(&self, name: &str) {
        self.with_entry(name, |e| {
            e.timeout_other_types = false;
            e.timeout_types.clear();
            e.servfail = false;
        });
    }

    /// Queries for `name` of type `rtype` are never answered (other types are).
    pub fn timeout_type(&self, name: &str, rtype: RecordType) {
        self.with_entry(name, |e| e.timeout_types.push(rtype));
    }

    /// Names that are not in the zone and start with `prefix` (for example `error.`)
    /// time out instead of answering NXDOMAIN.
    pub fn timeout_absent_with_prefix(&self, prefix: &str) {
        self.zone
            .write()
            .unwrap()
            .timeout_prefixes
            .push(prefix.to_ascii_lowercase());
    }

    /// Answers for `name` come `delay` after the query.
    pub fn delay(&self, name: &str, delay: std::time::Duration) {
        self.with_entry(name, |e| e.delay = Some(delay));
    }

    /// Makes `name` exist (NOERROR with no data for every type) without records.
    pub fn exists(&self, name: &str) {
        self.with_entry(name, |_| {});
    }

    pub fn servfail(&self, name: &str) {
        self.with_entry(name, |e| e.servfail = true);
    }

    /// Removes everything known about `name`.
    pub fn remove(&self, name: &str) {
        self.zone.write().unwrap().names.remove(&key(name));
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

pub fn fqdn(name: &str) -> Name {
    let mut text = name.to_string();
    if !text.ends_with('.') {
        text.push('.');
    }
    Name::from_ascii(&text).unwrap_or_else(|_| Name::from_utf8(&text).unwrap())
}

pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut out = String::new();
            for byte in v6.octets().iter().rev() {
                out.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
            }
            out.push_str("ip6.arpa");
            out
        }
    }
}

fn record_type(rdata: &RData) -> RecordType {
    rdata.record_type()
}

/// How long to wait before answering `query`, if its name is slow.
fn delay_of(zone: &RwLock<Zone>, query: &[u8]) -> Option<std::time::Duration> {
    let request = Message::from_vec(query).ok()?;
    let name = wire_key(request.queries.first()?.name());
    zone.read().unwrap().names.get(&name)?.delay
}

/// Builds the response to one query, or `None` to stay silent (a timeout).
fn answer(zone: &RwLock<Zone>, query: &[u8], max_len: usize) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let question = request.queries.first()?.clone();
    let mut response = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.authoritative = true;
    response.add_query(question.clone());
    if let Some(edns) = &request.edns {
        let mut out = edns.clone();
        out.set_max_payload(1232);
        response.set_edns(out);
    }
    let qtype = question.query_type();
    *zone
        .write()
        .unwrap()
        .asked
        .entry(wire_key(question.name()))
        .or_default() += 1;
    let zone = zone.read().unwrap();
    let mut owner = question.name().clone();
    let mut name_key = wire_key(&owner);
    let mut visited = vec![name_key.clone()];
    let mut answers = Vec::new();
    // Follow CNAMEs (a few levels, stopping at a loop), answering with the chain.
    for _ in 0..8 {
        let Some(entry) = zone.names.get(&name_key) else {
            if zone
                .timeout_prefixes
                .iter()
                .any(|prefix| name_key.starts_with(prefix.as_str()))
            {
                return None;
            }
            break;
        };
        if entry.servfail {
            response.metadata.response_code = ResponseCode::ServFail;
            return response.to_vec().ok();
        }
        if entry.timeout_types.contains(&qtype) {
            return None;
        }
        let matching: Vec<&RData> = entry
            .records
            .iter()
            .filter(|r| record_type(r) == qtype || qtype == RecordType::ANY)
            .collect();
        if !matching.is_empty() {
            let ttl = entry.ttl.unwrap_or(300);
            for rdata in matching {
                answers.push(Record::from_rdata(owner.clone(), ttl, rdata.clone()));
            }
            break;
        }
        if let Some(RData::CNAME(target)) =
            entry.records.iter().find(|r| matches!(r, RData::CNAME(_)))
        {
            answers.push(Record::from_rdata(owner, 300, RData::CNAME(target.clone())));
            owner = target.0.clone();
            name_key = wire_key(&owner);
            if visited.contains(&name_key) {
                break;
            }
            visited.push(name_key.clone());
            continue;
        }
        if entry.timeout_other_types {
            return None;
        }
        break;
    }
    let exists = answers.is_empty() && zone.names.contains_key(&name_key);
    if answers.is_empty() {
        response.metadata.response_code = if exists {
            ResponseCode::NoError
        } else {
            ResponseCode::NXDomain
        };
        let soa = SOA::new(
            fqdn("ns.test"),
            fqdn("hostmaster.test"),
            1,
            3600,
            600,
            86400,
            60,
        );
        response.add_authority(Record::from_rdata(fqdn("test"), 60, RData::SOA(soa)));
    } else {
        for record in answers {
            response.add_answer(record);
        }
    }
    let bytes = response.to_vec().ok()?;
    if bytes.len() > max_len {
        let mut truncated = response.truncate();
        truncated.metadata.id = request.metadata.id;
        return truncated.to_vec().ok();
    }
    Some(bytes)
}
