//! Where the cgroup controllers live on this host (v1 hierarchies, the v2 one, or both) and
//! the `casfs-PID` parent cgroup each executor process keeps in its own cgroup of each.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::error::{IoContext, Result};

/// One mounted hierarchy and this process's own cgroup folder in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Hierarchy {
    pub(super) own: PathBuf,
    pub(super) v2: bool,
}

/// Where the controllers casfs uses live on this host.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Layout {
    pub(super) hierarchies: Vec<Hierarchy>,
    pub(super) memory: Option<usize>,
    pub(super) pids: Option<usize>,
    pub(super) cpu: Option<usize>,
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

pub(super) fn layout() -> &'static Layout {
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

pub(super) fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).ctx(|| format!("writing {value:?} to {}", path.display()))
}

pub(super) fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `casfs-PID` in each hierarchy, made once per process: the shared memory cap (at least
/// three quarters of RAM) keeps actions together below the host's OOM killer.
pub(super) fn parents(memory_cap: u64) -> Result<Vec<PathBuf>> {
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
}
