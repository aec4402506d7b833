//! The memory this process may use, as the device registry reports it and the config bounds
//! budgets by: the machine's, or less where a cgroup limits it. The system is read through pure
//! parsers, each tested on text.

use std::path::{Path, PathBuf};

/// Bytes of memory this process may use: the machine's, or less where a cgroup limits it; 0
/// where the system does not say.
pub fn process_memory_limit() -> u64 {
    let physical = read("/proc/meminfo").and_then(|text| parse_meminfo_total(&text));
    let cgroup_files = read("/proc/self/cgroup")
        .map(|text| cgroup_limit_files(&text))
        .unwrap_or_default();
    let limits = cgroup_files
        .iter()
        .filter_map(|file| read(file).and_then(|text| parse_cgroup_limit(&text)));
    physical.into_iter().chain(limits).min().unwrap_or(0)
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
pub fn parse_meminfo_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let kib = line.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
    kib.checked_mul(1024)
}

/// A cgroup memory limit file's value: bytes, or `None` for "max" (no limit) or anything else.
/// cgroup v1 writes "no limit" as a huge number, which loses to the physical memory anyway.
pub fn parse_cgroup_limit(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// The memory limit files that bind this process, given `/proc/self/cgroup`: those of its cgroup
/// and of every ancestor (a parent's limit binds its children too), for cgroup v2 (the `0::`
/// line, `memory.max`) and v1 (the `memory` controller's line, `memory.limit_in_bytes`). In a
/// container the paths may not exist under the mount point; its root's file is in the list.
pub fn cgroup_limit_files(proc_self_cgroup: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for line in proc_self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (root, file) = if id == "0" && controllers.is_empty() {
            ("/sys/fs/cgroup", "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
        } else {
            continue;
        };
        let mut cgroup = Some(Path::new(path));
        while let Some(dir) = cgroup {
            let relative = dir.strip_prefix("/").unwrap_or(dir);
            files.push(Path::new(root).join(relative).join(file));
            cgroup = dir.parent();
        }
    }
    files
}

fn read(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_limits_parse_numbers_and_max() {
        assert_eq!(parse_cgroup_limit("8589934592\n"), Some(8 << 30));
        assert_eq!(parse_cgroup_limit("max\n"), None);
        assert_eq!(parse_cgroup_limit(""), None);
        // cgroup v1's "no limit".
        assert_eq!(
            parse_cgroup_limit("9223372036854771712\n"),
            Some(9223372036854771712)
        );
    }

    #[test]
    fn cgroup_files_cover_the_process_cgroup_and_its_ancestors() {
        let v2 = cgroup_limit_files("0::/user.slice/app.scope\n");
        let expected: Vec<PathBuf> = [
            "/sys/fs/cgroup/user.slice/app.scope/memory.max",
            "/sys/fs/cgroup/user.slice/memory.max",
            "/sys/fs/cgroup/memory.max",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(v2, expected);
        let v1 = cgroup_limit_files(
            "9:name=systemd:/\n5:devices:/\n4:memory:/jobs/42\n2:cpu,cpuacct:/\n0::/\n",
        );
        let expected: Vec<PathBuf> = [
            "/sys/fs/cgroup/memory/jobs/42/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/jobs/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory.max",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(v1, expected);
        assert!(cgroup_limit_files("garbage\n2:cpu:/\n").is_empty());
    }

    #[test]
    fn meminfo_total_is_read_in_bytes() {
        let meminfo = "MemTotal:       24683656 kB\nMemFree:        22479036 kB\n";
        assert_eq!(parse_meminfo_total(meminfo), Some(24683656 * 1024));
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo_total("MemTotal: lots\n"), None);
    }
}
