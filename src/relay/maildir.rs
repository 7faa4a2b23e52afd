//! The embedded default backend: delivery into one Maildir (tmp -> new, fsync).
//!
//! A message is acknowledged only after its file and the `new` directory entry are on
//! disk, so `kill -9` right after the 250 loses nothing. Files use LF line endings, as
//! Maildir readers expect. Every envelope recipient is recorded in a `Delivered-To`
//! header field, since one file serves all of them.

use super::OutboundMessage;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Maildir {
    root: PathBuf,
    hostname: String,
    counter: AtomicU64,
}

impl Maildir {
    /// Opens (creating if needed) the Maildir at `root`.
    pub fn open(root: &Path, hostname: &str) -> Result<Maildir, String> {
        for sub in ["tmp", "new", "cur"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create maildir {}: {e}", dir.display()))?;
        }
        Ok(Maildir {
            root: root.to_path_buf(),
            hostname: hostname.replace(['/', ':'], "_"),
            counter: AtomicU64::new(0),
        })
    }

    pub fn is_writable(&self) -> bool {
        let dir = self.root.join("tmp");
        std::fs::metadata(&dir).is_ok_and(|m| m.is_dir() && !m.permissions().readonly())
    }

    /// Stores the message; returns its unique name.
    pub fn deliver(
        &self,
        mail_from: &str,
        recipients: &[String],
        message: &OutboundMessage<'_>,
    ) -> io::Result<String> {
        let run = || self.write_file(mail_from, recipients, message);
        // fsync takes milliseconds: keep it off the async workers when we can.
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(run),
            _ => run(),
        }
    }

    fn write_file(
        &self,
        mail_from: &str,
        recipients: &[String],
        message: &OutboundMessage<'_>,
    ) -> io::Result<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let name = format!(
            "{}.M{}P{}Q{}.{}",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id(),
            self.counter.fetch_add(1, Ordering::Relaxed),
            self.hostname
        );
        let tmp = self.root.join("tmp").join(&name);
        let new = self.root.join("new").join(&name);
        let result = (|| {
            let mut file = io::BufWriter::new(File::create(&tmp)?);
            writeln!(file, "Return-Path: <{}>", one_line(mail_from))?;
            for rcpt in recipients {
                writeln!(file, "Delivered-To: {}", one_line(rcpt))?;
            }
            for segment in message.segments() {
                write_lf(&mut file, segment)?;
            }
            let file = file.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            fs::rename(&tmp, &new)?;
            File::open(self.root.join("new"))?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map(|()| name)
    }
}

fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

fn write_lf(out: &mut impl Write, mut bytes: &[u8]) -> io::Result<()> {
    while let Some(pos) = memchr::memmem::find(bytes, b"\r\n") {
        out.write_all(&bytes[..pos])?;
        out.write_all(b"\n")?;
        bytes = &bytes[pos + 2..];
    }
    out.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivers_atomically_into_new() {
        let dir = tempfile::tempdir().unwrap();
        let maildir = Maildir::open(dir.path(), "mx.test").unwrap();
        let message = OutboundMessage {
            prefix: b"Received: x\r\n",
            original: b"Subject: hi\r\n\r\nbody\r\n",
            skip: &[],
        };
        let name = maildir
            .deliver("a@b.test", &["c@d.test".into()], &message)
            .unwrap();
        let stored = fs::read_to_string(dir.path().join("new").join(&name)).unwrap();
        assert_eq!(
            stored,
            "Return-Path: <a@b.test>\nDelivered-To: c@d.test\nReceived: x\nSubject: hi\n\nbody\n"
        );
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
