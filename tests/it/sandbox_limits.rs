//! Limits of the sandbox, for each sandbox (built-in, bubblewrap, a site runner): a 4 GiB
//! allocation over `--memory-limit 1G` on a real `casfs serve` (that action fails, the server
//! serves on), `/tmp` filled past its size, nothing left running after an action or its
//! timeout, and the resource usage each action reports.

use std::path::Path;
use std::time::Duration;

use prost::Message;

use casfs::cas::{Cas, GrpcStore, RemoteConfig};
use casfs::digest::Digest;
use casfs::exec::Executed;
use casfs::proto::casfs::ResourceUsage;

use crate::common::*;
use crate::exec::{upload_action, Act};
use crate::sandbox::{ensure_bwrap, name, rig, sandboxes};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tmp_is_bounded() -> TestResult {
    require_fuse!();
    let r = rig()?;
    let script = "dd if=/dev/zero of=/tmp/fill bs=1M count=128 2>/dev/null; echo rc=$?; stat -c %s /tmp/fill";
    for kind in sandboxes()? {
        let exec = r.executor(&kind, |s| s.tmp_size = 32 << 20)?;
        let (_, out, err) = r.run(&exec, &Act { argv: &["sh", "-c", script], ..Default::default() }).await?;
        let who = format!("{}: {out} {err}", name(&kind));
        assert!(out.contains("rc=1"), "filling /tmp past its size succeeded: {who}");
        let size: u64 = out.lines().nth(1).and_then(|l| l.trim().parse().ok()).ok_or_else(|| who.clone())?;
        assert!(size <= 32 << 20, "{who}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_outlives_its_action() -> TestResult {
    require_fuse!();
    let r = rig()?;
    let tag = std::process::id() % 10_000 + 20_000;
    let sleepers = |n: u32| -> TestResult<bool> {
        let out = std::process::Command::new("pgrep").args(["-f", &format!("sleep {n}")]).output()?;
        Ok(out.status.success())
    };
    for kind in sandboxes()? {
        let exec = r.executor(&kind, |_| {})?;
        // Left running in the background of a command that exits 0, in a session of its own.
        let script = format!("setsid sleep {tag} < /dev/null > /dev/null 2>&1 & echo left");
        let (o, out, _) = r.run(&exec, &Act { argv: &["sh", "-c", &script], ..Default::default() }).await?;
        assert_eq!((o.result.exit_code, out.as_str()), (0, "left\n"), "{}", name(&kind));
        assert!(!sleepers(tag)?, "{}: a background process outlived its action", name(&kind));
        // Killed at the timeout with all it started.
        let script = format!("sleep {} & sleep {} & echo started; wait", tag + 1, tag + 1);
        let act = Act { argv: &["sh", "-c", &script], timeout: Some(Duration::from_secs(2)), ..Default::default() };
        let (o, out, _) = r.run(&exec, &act).await?;
        assert_eq!(o.status.code, tonic::Code::DeadlineExceeded as i32, "{}", name(&kind));
        assert_eq!(out, "started\n");
        assert!(!sleepers(tag + 1)?, "{}: a process outlived its action's timeout", name(&kind));
    }
    Ok(())
}

fn usage_of(o: &Executed) -> TestResult<ResourceUsage> {
    let meta = o.result.execution_metadata.as_ref().ok_or("no metadata")?;
    let any = meta.auxiliary_metadata.first().ok_or("no auxiliary metadata")?;
    assert_eq!(any.type_url, "type.googleapis.com/casfs.v1.ResourceUsage");
    Ok(ResourceUsage::decode(any.value.as_slice())?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_reported_and_outputs_are_captured() -> TestResult {
    require_fuse!();
    let r = rig()?;
    let script = "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; umask 077; mkdir -p out/d; \
                  echo private output > out/d/f; chmod 000 out/d/f; head -c 50000000 /dev/zero > /tmp/z; id -u";
    for kind in sandboxes()? {
        let exec = r.executor(&kind, |s| s.memory_limit = 1 << 30)?;
        let act = Act { argv: &["sh", "-c", script], output_paths: &["out/d"], ..Default::default() };
        let (o, out, err) = r.run(&exec, &act).await?;
        let who = format!("{}: {out} {err}", name(&kind));
        assert_eq!((o.status.code, o.result.exit_code), (0, 0), "{who}");
        assert_eq!(out, "65534\n", "{who}");
        let u = usage_of(&o)?;
        assert_eq!(u.sandbox, name(&kind));
        assert_eq!(u.memory_limit_bytes, 1 << 30);
        assert!(!u.memory_limit_exceeded);
        assert!(u.peak_memory_bytes >= 50_000_000, "peak {} below the 50 MB in /tmp: {who}", u.peak_memory_bytes);
        assert!(u.user_cpu.map(|d| d.seconds > 0 || d.nanos > 0).unwrap_or(false), "{u:?}: {who}");
        // The unreadable file of an unprivileged command is captured all the same.
        let tree = Digest::try_from(o.result.output_directories[0].tree_digest.as_ref().ok_or("tree")?)?;
        let tree = casfs::proto::reapi::Tree::decode(r.client.read(&tree).await?)?;
        let f = tree.root.as_ref().and_then(|r| r.files.first()).ok_or("no file in out/d")?;
        assert_eq!(f.name, "f");
        let d = Digest::try_from(f.digest.as_ref().ok_or("digest")?)?;
        assert_eq!(&r.client.read(&d).await?[..], b"private output\n", "{who}");
    }
    Ok(())
}

/// 4 GiB, touched page by page, over `--memory-limit 1G` on a real `casfs serve`: the action
/// fails (killed, a note on its stderr, the limit in its usage), the server serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_over_the_limit_fails_that_action_only() -> TestResult {
    require_fuse!();
    let r = rig()?;
    let runner = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/site-runner.sh").display().to_string();
    ensure_bwrap()?;
    for (label, flags) in [
        ("builtin", vec![]),
        ("bwrap", vec!["--sandbox", "bwrap"]),
        ("wrapper", vec!["--sandbox-wrapper", runner.as_str()]),
    ] {
        let storage = r.tmp.path().join(format!("storage-{label}"));
        let mut args = vec!["--memory-limit", "1G"];
        args.extend(flags);
        let mut server = ServeProcess::start_with(&storage, "127.0.0.1:0", &args)?;
        let client = GrpcStore::new(&RemoteConfig::new(&server.url))?;
        let hog =
            upload_action(&client, &r.input, &Act { argv: &["./hostile", "alloc", "4096"], ..Default::default() })
                .await?;
        let resp = casfs::cas::execution::execute(&client, hog, true, |_, _| {}).await?;
        let result = resp.result.ok_or("no result")?;
        let stdout = read_blob(&client, &result.stdout_digest).await?;
        let stderr = read_blob(&client, &result.stderr_digest).await?;
        let who = format!("{label}: exit {} {stdout} {stderr}", result.exit_code);
        // The site runner reports its child's death its own way; ours are the kernel's.
        if label == "wrapper" {
            assert_ne!(result.exit_code, 0, "{who}");
        } else {
            assert_eq!(result.exit_code, 137, "{who}");
        }
        assert!(!stdout.contains("allocated everything"), "{who}");
        assert!(stderr.contains("went over its memory limit of 1024 MiB"), "{who}");
        let o = Executed { result: result.clone(), status: resp.status.unwrap_or_default() };
        let u = usage_of(&o)?;
        assert!(u.memory_limit_exceeded && u.memory_limit_bytes == 1 << 30, "{u:?}: {who}");
        assert!(u.peak_memory_bytes <= (1 << 30) + (1 << 20), "{u:?}: {who}");
        assert!(server.child.try_wait()?.is_none(), "the server died: {who}");
        let next =
            upload_action(&client, &r.input, &Act { argv: &["echo", "still serving"], ..Default::default() }).await?;
        let resp = casfs::cas::execution::execute(&client, next, true, |_, _| {}).await?;
        let result = resp.result.ok_or("no result")?;
        assert_eq!(result.exit_code, 0, "{label}");
        assert_eq!(read_blob(&client, &result.stdout_digest).await?, "still serving\n", "{label}");
        server.kill();
    }
    Ok(())
}

async fn read_blob(client: &GrpcStore, d: &Option<casfs::proto::reapi::Digest>) -> TestResult<String> {
    let d = Digest::try_from(d.as_ref().ok_or("no digest")?)?;
    Ok(String::from_utf8_lossy(&client.read(&d).await?).into_owned())
}

/// The built-in sandbox clones its child from a multi-threaded executor whose threads come
/// and go (tokio's blocking pool): nothing in the child may wait on a lock another thread
/// held at that moment (glibc's set*id wrappers did, and hung the child for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_while_threads_come_and_go_never_hangs() -> TestResult {
    require_fuse!();
    let r = rig()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::thread::spawn(|| std::hint::black_box(1)).join();
            }
        })
    };
    let root = r.tmp.path().join("roots");
    std::fs::create_dir_all(&root)?;
    let argv = vec!["/bin/true".to_string()];
    let (out, err) = (r.tmp.path().join("out"), r.tmp.path().join("err"));
    let cfg = casfs::exec::SandboxConfig::default();
    let mut result = Ok(());
    for i in 0..200 {
        let dir = root.join(i.to_string());
        std::fs::create_dir(&dir)?;
        let job = casfs::exec::sandbox::Job {
            root: &dir,
            cwd: "/".into(),
            argv: &argv,
            env: &[],
            stdout: &out,
            stderr: &err,
            network: false,
            run_as_root: false,
            timeout: Duration::from_secs(20),
            hermetic: false,
        };
        let done = tokio::time::timeout(Duration::from_secs(30), casfs::exec::sandbox::run(&cfg, job)).await;
        match done {
            Ok(Ok(d)) if d.exit == casfs::exec::sandbox::Exit::Code(0) => {}
            other => {
                result = Err(format!("run {i}: {other:?}; stderr {:?}", std::fs::read_to_string(&err)));
                break;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = churn.join();
    Ok(result?)
}
