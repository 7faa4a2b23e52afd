//! Bounded message storage while a message is being received.
//!
//! Content is kept in memory up to a threshold; past it, everything moves to an
//! anonymous temporary file (already unlinked, so a crash leaves nothing behind, and
//! nothing is lost either because the client has not been answered yet). The finished
//! message is handed out as one contiguous byte slice, memory-mapped when it was
//! spooled, because the authentication checks need the whole message at once.
//!
//! The size limit is enforced here: past `limit` the spool stops storing and remembers
//! that it overflowed; the session reads the rest of the data and answers 552.

use std::fs::File;
use std::io::{self, Write};
use std::ops::Deref;
use std::path::PathBuf;

/// Where decoded message content goes (the spool, or a `Vec` in tests).
pub trait ContentSink {
    fn write(&mut self, bytes: &[u8]);
}

impl ContentSink for Vec<u8> {
    fn write(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

#[derive(Debug)]
pub struct Spool {
    memory: Vec<u8>,
    file: Option<io::BufWriter<File>>,
    len: u64,
    limit: u64,
    threshold: usize,
    dir: Option<PathBuf>,
    overflowed: bool,
    error: Option<io::Error>,
}

/// The bytes of a received message.
#[derive(Debug)]
pub enum MessageBytes {
    Memory(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl Deref for MessageBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            MessageBytes::Memory(bytes) => bytes,
            MessageBytes::Mapped(map) => map,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("message exceeds the size limit")]
    TooBig,
    #[error("spool I/O error: {0}")]
    Io(#[from] io::Error),
}

impl Spool {
    pub fn new(limit: u64, threshold: usize, dir: Option<PathBuf>, size_hint: usize) -> Self {
        let initial = size_hint.clamp(4096, threshold.max(4096)).min(1 << 20);
        Spool {
            memory: Vec::with_capacity(initial),
            file: None,
            len: 0,
            limit,
            threshold,
            dir,
            overflowed: false,
            error: None,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Finishes the message. Fails if it overflowed the limit or the disk failed.
    pub fn finish(self) -> Result<MessageBytes, SpoolError> {
        if self.overflowed {
            return Err(SpoolError::TooBig);
        }
        if let Some(err) = self.error {
            return Err(SpoolError::Io(err));
        }
        match self.file {
            None => Ok(MessageBytes::Memory(self.memory)),
            Some(writer) => {
                let file = writer.into_inner().map_err(|e| e.into_error())?;
                // SAFETY: the file is an unlinked temporary that only this process holds;
                // nothing else can truncate or change it while the map is alive.
                #[allow(unsafe_code)]
                let map = unsafe { memmap2::Mmap::map(&file)? };
                Ok(MessageBytes::Mapped(map))
            }
        }
    }

    fn move_to_file(&mut self) -> io::Result<()> {
        let file = match &self.dir {
            Some(dir) => tempfile::tempfile_in(dir)?,
            None => tempfile::tempfile()?,
        };
        let mut writer = io::BufWriter::with_capacity(64 * 1024, file);
        writer.write_all(&self.memory)?;
        self.memory = Vec::new();
        self.file = Some(writer);
        Ok(())
    }
}

impl ContentSink for Spool {
    fn write(&mut self, bytes: &[u8]) {
        if self.overflowed || self.error.is_some() {
            return;
        }
        if self.len + bytes.len() as u64 > self.limit {
            self.overflowed = true;
            self.memory = Vec::new();
            self.file = None;
            return;
        }
        self.len += bytes.len() as u64;
        if self.file.is_none()
            && self.memory.len() + bytes.len() > self.threshold
            && let Err(err) = self.move_to_file()
        {
            self.error = Some(err);
            return;
        }
        // Local file writes land in the page cache; they are not worth a thread hop.
        let result = match &mut self.file {
            Some(writer) => writer.write_all(bytes),
            None => {
                self.memory.extend_from_slice(bytes);
                Ok(())
            }
        };
        if let Err(err) = result {
            self.error = Some(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_message_stays_in_memory() {
        let mut spool = Spool::new(1000, 100, None, 0);
        spool.write(b"hello");
        match spool.finish().unwrap() {
            MessageBytes::Memory(bytes) => assert_eq!(bytes, b"hello"),
            MessageBytes::Mapped(_) => panic!("should be in memory"),
        }
    }

    #[test]
    fn large_message_spools_to_file() {
        let mut spool = Spool::new(10_000, 100, None, 0);
        for _ in 0..50 {
            spool.write(b"0123456789");
        }
        let bytes = spool.finish().unwrap();
        assert!(matches!(bytes, MessageBytes::Mapped(_)));
        assert_eq!(bytes.len(), 500);
        assert_eq!(&bytes[490..], b"0123456789");
    }

    #[test]
    fn limit_is_enforced() {
        let mut spool = Spool::new(10, 100, None, 0);
        spool.write(b"0123456789");
        spool.write(b"x");
        assert!(spool.overflowed());
        assert!(matches!(spool.finish(), Err(SpoolError::TooBig)));
    }
}
