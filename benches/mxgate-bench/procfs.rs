//! What the kernel says about processes: CPU time (a process's, a thread's, the whole
//! machine's), resident memory, and the open-files limit. Linux /proc and libc only.

// getrlimit/setrlimit/sysconf: plain libc calls with pointers to locals.
#![allow(unsafe_code)]

pub struct NofileLimit {
    before: u64,
    pub soft: u64,
    pub hard: u64,
}

impl NofileLimit {
    pub fn describe(&self) -> String {
        if self.soft > self.before {
            format!("raised from {}", self.before)
        } else {
            "unchanged".into()
        }
    }
}

/// Raises RLIMIT_NOFILE of this process (and so of the gateway child, which inherits
/// it) to the hard limit, and the hard limit too when it is below `wanted` and we may.
// `rlim_t` is u64 on 64-bit Linux but not everywhere: the casts are deliberate.
#[allow(clippy::unnecessary_cast)]
pub fn raise_nofile_limit(wanted: u64) -> NofileLimit {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls with a valid pointer to a local.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    let before = limit.rlim_cur as u64;
    let hard = limit.rlim_max as u64;
    let mut target = libc::rlimit {
        rlim_cur: (hard.min(1 << 20)).max(before) as libc::rlim_t,
        rlim_max: limit.rlim_max,
    };
    if (target.rlim_cur as u64) < wanted {
        // Needs CAP_SYS_RESOURCE; falls back to the hard limit below.
        let raised = libc::rlimit {
            rlim_cur: wanted as libc::rlim_t,
            rlim_max: wanted as libc::rlim_t,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            target = raised;
        }
    }
    unsafe {
        libc::setrlimit(libc::RLIMIT_NOFILE, &target);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    NofileLimit {
        before,
        soft: limit.rlim_cur as u64,
        hard: limit.rlim_max as u64,
    }
}

/// CPU time of a process (all threads), in seconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTime {
    pub user: f64,
    pub system: f64,
}

impl CpuTime {
    pub fn total(self) -> f64 {
        self.user + self.system
    }

    pub fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }
}

/// utime and stime of a process (this one for `None`) from /proc/<pid>/stat.
pub fn proc_cpu(pid: Option<i32>) -> Option<CpuTime> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".into(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    // The command name may contain spaces: fields are counted after its closing paren.
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Field 14 (utime) and 15 (stime) of proc(5); `after` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(CpuTime {
        user: utime as f64 / ticks,
        system: stime as f64 / ticks,
    })
}

/// A `Vm...:` line of /proc/<pid>/status, in kB.
pub fn proc_status_kb(pid: i32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// (busy, total) jiffies of the whole machine.
pub fn machine_cpu() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}
