//! What confining one action costs: start to exit of `/bin/true`, median of N runs each, for
//! a plain fork/exec, bubblewrap run directly with the same view, and casfs's sandboxes
//! (built-in and `--sandbox=bwrap`, each with its cgroup made and removed per action).
//! Run as root: `cargo run --release --example sandbox_cost -- 200` (scripts/bench-exec).

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use casfs::exec::sandbox::{run, Exit, Job, SandboxConfig, SandboxKind};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time_it(n: usize, mut f: impl FnMut() -> Result<(), String>) -> Result<Duration, String> {
    f()?; // warm-up
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed());
    }
    Ok(median(v))
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
    let argv: Vec<String> = std::env::var("SANDBOX_COST_ARGV")
        .map(|a| a.split(' ').map(String::from).collect())
        .unwrap_or_else(|_| vec!["/bin/true".to_string()]);
    let env = vec![("PATH".to_string(), "/usr/bin:/bin".to_string())];
    let dirs = SandboxConfig::default().host_dirs;
    // Host symlinks (`/bin -> usr/bin` on merged-usr systems) exist in the root as casfs
    // makes them, for bubblewrap run directly too.
    for d in dirs.iter().filter(|d| d.is_symlink()) {
        let target = std::fs::read_link(d).map_err(|e| e.to_string())?;
        let link = bwrap_root.join(d.strip_prefix("/").unwrap_or(d));
        std::os::unix::fs::symlink(target, link).map_err(|e| e.to_string())?;
    }

    let plain = time_it(n, || status(Command::new("/bin/true")))?;
    let bwrap = time_it(n, || {
        let mut c = Command::new("bwrap");
        c.args(["--unshare-all", "--unshare-user", "--disable-userns", "--new-session", "--bind"]);
        c.arg(&bwrap_root).arg("/");
        for d in dirs.iter().filter(|d| d.is_dir() && !d.is_symlink()) {
            c.arg("--ro-bind").arg(d).arg(d);
        }
        c.args(["--proc", "/proc", "--dev", "/dev", "--size", "1073741824", "--tmpfs", "/tmp", "/bin/true"]);
        c.uid(65534).gid(65534);
        status(c)
    })?;
    let mut rows = vec![("fork/exec of /bin/true", plain), ("bwrap ... /bin/true (as nobody)", bwrap)];
    for (label, kind) in
        [("casfs builtin sandbox", SandboxKind::Builtin), ("casfs --sandbox=bwrap", SandboxKind::Bwrap)]
    {
        let cfg = SandboxConfig { kind, memory_limit: 1 << 30, ..SandboxConfig::default() };
        let mut v = Vec::with_capacity(n);
        for i in 0..=n {
            // A fresh root each time, as every action has.
            let root = root.join(format!("{label}-{i}").replace(' ', "-"));
            std::fs::create_dir(&root).map_err(|e| e.to_string())?;
            std::os::unix::fs::chown(&root, Some(65534), Some(65534)).map_err(|e| e.to_string())?;
            let job = Job {
                root: &root,
                cwd: "/".into(),
                argv: &argv,
                env: &env,
                stdout: &out,
                stderr: &err,
                network: false,
                run_as_root: false,
                timeout: Duration::from_secs(30),
            };
            let t = Instant::now();
            let done = run(&cfg, job).await.map_err(|e| e.to_string())?;
            if done.exit != Exit::Code(0) {
                let why = std::fs::read_to_string(&err).unwrap_or_default();
                return Err(format!("{label}: {:?}: {why}", done.exit));
            }
            if i > 0 {
                v.push(t.elapsed());
            }
        }
        rows.push((label, median(v)));
    }
    println!("{:<36} {:>12}", format!("start to exit of true (median of {n})"), "ms");
    for (label, d) in &rows {
        println!("{label:<36} {:>12.2}", d.as_secs_f64() * 1e3);
    }
    let (ours, theirs) = (rows[2].1.as_secs_f64(), rows[1].1.as_secs_f64());
    let verdict = if ours <= theirs { "PASS" } else { "MISS" };
    println!("builtin / bwrap: {:.2}x (target <= 1.0: {verdict})", ours / theirs);
    Ok(())
}
