//! The sink: a minimal, cheap SMTP server in this process that counts what it takes
//! (or a private Postfix from the test kit in its place).

use mxgate_test_kit::postfix;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Sink {
    pub addr: SocketAddr,
    /// Messages the internal sink took.
    messages: Option<Arc<AtomicU64>>,
    /// Keeps the Postfix instance running (stopped and removed on drop).
    _postfix: Option<postfix::Postfix>,
}

impl Sink {
    pub async fn start() -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("sink bind");
        let addr = listener.local_addr().expect("sink address");
        let messages = Arc::new(AtomicU64::new(0));
        let counter = messages.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let counter = counter.clone();
                        tokio::spawn(async move {
                            let _ = sink_session(stream, counter).await;
                        });
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
        Sink {
            addr,
            messages: Some(messages),
            _postfix: None,
        }
    }

    /// A private Postfix that delivers everything for example.test into a Maildir.
    pub fn postfix() -> Result<Sink, String> {
        use postfix::{Postfix, PostfixOptions};
        let postfix = Postfix::start(PostfixOptions::mailbox(&["example.test"]))
            .map_err(|why| format!("cannot run Postfix as the sink: {why}"))?;
        Ok(Sink {
            addr: postfix.addr,
            messages: None,
            _postfix: Some(postfix),
        })
    }

    pub fn received(&self) -> Option<u64> {
        self.messages.as_ref().map(|m| m.load(Ordering::Relaxed))
    }
}

/// Finds the end of DATA: the strict `CRLF . CRLF`, where the CRLF that ended the DATA
/// command counts as the first one (so `.` CRLF right away is an empty message).
struct EndOfData {
    /// How many bytes of the marker the input seen so far ends with.
    matched: usize,
}

const END_OF_DATA: &[u8] = b"\r\n.\r\n";

impl EndOfData {
    fn new() -> Self {
        EndOfData { matched: 2 }
    }

    /// Feeds content; returns how many bytes of `input` belong to the message (marker
    /// included) when the marker was found.
    fn feed(&mut self, input: &[u8]) -> Option<usize> {
        // Continue a marker begun in earlier input. A mismatch cannot hide a marker that
        // starts before `input` (no proper suffix of a partial marker that ends before the
        // mismatch is a prefix of it), so the search below only looks inside `input`.
        if self.matched > 0 {
            let need = &END_OF_DATA[self.matched..];
            let n = need.len().min(input.len());
            if input[..n] == need[..n] {
                if n == need.len() {
                    return Some(n);
                }
                self.matched += n;
                return None;
            }
        }
        if let Some(pos) = memchr::memmem::find(input, END_OF_DATA) {
            return Some(pos + END_OF_DATA.len());
        }
        self.matched = (1..END_OF_DATA.len())
            .rev()
            .find(|&k| k <= input.len() && input.ends_with(&END_OF_DATA[..k]))
            .unwrap_or(0);
        None
    }
}

async fn sink_session(mut stream: TcpStream, messages: Arc<AtomicU64>) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.write_all(b"220 sink.bench ESMTP\r\n").await?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut start, mut end) = (0usize, 0usize);
    let mut out: Vec<u8> = Vec::with_capacity(512);
    let mut data: Option<EndOfData> = None;
    loop {
        let mut quit = false;
        while start < end {
            if let Some(eod) = &mut data {
                match eod.feed(&buf[start..end]) {
                    Some(used) => {
                        start += used;
                        data = None;
                        messages.fetch_add(1, Ordering::Relaxed);
                        out.extend_from_slice(b"250 2.0.0 Ok: queued\r\n");
                    }
                    None => start = end,
                }
                continue;
            }
            let Some(nl) = memchr::memchr(b'\n', &buf[start..end]) else {
                break;
            };
            let line = &buf[start..start + nl + 1];
            start += nl + 1;
            let verb = line.get(..4).map(|v| v.to_ascii_uppercase());
            match verb.as_deref() {
                Some(b"EHLO") => out.extend_from_slice(
                    b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 104857600\r\n",
                ),
                Some(b"HELO") => out.extend_from_slice(b"250 sink.bench\r\n"),
                Some(b"MAIL") => out.extend_from_slice(b"250 2.1.0 Ok\r\n"),
                Some(b"RCPT") => out.extend_from_slice(b"250 2.1.5 Ok\r\n"),
                Some(b"DATA") => {
                    out.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                    data = Some(EndOfData::new());
                }
                Some(b"RSET") | Some(b"NOOP") => out.extend_from_slice(b"250 2.0.0 Ok\r\n"),
                Some(b"QUIT") => {
                    out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                    quit = true;
                    break;
                }
                _ => out.extend_from_slice(b"500 5.5.2 Unknown command\r\n"),
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if quit {
            return Ok(());
        }
        if start == end {
            start = 0;
            end = 0;
        } else if end == buf.len() {
            if start == 0 {
                // A command line longer than the buffer: not something we send.
                return Ok(());
            }
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        let n = stream.read(&mut buf[end..]).await?;
        if n == 0 {
            return Ok(());
        }
        end += n;
    }
}
