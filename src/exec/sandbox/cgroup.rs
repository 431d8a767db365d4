//! The control groups an action runs in (cgroup v1 or v2): memory and pids limits, memory
//! and CPU accounting, and a handle that reaches every process of the action.
//!
//! Each executor process makes `casfs-PID` in its own cgroup of every hierarchy it uses (a
//! shared memory cap for all its actions: `hierarchy`), and one `action-N` below it per
//! action. The action's first process joins them itself, before it does anything else, so
//! everything it starts is counted, limited and killed with it. Nothing here is visible to
//! the action.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::hierarchy::{layout, parents, read, write};
use crate::error::{Error, IoContext, Result};

pub use super::hierarchy::total_ram;

/// What an action used, from its cgroup counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Highest memory use of all its processes together (page cache and tmpfs included).
    pub peak_memory: u64,
    /// CPU time in user mode.
    pub user_cpu: Duration,
    /// CPU time in the kernel.
    pub system_cpu: Duration,
    /// Processes the kernel killed for going over the memory limit.
    pub oom_kills: u64,
}

fn field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The cgroups of one action; removed (after killing what is left in them) by `remove`.
#[derive(Debug)]
pub struct ActionCgroup {
    dirs: Vec<(PathBuf, bool)>,
    memory: Option<usize>,
    cpu: Option<usize>,
    /// `cgroup.procs` (v2) or `tasks` (v1) of each, open for writing: the action's first
    /// process, single-threaded, writes `0` (itself) to each before anything else.
    pub procs: Vec<OwnedFd>,
}

impl ActionCgroup {
    /// Makes the cgroups of one action with these limits (0 = none). No memory controller
    /// while a memory limit is asked for is an error; a missing pids controller a warning.
    pub fn create(memory_limit: u64, pids_limit: u32) -> Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let l = layout();
        if memory_limit > 0 && l.memory.is_none() {
            return Err(Error::FailedPrecondition(
                "no memory cgroup controller here to enforce the memory limit (run without one with --memory-limit 0)"
                    .into(),
            ));
        }
        if pids_limit > 0 && l.pids.is_none() {
            tracing::warn!("no pids cgroup available: the pids limit is not enforced");
        }
        let parents = parents(memory_limit)?;
        let name = format!("action-{}", N.fetch_add(1, Ordering::Relaxed));
        let mut cg = ActionCgroup { dirs: Vec::new(), memory: l.memory, cpu: l.cpu, procs: Vec::new() };
        for (h, parent) in l.hierarchies.iter().zip(&parents) {
            let dir = parent.join(&name);
            std::fs::create_dir(&dir).ctx(|| format!("creating {}", dir.display()))?;
            cg.dirs.push((dir, h.v2));
        }
        if let Some(i) = l.memory.filter(|_| memory_limit > 0) {
            let (dir, v2) = &cg.dirs[i];
            if *v2 {
                write(&dir.join("memory.max"), &memory_limit.to_string())?;
                let _ = std::fs::write(dir.join("memory.swap.max"), "0");
            } else {
                write(&dir.join("memory.limit_in_bytes"), &memory_limit.to_string())?;
                // No swap either, where swap is accounted.
                let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), memory_limit.to_string());
            }
        }
        if let Some(i) = l.pids.filter(|_| pids_limit > 0) {
            write(&cg.dirs[i].0.join("pids.max"), &pids_limit.to_string())?;
        }
        for (dir, v2) in &cg.dirs {
            // v1: `tasks`, which moves the writing thread alone (the child has just the
            // one) without the global lock whose RCU grace period makes a move through
            // `cgroup.procs` cost 10-15 ms.
            let file = dir.join(if *v2 { "cgroup.procs" } else { "tasks" });
            let f =
                std::fs::OpenOptions::new().write(true).open(&file).ctx(|| format!("opening {}", file.display()))?;
            cg.procs.push(f.into());
        }
        Ok(cg)
    }

    /// The processes still in the action's cgroup.
    fn pids(&self) -> Vec<i32> {
        let Some((dir, _)) = self.dirs.first() else { return Vec::new() };
        read(&dir.join("cgroup.procs")).lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    /// Sends SIGKILL to every process of the action (v2: `cgroup.kill`).
    pub fn kill_all(&self) {
        if let Some((dir, true)) = self.dirs.first() {
            if std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
                return;
            }
        }
        for pid in self.pids() {
            // SAFETY: kill(2) with a pid read from the action's own cgroup; it has no
            // memory effects, and a pid that has gone meanwhile is ESRCH.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// What the action used so far.
    pub fn usage(&self) -> Usage {
        let mut u = Usage::default();
        if let Some((dir, v2)) = self.memory.map(|i| &self.dirs[i]) {
            if *v2 {
                u.peak_memory = read(&dir.join("memory.peak")).trim().parse().unwrap_or(0);
                u.oom_kills = field(&read(&dir.join("memory.events")), "oom_kill").unwrap_or(0);
            } else {
                u.peak_memory = read(&dir.join("memory.max_usage_in_bytes")).trim().parse().unwrap_or(0);
                u.oom_kills = field(&read(&dir.join("memory.oom_control")), "oom_kill").unwrap_or(0);
            }
        }
        if let Some((dir, v2)) = self.cpu.map(|i| &self.dirs[i]) {
            if *v2 {
                let stat = read(&dir.join("cpu.stat"));
                u.user_cpu = Duration::from_micros(field(&stat, "user_usec").unwrap_or(0));
                u.system_cpu = Duration::from_micros(field(&stat, "system_usec").unwrap_or(0));
            } else {
                let ns = |f: &str| read(&dir.join(f)).trim().parse::<u64>().ok();
                match (ns("cpuacct.usage_user"), ns("cpuacct.usage_sys")) {
                    (Some(user), Some(sys)) => {
                        (u.user_cpu, u.system_cpu) = (Duration::from_nanos(user), Duration::from_nanos(sys));
                    }
                    _ => {
                        // Older kernels: clock ticks of 10 ms.
                        let stat = read(&dir.join("cpuacct.stat"));
                        u.user_cpu = Duration::from_millis(field(&stat, "user").unwrap_or(0) * 10);
                        u.system_cpu = Duration::from_millis(field(&stat, "system").unwrap_or(0) * 10);
                    }
                }
            }
        }
        u
    }

    /// Kills whatever is left of the action and waits (without blocking the runtime) until
    /// the kernel has let go of its last process.
    pub async fn drain(&self) {
        for i in 0..2500 {
            if self.pids().is_empty() {
                return;
            }
            self.kill_all();
            if i < 20 {
                // Most are gone within a millisecond (bubblewrap's own processes exit just
                // after the one we wait for): look again soon before settling for 2 ms.
                crate::exec::blocking(|| std::thread::sleep(Duration::from_micros(100)));
            } else {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        tracing::warn!("processes of an action survived SIGKILL for 5 s");
    }

    /// Kills whatever is left of the action and removes its cgroups, polling without
    /// blocking the runtime until the kernel has let go of the last process.
    pub async fn remove(mut self) {
        self.procs.clear();
        for _ in 0..2000 {
            self.kill_all();
            self.dirs.retain(|(d, _)| std::fs::remove_dir(d).is_err() && d.exists());
            if self.dirs.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Drop tries once more and reports.
    }
}

impl Drop for ActionCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            self.kill_all();
            self.dirs.retain(|(d, _)| std::fs::remove_dir(d).is_err() && d.exists());
            if self.dirs.is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for (d, _) in &self.dirs {
            tracing::warn!(cgroup = %d.display(), "could not remove the action's cgroup");
        }
    }
}

/// Kills every process in `dir` and below, then removes the folders; returns how many
/// processes were signalled.
fn remove_tree(dir: &Path) -> usize {
    let mut killed = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                killed += remove_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        let procs = read(&dir.join("cgroup.procs"));
        let pids: Vec<i32> = procs.lines().filter_map(|l| l.trim().parse().ok()).collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: kill(2) on a pid listed in a dead executor's cgroup; no memory effects.
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Err(err) = std::fs::remove_dir(dir) {
        tracing::warn!(cgroup = %dir.display(), error = %err, "could not remove a dead executor's cgroup");
    }
    killed
}

/// Kills the processes of actions whose executor died (SIGKILL, crash) and removes their
/// cgroups: `casfs-PID...` where no process PID exists any more, in this process's own
/// cgroups and, from older versions, at the top of the pids and v2 hierarchies. Returns how
/// many processes were killed. Cgroups of live executors are never touched.
pub fn reap_orphans() -> usize {
    let mut bases: Vec<PathBuf> = layout().hierarchies.iter().map(|h| h.own.clone()).collect();
    for legacy in ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"] {
        if !bases.iter().any(|b| b == Path::new(legacy)) {
            bases.push(legacy.into());
        }
    }
    let mut killed = 0;
    for base in bases {
        let Ok(rd) = std::fs::read_dir(&base) else { continue };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(owner) = name.strip_prefix("casfs-").and_then(|r| r.split('-').next()) else { continue };
            let Ok(owner) = owner.parse::<u32>() else { continue };
            if owner == std::process::id() || Path::new(&format!("/proc/{owner}")).exists() {
                continue;
            }
            killed += remove_tree(&e.path());
        }
    }
    if killed > 0 {
        tracing::warn!(processes = killed, "killed the processes of actions whose executor died");
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_by_name() {
        assert_eq!(field("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", "oom_kill"), Some(3));
        assert_eq!(field("usage_usec 10\nuser_usec 7\nsystem_usec 3\n", "user_usec"), Some(7));
    }
}
