//! The descriptors this process may open: its soft limit, raised once to the hard limit.

/// Raises this process's soft limit on open descriptors to its hard limit, once. A task holds a
/// descriptor per connection and per shared-memory segment in use; the usual soft limit of 1024
/// would make accepts, connects and memfds fail long before memory runs out.
pub fn raise_open_file_limit() {
    static RAISED: std::sync::Once = std::sync::Once::new();
    RAISED.call_once(|| {
        if let Some(mut limit) = open_file_limits()
            && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            // SAFETY: sets this process's limit from a valid struct. Where it cannot be raised,
            // the task runs within the lower limit.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
        }
    });
}

/// The descriptors this process may open now (its soft limit); 1024 where the system does not
/// say.
pub fn open_file_limit() -> usize {
    open_file_limits().map_or(1024, |limit| {
        usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
    })
}

fn open_file_limits() -> Option<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into `limit`.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit)
}
