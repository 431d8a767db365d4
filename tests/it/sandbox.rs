//! The sandbox against hostile actions, for each sandbox: the built-in one, bubblewrap
//! (`--sandbox=bwrap`) and a site runner (`--sandbox-wrapper`, `site-runner.sh`). Host
//! secrets, remounting host folders, the chroot escape, host processes, the network,
//! `pids.max`; root inside only when asked and allowed. Limits: `sandbox_limits`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use casfs::cas::{Cas, GrpcStore, RemoteConfig};
use casfs::digest::Digest;
use casfs::exec::sandbox::SandboxKind;
use casfs::exec::{load_action, ExecConfig, Executed, Executor, Limits, Materialize, SandboxConfig};
use casfs::fs::FetchConfig;
use casfs::metrics::Metrics;

use crate::common::*;
use crate::exec::{upload_action, Act};

/// Installs bubblewrap the way the scripts do when it is missing (a missing bwrap fails).
pub(crate) fn ensure_bwrap() -> TestResult {
    static ONCE: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut done = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    let found = || std::process::Command::new("bwrap").arg("--version").output().is_ok_and(|o| o.status.success());
    if !*done && !found() {
        let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/lib/install.sh");
        let st = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!("source {} && apt_install bubblewrap", lib.display()))
            .status()?;
        if !st.success() || !found() {
            return Err("bubblewrap is not installed and could not be (apt_install bubblewrap)".into());
        }
    }
    *done = true;
    Ok(())
}

/// Every sandbox, each to be attacked the same way.
pub(crate) fn sandboxes() -> TestResult<Vec<SandboxKind>> {
    ensure_bwrap()?;
    let runner = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/site-runner.sh");
    Ok(vec![SandboxKind::Builtin, SandboxKind::Bwrap, SandboxKind::Wrapper(vec![runner.display().to_string()])])
}

pub(crate) fn name(k: &SandboxKind) -> &'static str {
    match k {
        SandboxKind::Builtin => "builtin",
        SandboxKind::Bwrap => "bwrap",
        SandboxKind::Wrapper(_) => "wrapper",
    }
}

/// A storage server, an input folder holding the hostile program, and a host secret.
pub(crate) struct Rig {
    pub(crate) tmp: tempfile::TempDir,
    pub(crate) server: ServeProcess,
    pub(crate) client: Arc<GrpcStore>,
    pub(crate) input: PathBuf,
}

pub(crate) fn rig() -> TestResult<Rig> {
    require_root()?;
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start_with(&tmp.path().join("storage"), "127.0.0.1:0", &["--no-execution"])?;
    let client = Arc::new(GrpcStore::new(&RemoteConfig::new(&server.url))?);
    let input = tmp.path().join("input");
    std::fs::create_dir_all(input.join("out"))?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/sandbox_hostile.c");
    let out = std::process::Command::new("gcc").arg("-O1").arg("-o").arg(input.join("hostile")).arg(&src).output()?;
    if !out.status.success() {
        return Err(format!("gcc: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    std::fs::write(tmp.path().join("secret"), "host secret\n")?;
    std::fs::set_permissions(tmp.path().join("secret"), std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(Rig { tmp, server, client, input })
}

fn require_root() -> TestResult {
    match fuse_unavailable() {
        Some(why) => Err(format!("the sandbox tests need root and /dev/fuse: {why}").into()),
        None => Ok(()),
    }
}

impl Rig {
    pub(crate) fn executor(
        &self,
        kind: &SandboxKind,
        sandbox: impl FnOnce(&mut SandboxConfig),
    ) -> TestResult<Executor> {
        let mut sb = SandboxConfig { kind: kind.clone(), pids_limit: 256, ..SandboxConfig::default() };
        sandbox(&mut sb);
        let cfg = ExecConfig {
            materialize: Materialize::Lazy,
            work_dir: self.tmp.path().join("work"),
            limits: Limits { allow_root_actions: true, ..Limits::default() },
            sandbox: sb,
            worker_name: "sandbox-test".into(),
            fetch: FetchConfig { deadline: Duration::from_secs(20), ..FetchConfig::default() },
        };
        let cache = local_cache(&self.tmp.path().join("cache"))?;
        Ok(Executor::new(self.client.clone(), cache, cfg, Metrics::new()))
    }

    /// Runs `a` with `exec`; returns the outcome, stdout and stderr.
    pub(crate) async fn run(&self, exec: &Executor, a: &Act<'_>) -> TestResult<(Executed, String, String)> {
        let d = upload_action(&self.client, &self.input, a).await?;
        let action = load_action(exec.cas(), d).await?;
        let o = exec.execute(d, &action, std::time::SystemTime::now()).await?;
        let out = self.blob(&o.result.stdout_digest).await?;
        let err = self.blob(&o.result.stderr_digest).await?;
        Ok((o, out, err))
    }

    async fn blob(&self, d: &Option<casfs::proto::reapi::Digest>) -> TestResult<String> {
        let d = Digest::try_from(d.as_ref().ok_or("no digest")?)?;
        Ok(String::from_utf8_lossy(&self.client.read(&d).await?).into_owned())
    }

    fn server_pid(&self) -> u32 {
        self.server.child.id()
    }

    fn port(&self) -> TestResult<String> {
        Ok(self.server.url.rsplit(':').next().ok_or("port")?.to_string())
    }

    /// `hostile MODE MARKER SECRET TEST_PID SERVER_PID PORT` as an argv.
    fn hostile(&self, mode: &str, marker: &Path) -> TestResult<Vec<String>> {
        Ok(vec![
            "./hostile".into(),
            mode.into(),
            marker.display().to_string(),
            self.tmp.path().join("secret").display().to_string(),
            std::process::id().to_string(),
            self.server_pid().to_string(),
            self.port()?,
        ])
    }
}

fn leaks(stdout: &str) -> Vec<&str> {
    stdout.lines().filter(|l| l.starts_with("LEAK")).collect()
}

/// The host's limit, which the sandbox sets to 0 for its own user namespace only.
fn host_max_user_namespaces() -> TestResult<String> {
    Ok(std::fs::read_to_string("/proc/sys/user/max_user_namespaces")?.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_secrets_are_unreadable() -> TestResult {
    require_fuse!();
    let r = rig()?;
    let shadow = std::process::Command::new("sha256sum").arg("/etc/shadow").output()?;
    let host_digest = String::from_utf8_lossy(&shadow.stdout).split(' ').next().unwrap_or_default().to_string();
    assert_eq!(host_digest.len(), 64, "no /etc/shadow digest on the host");
    for kind in sandboxes()? {
        let exec = r.executor(&kind, |_| {})?;
        for root in [false, true] {
            let script = "sha256sum /etc/shadow; echo rc=$?; cat /etc/shadow | head -c 10; id -u";
            let act = Act { argv: &["sh", "-c", script], run_as_root: root, ..Default::default() };
            let (o, out, err) = r.run(&exec, &act).await?;
            let who = format!("{} root={root}: {out} {err}", name(&kind));
            assert_eq!(o.status.code, 0, "{who}");
            assert!(!out.contains(&host_digest), "read /etc/shadow: {who}");
            assert!(out.contains("rc=1"), "{who}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_folders_stay_read_only() -> TestResult {
    require_fuse!();
    let r = rig()?;
    let before = host_max_user_namespaces()?;
    let marker = format!("/etc/casfs-remount-{}", std::process::id());
    let script = format!(
        "mount -o remount,rw,bind /etc && echo LEAK remounted; touch {marker} && echo LEAK wrote; \
         unshare -rm sh -c 'mount -o remount,rw,bind /etc && touch {marker} && echo LEAK nested'; \
         mount -t tmpfs none /usr && echo LEAK mounted; umount -l /etc && echo LEAK unmounted; \
         echo 100 > /proc/sys/user/max_user_namespaces 2>/dev/null && echo LEAK userns-limit; echo finished"
    );
    for kind in sandboxes()? {
        let exec = r.executor(&kind, |_| {})?;
        let roots: &[bool] = if matches!(kind, SandboxKind::Wrapper(_)) { &[false] } else { &[false, true] };
        for &root in roots {
            let act = Act { argv: &["sh", "-c", &script], run_as_root: root, ..Default::default() };
            let (_, out, err) = r.run(&exec, &act).await?;
            let who = format!("{} root={root}: {out} {err}", name(&kind));
            assert!(out.contains("finished"), "{who}");
            assert_eq!(leaks(&out), Vec::<&str>::new(), "{who}");
            assert!(!Path::new(&marker).exists(), "a file appeared in the host's /etc: {who}");
        }
    }
    assert_eq!(host_max_user_namespaces()?, before, "the host's user namespace limit changed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chroot_escape_is_contained() -> TestResult {
    require_fuse!();
    let r = rig()?;
    let marker = r.tmp.path().join("escaped");
    for kind in sandboxes()? {
        let exec = r.executor(&kind, |_| {})?;
        let roots: &[bool] = if matches!(kind, SandboxKind::Wrapper(_)) { &[false] } else { &[false, true] };
        for &root in roots {
            let argv = r.hostile("escape", &marker)?;
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let (_, out, err) = r.run(&exec, &Act { argv: &argv, run_as_root: root, ..Default::default() }).await?;
            let who = format!("{} root={root}: {out} {err}", name(&kind));
            assert!(out.contains("probes done"), "{who}");
            assert_eq!(leaks(&out), Vec::<&str>::new(), "{who}");
            assert!(!marker.exists(), "the action wrote on the host: {who}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_processes_are_out_of_sight_and_reach() -> TestResult {
    require_fuse!();
    let r = rig()?;
    let marker = r.tmp.path().join("escaped");
    let (me, server) = (std::process::id(), r.server_pid());
    let script = format!(
        "nsenter --net=/proc/{server}/ns/net true && echo LEAK nsenter; kill -0 {me} && echo LEAK kill; \
         ls /proc | grep -qx {me} && echo LEAK listed; ps -e -o pid= | wc -l; \
         ./hostile escape {} x {me} {server} 1",
        marker.display()
    );
    for kind in sandboxes()? {
        let exec = r.executor(&kind, |_| {})?;
        let (_, out, err) = r.run(&exec, &Act { argv: &["sh", "-c", &script], ..Default::default() }).await?;
        let who = format!("{}: {out} {err}", name(&kind));
        assert!(out.contains("probes done"), "{who}");
        assert_eq!(leaks(&out), Vec::<&str>::new(), "{who}");
        // sh, ps, wc and whatever runner sits above them: a handful, never the host's.
        let seen: usize = out.lines().next().and_then(|l| l.trim().parse().ok()).ok_or("no process count")?;
        assert!(seen <= 8, "{seen} processes visible: {who}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_network_unless_asked() -> TestResult {
    require_fuse!();
    let r = rig()?;
    let marker = r.tmp.path().join("escaped");
    for kind in sandboxes()? {
        let exec = r.executor(&kind, |_| {})?;
        for mode in ["stay", "escape"] {
            let argv = r.hostile(mode, &marker)?;
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let (_, out, err) = r.run(&exec, &Act { argv: &argv, ..Default::default() }).await?;
            let who = format!("{} {mode}: {out} {err}", name(&kind));
            assert!(out.contains("probes done") && !out.contains("LEAK connected"), "{who}");
        }
        // The same probe reaches the server when the platform asks for the network.
        let argv = r.hostile("stay", &marker)?;
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let (_, out, err) = r.run(&exec, &Act { argv: &argv, network: true, ..Default::default() }).await?;
        assert!(out.contains("LEAK connected"), "{} with network=true: {out} {err}", name(&kind));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pids_max_is_out_of_reach() -> TestResult {
    require_fuse!();
    let r = rig()?;
    let script = "for f in /sys/fs/cgroup/pids.max /sys/fs/cgroup/pids/pids.max; do \
                      echo max > $f 2>/dev/null && echo LEAK $f; done; \
                  mkdir -p /tmp/cg1 /tmp/cg2; \
                  mount -t cgroup -o pids none /tmp/cg1 2>/dev/null && echo LEAK mounted-v1; \
                  mount -t cgroup2 none /tmp/cg2 2>/dev/null && echo LEAK mounted-v2; \
                  for f in $(find /tmp/cg1 /tmp/cg2 -name pids.max 2>/dev/null); do \
                      echo 99999 > $f 2>/dev/null && echo LEAK wrote $f; done; \
                  unshare -rmC sh -c 'mount -t cgroup2 none /tmp/cg2 && for f in $(find /tmp/cg2 -name pids.max); do \
                      echo 99999 > $f 2>/dev/null && echo LEAK nested $f; done' 2>/dev/null; \
                  cat /sys/fs/cgroup/pids.max 2>/dev/null; echo finished";
    for kind in sandboxes()? {
        let exec = r.executor(&kind, |_| {})?;
        let (_, out, err) = r.run(&exec, &Act { argv: &["sh", "-c", script], ..Default::default() }).await?;
        let who = format!("{}: {out} {err}", name(&kind));
        assert!(out.contains("finished"), "{who}");
        assert_eq!(leaks(&out), Vec::<&str>::new(), "{who}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_inside_is_still_no_one_on_the_host() -> TestResult {
    require_fuse!();
    let r = rig()?;
    let script = "id -u; grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status; touch /etc/x 2>/dev/null && echo LEAK etc";
    for kind in [SandboxKind::Builtin, SandboxKind::Bwrap] {
        ensure_bwrap()?;
        let exec = r.executor(&kind, |_| {})?;
        let act = Act { argv: &["sh", "-c", script], run_as_root: true, ..Default::default() };
        let (_, out, err) = r.run(&exec, &act).await?;
        let who = format!("{}: {out} {err}", name(&kind));
        assert!(out.starts_with("0\n"), "{who}");
        assert_eq!(out.matches(":\t0000000000000000").count(), 3, "capabilities left: {who}");
        assert_eq!(leaks(&out), Vec::<&str>::new(), "{who}");
    }
    // Without the operator's consent the request itself is refused (rule 9).
    let cfg = ExecConfig {
        materialize: Materialize::Lazy,
        work_dir: r.tmp.path().join("work2"),
        limits: Limits::default(),
        sandbox: SandboxConfig::default(),
        worker_name: "t".into(),
        fetch: FetchConfig::default(),
    };
    let cache = local_cache(&r.tmp.path().join("cache2"))?;
    let strict = Executor::new(r.client.clone(), cache, cfg, Metrics::new());
    let d = upload_action(&r.client, &r.input, &Act { argv: &["id"], run_as_root: true, ..Default::default() }).await?;
    let action = load_action(strict.cas(), d).await?;
    let e = strict
        .execute(d, &action, std::time::SystemTime::now())
        .await
        .err()
        .ok_or("run-as-root accepted without --allow-root-actions")?;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    Ok(())
}

/// Before anything runs, the executor (host root) makes the outputs' parent folders; an
/// input root whose `out` is a symlink to a host folder must not make it create folders
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_parents_are_never_made_through_the_roots_symlinks() -> TestResult {
    require_fuse!();
    let r = rig()?;
    let host = r.tmp.path().join("host-folder");
    let input = r.tmp.path().join("linked-input");
    std::fs::create_dir_all(&host)?;
    std::fs::create_dir_all(&input)?;
    std::os::unix::fs::symlink(&host, input.join("out"))?;
    let exec = r.executor(&SandboxKind::Builtin, |_| {})?;
    let act = Act { argv: &["true"], output_files: &["out/x/y"], ..Default::default() };
    let d = upload_action(&r.client, &input, &act).await?;
    let action = load_action(exec.cas(), d).await?;
    let o = exec.execute(d, &action, std::time::SystemTime::now()).await?;
    assert_eq!(o.result.exit_code, 0);
    assert!(!host.join("x").exists(), "the executor made a host folder through the input root's symlink");
    Ok(())
}
