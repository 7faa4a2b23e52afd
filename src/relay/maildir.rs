//! The embedded default backend: delivery into one Maildir (tmp -> new, fsync).
//!
//! A message is acknowledged only after its file and the `new` directory entry are on
//! disk, so `kill -9` right after the 250 loses nothing. Files use LF line endings, as
//! Maildir readers expect. Every envelope recipient is recorded in a `Delivered-To`
//! header field, since one file serves all of them.

use super::OutboundMessage;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Mail is private: only the gateway's user reads it (as Postfix and Dovecot do).
const FILE_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;

/// One counter for the whole process: a reload opens the Maildir again, and names
/// must stay unique across the old and the new one.
static DELIVERIES: AtomicU64 = AtomicU64::new(0);

pub struct Maildir {
    root: PathBuf,
    /// The machine's name (not the configured greeting name, which replicas share).
    host: String,
}

impl Maildir {
    /// Opens (creating if needed) the Maildir at `root`.
    pub fn open(root: &Path) -> Result<Maildir, String> {
        for sub in ["tmp", "new", "cur"] {
            let dir = root.join(sub);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(&dir)
                .map_err(|e| format!("cannot create maildir {}: {e}", dir.display()))?;
        }
        Ok(Maildir {
            root: root.to_path_buf(),
            host: machine_name().replace(['/', ':'], "_"),
        })
    }

    /// Whether this process may create files in `tmp` and `new` (for readiness).
    pub fn is_writable(&self) -> bool {
        ["tmp", "new"].iter().all(|sub| {
            let dir = self.root.join(sub);
            let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
                return false;
            };
            // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
            #[allow(unsafe_code)]
            let writable = unsafe { libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) == 0 };
            writable
        })
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

    fn unique_name(&self) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        format!(
            "{}.M{}P{}Q{}.{}",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id(),
            DELIVERIES.fetch_add(1, Ordering::Relaxed),
            self.host
        )
    }

    fn write_file(
        &self,
        mail_from: &str,
        recipients: &[String],
        message: &OutboundMessage<'_>,
    ) -> io::Result<String> {
        // A name already taken (another process writing into the same Maildir) is
        // never overwritten: `create_new` and `link` fail instead, and we pick another.
        for _ in 0..8 {
            let name = self.unique_name();
            let tmp = self.root.join("tmp").join(&name);
            let new = self.root.join("new").join(&name);
            let file = match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .open(&tmp)
            {
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
                other => other?,
            };
            let result = (|| {
                let mut file = io::BufWriter::new(file);
                writeln!(file, "Return-Path: <{}>", one_line(mail_from))?;
                for rcpt in recipients {
                    writeln!(file, "Delivered-To: {}", one_line(rcpt))?;
                }
                for segment in message.segments() {
                    write_lf(&mut file, segment)?;
                }
                let file = file.into_inner().map_err(|e| e.into_error())?;
                file.sync_all()?;
                fs::hard_link(&tmp, &new)
            })();
            let _ = fs::remove_file(&tmp);
            match result {
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(err) => return Err(err),
                Ok(()) => {
                    File::open(self.root.join("new"))?.sync_all()?;
                    return Ok(name);
                }
            }
        }
        Err(io::Error::other(
            "no unique Maildir file name after 8 tries",
        ))
    }
}

/// The machine's host name, for unique file names (Maildir's third part).
fn machine_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates or fails.
    #[allow(unsafe_code)]
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(0);
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if ok && !name.is_empty() => name.to_string(),
        _ => "localhost".to_string(),
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
        let maildir = Maildir::open(dir.path()).unwrap();
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
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("new").join(&name)), 0o600);
        assert_eq!(mode(&dir.path().join("new")), 0o700);
        assert!(maildir.is_writable());
    }

    /// Two Maildir objects on one directory (a reload opens it again) never hand out
    /// the same name, and an existing file is never replaced.
    #[test]
    fn names_stay_unique_across_instances() {
        let dir = tempfile::tempdir().unwrap();
        let message = OutboundMessage {
            prefix: b"",
            original: b"Subject: hi\r\n\r\nbody\r\n",
            skip: &[],
        };
        let first = Maildir::open(dir.path()).unwrap();
        let second = Maildir::open(dir.path()).unwrap();
        let mut names = std::collections::HashSet::new();
        for _ in 0..50 {
            for maildir in [&first, &second] {
                let name = maildir
                    .deliver("a@b.test", &["c@d.test".into()], &message)
                    .unwrap();
                assert!(names.insert(name));
            }
        }
        assert_eq!(fs::read_dir(dir.path().join("new")).unwrap().count(), 100);
    }
}
