//! What confining one action costs: start to exit of `/bin/true`, median of N runs each
//! (taken in turns), for a plain fork/exec, bubblewrap run directly with the same view, and
//! casfs's sandboxes (built-in and `--sandbox=bwrap`, each with its root prepared and its
//! cgroup made, read and removed per action).
//! Run as root: `cargo run --release --example sandbox_cost -- 200` (scripts/bench-exec).

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use casfs::exec::sandbox::{run, Exit, Job, SandboxConfig, SandboxKind};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn status(mut c: Command) -> Result<(), String> {
    let st = c.stdin(Stdio::null()).status().map_err(|e| format!("{c:?}: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("{c:?}: {st}"))
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), String> {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200);
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    // Two roots: bubblewrap leaves its mount points in its own, which would hide the host
    // folders from casfs (an input root's own `usr` wins).
    let (root, bwrap_root) = (tmp.path().join("root"), tmp.path().join("bwrap-root"));
    std::os::unix::fs::chown(tmp.path(), Some(65534), Some(65534)).map_err(|e| e.to_string())?;
    for r in [&root, &bwrap_root] {
        std::fs::create_dir(r).map_err(|e| e.to_string())?;
        std::os::unix::fs::chown(r, Some(65534), Some(65534)).map_err(|e| e.to_string())?;
    }
    let (out, err) = (tmp.path().join("out"), tmp.path().join("err"));
    let argv = vec!["/bin/true".to_string()];
    let env = vec![("PATH".to_string(), "/usr/bin:/bin".to_string())];
    let dirs = SandboxConfig::default().host_dirs;
    // Host symlinks (`/bin -> usr/bin` on merged-usr systems) exist in the root as casfs
    // makes them, for bubblewrap run directly too.
    for d in dirs.iter().filter(|d| d.is_symlink()) {
        let target = std::fs::read_link(d).map_err(|e| e.to_string())?;
        let link = bwrap_root.join(d.strip_prefix("/").unwrap_or(d));
        std::os::unix::fs::symlink(target, link).map_err(|e| e.to_string())?;
    }

    let direct_bwrap = || {
        let mut c = Command::new("bwrap");
        c.args(["--unshare-all", "--unshare-user", "--disable-userns", "--new-session", "--bind"]);
        c.arg(&bwrap_root).arg("/");
        for d in dirs.iter().filter(|d| d.is_dir() && !d.is_symlink()) {
            c.arg("--ro-bind").arg(d).arg(d);
        }
        c.args(["--proc", "/proc", "--dev", "/dev", "--size", "1073741824", "--tmpfs", "/tmp", "/bin/true"]);
        c.uid(65534).gid(65534);
        status(c)
    };
    let ours = |kind: SandboxKind, i: usize| {
        let (argv, env, out, err, root) = (&argv, &env, &out, &err, &root);
        async move {
            // A fresh root each time, as every action has.
            let root = root.join(format!("{kind:?}-{i}"));
            std::fs::create_dir(&root).map_err(|e| e.to_string())?;
            std::os::unix::fs::chown(&root, Some(65534), Some(65534)).map_err(|e| e.to_string())?;
            let cfg = SandboxConfig { kind, memory_limit: 1 << 30, ..SandboxConfig::default() };
            let job = Job {
                root: &root,
                cwd: "/".into(),
                argv,
                env,
                stdout: out,
                stderr: err,
                network: false,
                run_as_root: false,
                timeout: Duration::from_secs(30),
                hermetic: false,
            };
            let t = Instant::now();
            let done = run(&cfg, job).await.map_err(|e| e.to_string())?;
            let took = t.elapsed();
            if done.exit != Exit::Code(0) {
                let why = std::fs::read_to_string(err).unwrap_or_default();
                return Err(format!("{:?}: {why}", done.exit));
            }
            Ok::<Duration, String>(took)
        }
    };
    // Round robin, so that the load of a shared machine weighs on every row alike.
    let mut t: [Vec<Duration>; 4] = Default::default();
    for i in 0..=n {
        let s = Instant::now();
        status(Command::new("/bin/true"))?;
        let plain = s.elapsed();
        let s = Instant::now();
        direct_bwrap()?;
        let bwrap = s.elapsed();
        let builtin = ours(SandboxKind::Builtin, i).await?;
        let casfs_bwrap = ours(SandboxKind::Bwrap, i).await?;
        if i > 0 {
            for (v, d) in t.iter_mut().zip([plain, bwrap, builtin, casfs_bwrap]) {
                v.push(d);
            }
        }
    }
    let labels =
        ["fork/exec of /bin/true", "bwrap ... /bin/true (as nobody)", "casfs builtin sandbox", "casfs --sandbox=bwrap"];
    let rows: Vec<(&str, Duration)> = labels.into_iter().zip(t.into_iter().map(median)).collect();
    println!("{:<36} {:>12}", format!("start to exit of true (median of {n})"), "ms");
    for (label, d) in &rows {
        println!("{label:<36} {:>12.2}", d.as_secs_f64() * 1e3);
    }
    let (ours, theirs) = (rows[2].1.as_secs_f64(), rows[1].1.as_secs_f64());
    let verdict = if ours <= theirs { "PASS" } else { "MISS" };
    println!("builtin / bwrap: {:.2}x (target <= 1.0: {verdict})", ours / theirs);
    Ok(())
}
