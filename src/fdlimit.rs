//! The open-file limit against `limits.max_connections`: each connection is a file
//! descriptor, and a node that runs out refuses connections with an error that names no
//! setting. At start the node raises its soft limit to the hard one (as much as it may
//! without privileges) and warns, naming the settings, when even that is too low.

/// Descriptors a node holds besides its connections: the listener, Redis connections,
/// logs, the runtime's own.
const BESIDES: u64 = 64;

/// This process's open descriptors and its (soft) limit, for `/metrics`
/// (`process_open_fds`, `process_max_fds`); `None` where `/proc` or the limit cannot be read.
pub fn usage() -> (Option<u64>, Option<u64>) {
    let open = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|entries| entries.count().saturating_sub(1) as u64);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed to it.
    let max = (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0)
        .then_some(limit.rlim_cur);
    (open, max)
}

/// Raises the soft limit to the hard one; the warning to log when the limit is still
/// below `max_connections` (and what the node needs besides them).
pub fn raise_for(max_connections: usize) -> Option<String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    let need = (max_connections as u64).saturating_add(BESIDES);
    if limit.rlim_cur < need && limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max.min(need),
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    (limit.rlim_cur < need).then(|| {
        format!(
            "this process may open {} files, fewer than limits.max_connections ({max_connections}) plus {BESIDES}: connections past about {} will be refused. Raise the limit (LimitNOFILE={need} in the systemd unit, `ulimit -n {need}`, nofile in /etc/security/limits.conf) or lower limits.max_connections",
            limit.rlim_cur,
            limit.rlim_cur.saturating_sub(BESIDES)
        )
    })
}
