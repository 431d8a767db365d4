//! Shared fixtures: a real `casfs serve` process, in-process servers, tree generators.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use casfs::cas::{DiskStore, MemoryStore};
use casfs::server::{Backend, Bound, Listen};

/// Test result type: any error fails the test with its message.
pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The casfs binary built for these tests.
pub fn casfs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_casfs")
}

/// A `casfs serve` child process on 127.0.0.1 with an ephemeral port; killed on drop.
pub struct ServeProcess {
    pub child: Child,
    pub url: String,
    storage: std::path::PathBuf,
}

impl ServeProcess {
    /// Starts a server on `storage` and waits for its "serving on" line.
    pub fn start(storage: &Path) -> TestResult<Self> {
        Self::start_on(storage, "127.0.0.1:0")
    }

    /// Starts a server listening on `listen`.
    pub fn start_on(storage: &Path, listen: &str) -> TestResult<Self> {
        Self::start_with(storage, listen, &[])
    }

    /// Starts a server with extra `casfs serve` arguments.
    pub fn start_with(storage: &Path, listen: &str, extra: &[&str]) -> TestResult<Self> {
        let mut child = Command::new(casfs_bin())
            .args(["serve", "--listen", listen, "--storage"])
            .arg(storage)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env("CASFS_LOG", "warn")
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let url = line
            .trim()
            .strip_prefix("casfs: serving on ")
            .ok_or_else(|| format!("unexpected first line from casfs serve: {line:?}"))?
            .to_string();
        Ok(ServeProcess { child, url, storage: storage.to_path_buf() })
    }

    /// SIGKILLs the server and waits for it. A server killed while one of its threads waits
    /// on an action's own FUSE mount cannot finish dying (nobody is left to answer that
    /// request): after a grace period its action mounts' connections are aborted, as the
    /// next `casfs serve` on that storage would do at start.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        for i in 0..200 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            if i == 100 {
                for mp in mounts_under(&self.storage) {
                    casfs::fs::mount::abort_fuse(&mp);
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.child.wait();
        // What a killed server left mounted (its actions' overlays and input mounts) goes too.
        for mp in mounts_under(&self.storage).into_iter().rev() {
            casfs::fs::mount::abort_fuse(&mp);
            let _ = casfs::fs::mount::detach(&mp);
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Mountpoints below `dir` (from /proc/self/mountinfo).
pub fn mounts_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(std::path::PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Runs the casfs CLI; returns (status code, stdout, stderr).
pub fn casfs(args: &[&str]) -> TestResult<(i32, String, String)> {
    let out = Command::new(casfs_bin()).args(args).stdin(Stdio::null()).output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// An in-process server over a store, on an ephemeral loopback port; stops on drop.
pub struct InProcessServer {
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Serves `backend` on 127.0.0.1:0 inside the current runtime.
pub async fn serve_in_process(backend: Backend) -> TestResult<InProcessServer> {
    let bound = Bound::bind(&Listen::Tcp("127.0.0.1:0".parse()?)).await?;
    let url = bound.url();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(bound.serve(backend, async {
        let _ = rx.await;
    }));
    Ok(InProcessServer { url, stop: Some(tx) })
}

/// A local blob cache in `dir`, unbounded, with default memory budgets.
pub fn local_cache(dir: &Path) -> TestResult<Arc<casfs::cache::LocalCache>> {
    let metrics = casfs::metrics::Metrics::new();
    Ok(casfs::cache::LocalCache::open(&casfs::cache::CacheConfig::new(dir, 0), &metrics)?)
}

/// A backend over a fresh memory store.
pub fn memory_backend() -> (Arc<MemoryStore>, Backend) {
    let m = Arc::new(MemoryStore::new());
    (m.clone(), Backend::new(m.clone(), m))
}

/// A backend over a disk store in `dir`.
pub fn disk_backend(dir: &Path) -> TestResult<(Arc<DiskStore>, Backend)> {
    let d = Arc::new(DiskStore::open(dir, 0)?);
    Ok((d.clone(), Backend::new(d.clone(), d)))
}

/// Deterministic pseudo-random bytes (xorshift), fast enough for hundreds of MiB.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// What a generated tree holds.
pub struct TreeSpec {
    pub files: usize,
    pub dirs: usize,
    /// Sizes of a few large files added on top of the small ones.
    pub large: Vec<usize>,
}

/// Generates a tree: `files` small files (0 B to 64 KiB, some empty, some executable, some
/// duplicated) spread over `dirs` nested folders with unicode names, symlinks (relative,
/// absolute, dangling, to folders), empty folders, and the `large` files.
pub fn generate_tree(root: &Path, spec: &TreeSpec) -> TestResult {
    std::fs::create_dir_all(root)?;
    let names = ["src", "lib", "données", "日本語", "emoji-🦀", "a b c", "x.y", "deep"];
    let mut dirs = vec![root.to_path_buf()];
    for i in 1..spec.dirs {
        let parent = dirs[(i * 7919) % dirs.len()].clone();
        let d = parent.join(format!("{}-{i}", names[i % names.len()]));
        std::fs::create_dir_all(&d)?;
        dirs.push(d);
    }
    for i in 0..spec.files {
        let dir = &dirs[i % dirs.len()];
        let name = match i % 5 {
            0 => format!("file-{i}.txt"),
            1 => format!("ünïcödé-{i}.rs"),
            2 => format!("名前-{i}"),
            3 => format!(".hidden-{i}"),
            _ => format!("plain{i}"),
        };
        let size = match i % 10 {
            0 => 0,
            1..=6 => (i * 37) % 2048,
            7 | 8 => 4096 + (i * 131) % 30_000,
            _ => 65_536,
        };
        // Every 50th file repeats an earlier content, so dedup paths are exercised.
        let seed = if i % 50 == 49 { (i - 1) as u64 } else { i as u64 };
        let path = dir.join(name);
        std::fs::File::create(&path)?.write_all(&pseudo_random(seed, size))?;
        let mode = if i % 7 == 0 { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    }
    for (n, size) in spec.large.iter().enumerate() {
        let path = dirs[n % dirs.len()].join(format!("large-{n}.bin"));
        std::fs::File::create(&path)?.write_all(&pseudo_random(1_000_000 + n as u64, *size))?;
    }
    for (i, d) in dirs.iter().enumerate().step_by(17) {
        std::os::unix::fs::symlink("../some/where", d.join(format!("rel-link-{i}")))?;
        std::os::unix::fs::symlink("/etc/passwd", d.join(format!("abs-link-{i}")))?;
        std::os::unix::fs::symlink("dangling-ünï", d.join(format!("dangling-{i}")))?;
        std::fs::create_dir_all(d.join(format!("empty-dir-{i}")))?;
    }
    std::os::unix::fs::symlink(".", root.join("self-link"))?;
    Ok(())
}

/// One line per entry: path, kind, permission bits (files only), size, link target.
/// Directory modes are left out: they follow the umask on download.
pub fn listing(root: &Path) -> TestResult<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> TestResult {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let p = e.path();
            let rel = p.strip_prefix(root)?.to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(&p)?;
            if m.file_type().is_symlink() {
                out.push(format!("{rel} l {}", std::fs::read_link(&p)?.display()));
            } else if m.is_dir() {
                out.push(format!("{rel} d"));
                walk(root, &p, out)?;
            } else {
                out.push(format!("{rel} f {:o} {}", m.mode() & 0o777, m.size()));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, root, &mut out)?;
    out.sort();
    Ok(out)
}

/// Normalises file modes the way REAPI carries them: executable or not.
pub fn reapi_modes(lines: Vec<String>) -> Vec<String> {
    lines
        .into_iter()
        .map(|l| {
            let parts: Vec<&str> = l.rsplitn(3, ' ').collect();
            if parts.len() == 3 && parts[2].ends_with(" f") {
                let mode = u32::from_str_radix(parts[1], 8).unwrap_or(0);
                let m = if mode & 0o111 != 0 { "755" } else { "644" };
                format!("{} {m} {}", parts[2], parts[0])
            } else {
                l
            }
        })
        .collect()
}

/// `diff -r` of two trees; Ok when identical.
pub fn diff_r(a: &Path, b: &Path) -> TestResult {
    let out = Command::new("diff").arg("-r").arg("--no-dereference").arg(a).arg(b).output()?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout);
        let head: String = text.lines().take(20).collect::<Vec<_>>().join("\n");
        return Err(format!("diff -r {} {} differs:\n{head}", a.display(), b.display()).into());
    }
    Ok(())
}

/// Why real mounts cannot run here, if they cannot.
pub fn fuse_unavailable() -> Option<String> {
    // SAFETY: geteuid only reads the calling process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (these tests mount directly)".into());
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        return Some(format!("/dev/fuse unusable: {e}"));
    }
    None
}

/// True when `CI` is set (and not `false`, `0` or empty): a test must then never skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "false" | "0"))
}

/// A test cannot run here, because `why`. In CI that fails the test (panics); elsewhere
/// the reason goes straight to stderr (libtest's capture only takes `eprintln!`, so it
/// shows even for a passing test) and, as one line `TEST: WHY`, to the file named by
/// `CASFS_SKIP_FILE`, where `scripts/test` counts it.
pub fn skip(test: &str, why: &str) {
    // `type_name_of_val` of a function nested in the test: `it::MODULE::TEST::here`.
    let test = test.replace("::{{closure}}", "");
    let test = test.strip_suffix("::here").unwrap_or(&test);
    let test = test.strip_prefix("it::").unwrap_or(test);
    assert!(!in_ci(), "{test}: cannot run, and CI never skips: {why}");
    let line = format!("{test}: {}", why.replace('\n', " "));
    let _ = writeln!(std::io::stderr(), "skipped: {line}");
    if let Some(file) = std::env::var_os("CASFS_SKIP_FILE") {
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)
            .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
        if let Err(e) = appended {
            panic!("{test}: cannot record the skip in {}: {e}", std::path::Path::new(&file).display());
        }
    }
}

/// Ends the test early (`Ok`), recording why it cannot run here; fails it in CI (see `skip`).
macro_rules! skip {
    ($($why:tt)+) => {{
        fn here() {}
        $crate::common::skip(std::any::type_name_of_val(&here), &format!($($why)+));
        return Ok(());
    }};
}

/// Skips the test (see `skip!`) where real mounts cannot run.
macro_rules! require_fuse {
    () => {
        if let Some(why) = $crate::common::fuse_unavailable() {
            skip!("{why}");
        }
    };
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> TestResult<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The environment variable that marks every process of a test's action.
pub const MARK_VAR: &str = "CASFS_TEST_MARK";

/// A marker unique to this call, for `MARK_VAR`.
pub fn unique_mark(what: &str) -> String {
    format!("{what}-{}-{}", std::process::id(), rand::random::<u64>())
}

/// Live processes (pid, command name) whose environment holds `MARK_VAR=mark`, anywhere on
/// the machine (zombies have no environment left and do not count).
pub fn marked_processes(mark: &str) -> Vec<(i32, String)> {
    let needle = format!("{MARK_VAR}={mark}");
    let Ok(rd) = std::fs::read_dir("/proc") else { return vec![] };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
        })
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            (pid, comm.trim().to_string())
        })
        .collect()
}

/// Sends `sig` to `pid` (0 probes whether it exists); true when the kernel accepted it.
pub fn signal(pid: i32, sig: i32) -> bool {
    // SAFETY: kill takes two integers and touches no memory of ours.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// The value of an unlabelled or fully labelled metric line; an absent metric is an error.
pub fn metric(text: &str, name: &str) -> TestResult<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .ok_or_else(|| format!("metric {name} is absent:\n{text}").into())
}
