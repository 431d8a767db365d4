//! The control groups an action runs in (cgroup v1 or v2): memory and pids limits, memory
//! and CPU accounting, and a handle that reaches every process of the action.
//!
//! Each executor process makes `casfs-PID` in its own cgroup of every hierarchy it uses (a
//! shared memory cap for all its actions), and one `action-N` below it per action. The
//! action's first process joins them itself, before it does anything else, so everything
//! it starts is counted, limited and killed with it. Nothing here is visible to the action.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::error::{Error, IoContext, Result};

/// One mounted hierarchy and this process's own cgroup folder in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    own: PathBuf,
    v2: bool,
}

/// Where the controllers casfs uses live on this host.
#[derive(Debug, Default, PartialEq, Eq)]
struct Layout {
    hierarchies: Vec<Hierarchy>,
    memory: Option<usize>,
    pids: Option<usize>,
    cpu: Option<usize>,
}

/// Reads `/proc/self/mountinfo` and `/proc/self/cgroup`: a v1 hierarchy per controller,
/// else the v2 hierarchy where its own cgroup may enable it (`v2_controllers` reads the
/// `cgroup.controllers` of a folder).
fn parse_layout(mountinfo: &str, self_cgroup: &str, v2_controllers: impl Fn(&Path) -> String) -> Layout {
    let mut layout = Layout::default();
    let path_of = |ctl: Option<&str>| {
        self_cgroup.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctls, path) = (f.next()?, f.next()?, f.next()?);
            let hit = match ctl {
                Some(c) => ctls.split(',').any(|x| x == c),
                None => ctls.is_empty(),
            };
            hit.then(|| path.to_string())
        })
    };
    let mut add = |h: Hierarchy| match layout.hierarchies.iter().position(|x| *x == h) {
        Some(i) => i,
        None => {
            layout.hierarchies.push(h);
            layout.hierarchies.len() - 1
        }
    };
    let mut v2 = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        let (root, mnt, fstype, opts) = (l[3], l[4], r[0], r[2]);
        let own = |path: String| -> Option<PathBuf> {
            let rel = Path::new(&path).strip_prefix(root).ok()?;
            Some(Path::new(mnt).join(rel))
        };
        if fstype == "cgroup2" {
            v2 = path_of(None).and_then(own);
            continue;
        }
        if fstype != "cgroup" {
            continue;
        }
        for (ctl, slot) in [("memory", 0), ("pids", 1), ("cpuacct", 2)] {
            if !opts.split(',').any(|o| o == ctl) {
                continue;
            }
            if let Some(dir) = path_of(Some(ctl)).and_then(own) {
                let i = add(Hierarchy { own: dir, v2: false });
                *[&mut layout.memory, &mut layout.pids, &mut layout.cpu][slot] = Some(i);
            }
        }
    }
    if let Some(dir) = v2 {
        let available = v2_controllers(&dir);
        let has = |c: &str| available.split_whitespace().any(|x| x == c);
        let want_mem = layout.memory.is_none() && has("memory");
        let want_pids = layout.pids.is_none() && has("pids");
        // cpu.stat is a core file of every v2 cgroup: CPU time needs no controller.
        if want_mem || want_pids || layout.cpu.is_none() {
            let i = add(Hierarchy { own: dir, v2: true });
            if want_mem {
                layout.memory = Some(i);
            }
            if want_pids {
                layout.pids = Some(i);
            }
            if layout.cpu.is_none() {
                layout.cpu = Some(i);
            }
        }
    }
    layout
}

fn layout() -> &'static Layout {
    static L: OnceLock<Layout> = OnceLock::new();
    L.get_or_init(|| {
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let cg = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        parse_layout(&mi, &cg, |d| std::fs::read_to_string(d.join("cgroup.controllers")).unwrap_or_default())
    })
}

/// The machine's RAM in bytes (0 if unknown).
pub fn total_ram() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).ctx(|| format!("writing {value:?} to {}", path.display()))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `casfs-PID` in each hierarchy, made once per process: the shared memory cap (at least
/// three quarters of RAM) keeps actions together below the host's OOM killer.
fn parents(memory_cap: u64) -> Result<Vec<PathBuf>> {
    static P: Mutex<Option<Vec<PathBuf>>> = Mutex::new(None);
    let mut guard = P.lock().unwrap_or_else(|e| e.into_inner());
    let l = layout();
    let mut made = None;
    if guard.is_none() {
        let name = format!("casfs-{}", std::process::id());
        let mut dirs = Vec::new();
        for h in &l.hierarchies {
            let dir = h.own.join(&name);
            if h.v2 {
                enable_v2_controllers(h, &dir)?;
            } else if !dir.exists() {
                std::fs::create_dir(&dir).ctx(|| format!("creating {}", dir.display()))?;
            }
            dirs.push(dir);
        }
        made = Some(dirs);
    }
    let first = made.is_some();
    if let Some(d) = made {
        *guard = Some(d);
    }
    let dirs = guard.clone().unwrap_or_default();
    if let Some(i) = l.memory {
        let file = dirs[i].join(if l.hierarchies[i].v2 { "memory.max" } else { "memory.limit_in_bytes" });
        let now: u64 = read(&file).trim().parse().unwrap_or(u64::MAX);
        let cap = memory_cap.max(total_ram() / 4 * 3);
        if first && cap > 0 {
            write(&file, &cap.to_string())?;
        } else if now < memory_cap {
            write(&file, &memory_cap.to_string())?;
        }
    }
    Ok(dirs)
}

/// On cgroup v2 a cgroup's controllers must be enabled by its parent, and a cgroup holding
/// processes (other than the root) cannot enable them for its children: this process
/// moves into a leaf of its own first when it has to (systemd: `Delegate=yes`).
fn enable_v2_controllers(h: &Hierarchy, dir: &Path) -> Result<()> {
    let l = layout();
    let mut wanted = Vec::new();
    if l.memory.is_some_and(|i| l.hierarchies[i] == *h) {
        wanted.push("+memory");
    }
    if l.pids.is_some_and(|i| l.hierarchies[i] == *h) {
        wanted.push("+pids");
    }
    let line = wanted.join(" ");
    let control = h.own.join("cgroup.subtree_control");
    if !line.is_empty() && std::fs::write(&control, &line).is_err() {
        let leaf = h.own.join(format!("casfs-{}-executor", std::process::id()));
        std::fs::create_dir_all(&leaf).ctx(|| format!("creating {}", leaf.display()))?;
        write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
        write(&control, &line)?;
    }
    if !dir.exists() {
        std::fs::create_dir(dir).ctx(|| format!("creating {}", dir.display()))?;
    }
    if !line.is_empty() {
        write(&dir.join("cgroup.subtree_control"), &line)?;
    }
    Ok(())
}

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
    fn v1_controllers_in_their_own_hierarchies() {
        let mi = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                  34 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                  39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        let cg = "9:pids:/\n4:memory:/svc/a\n2:cpu,cpuacct:/svc\n0::/\n";
        let l = parse_layout(mi, cg, |_| String::new());
        let dir = |i: Option<usize>| l.hierarchies[i.unwrap()].own.clone();
        assert_eq!(dir(l.memory), PathBuf::from("/sys/fs/cgroup/memory/svc/a"));
        assert_eq!(dir(l.pids), PathBuf::from("/sys/fs/cgroup/pids/"));
        assert_eq!(dir(l.cpu), PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/svc"));
        assert!(l.hierarchies.iter().all(|h| !h.v2), "an empty unified hierarchy is not used");
    }

    #[test]
    fn v2_only_uses_one_hierarchy_for_everything() {
        let mi = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let cg = "0::/system.slice/casfs.service\n";
        let l = parse_layout(mi, cg, |_| "cpuset cpu io memory pids".into());
        assert_eq!(
            l.hierarchies,
            vec![Hierarchy { own: "/sys/fs/cgroup/system.slice/casfs.service".into(), v2: true }]
        );
        assert_eq!((l.memory, l.pids, l.cpu), (Some(0), Some(0), Some(0)));
    }

    #[test]
    fn counters_are_read_by_name() {
        assert_eq!(field("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", "oom_kill"), Some(3));
        assert_eq!(field("usage_usec 10\nuser_usec 7\nsystem_usec 3\n", "user_usec"), Some(7));
    }
}
