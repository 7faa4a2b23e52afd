//! The minimum data rate (Postfix 3.7's `smtpd_min_data_rate`): a client sending a
//! message must keep up `min_data_rate` bytes per second on average, measured from the
//! start of the message once `grace` (`server.timeouts.data_block`) has passed. A read
//! timeout alone does not stop a client that sends one byte just before each deadline.
//!
//! No timer per byte: the meter is a start time and a byte count, checked before each
//! read; the read's deadline is the moment the average would fall below the minimum if
//! nothing more arrived, so a silent client is caught as well.

use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug)]
pub struct DataMeter {
    started: Instant,
    bytes: u64,
}

impl DataMeter {
    pub fn start(now: Instant) -> Self {
        DataMeter {
            started: now,
            bytes: 0,
        }
    }

    pub fn add(&mut self, bytes: usize) {
        self.bytes = self.bytes.saturating_add(bytes as u64);
    }

    /// When the average falls below `min_rate` unless more bytes arrive; `None` when
    /// the minimum is off (0).
    pub fn deadline(&self, min_rate: u64, grace: Duration) -> Option<Instant> {
        if min_rate == 0 {
            return None;
        }
        // Absurd values (a `data_block` of centuries) mean no deadline, never a panic.
        let earned = Duration::try_from_secs_f64(self.bytes as f64 / min_rate as f64).ok()?;
        self.started.checked_add(grace.max(earned))
    }

    /// Bytes per second so far (for the log line).
    pub fn rate(&self, now: Instant) -> u64 {
        let secs = now.duration_since(self.started).as_secs_f64();
        if secs <= 0.0 {
            return self.bytes;
        }
        (self.bytes as f64 / secs) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_is_the_grace_or_what_the_bytes_earned() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(10);
        let mut meter = DataMeter::start(t0);
        assert_eq!(meter.deadline(500, grace), Some(t0 + grace));
        meter.add(2_500);
        assert_eq!(meter.deadline(500, grace), Some(t0 + grace));
        meter.add(7_500);
        // 10,000 bytes at 500 B/s last 20 s.
        assert_eq!(
            meter.deadline(500, grace),
            Some(t0 + Duration::from_secs(20))
        );
        assert_eq!(meter.deadline(0, grace), None);
        assert_eq!(meter.deadline(500, Duration::MAX), None);
    }
}
