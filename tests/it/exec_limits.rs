//! The executor's limits, checked by what the action sees and what is left in /proc: a pids
//! limit that is reached and held (given, and the default of `casfs run`), and nothing of an
//! action surviving its end or a SIGTERM of `casfs run`.

use std::time::Duration;

use casfs::cas::{GrpcStore, RemoteConfig};

use crate::common::*;
use crate::exec::{no_leftovers, rig, stdout_of, upload_action, Act};

/// Tries to fork `sys.argv[1]` children that exec a long sleep (marked by MARK_VAR), stops
/// at the first fork that fails, waits, tries once more, then prints: children started, the
/// error that stopped them, the retry's result, and the processes alive in the action's PID
/// namespace (its own /proc).
const FORKER: &str = r#"
import errno, os, sys, time
mark = os.environ["CASFS_TEST_MARK"]
kids, err = 0, "none"
for _ in range(int(sys.argv[1])):
    try:
        pid = os.fork()
    except OSError as e:
        err = errno.errorcode.get(e.errno, str(e.errno))
        break
    if pid == 0:
        try:
            os.execve("/usr/bin/sleep", ["sleep", "1000"], {"CASFS_TEST_MARK": mark})
        finally:
            os._exit(127)
    kids += 1
time.sleep(0.5)
try:
    pid = os.fork()
except OSError as e:
    again = errno.errorcode.get(e.errno, str(e.errno))
else:
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    again = "forked"
alive = sum(1 for p in os.listdir("/proc") if p.isdigit())
print(kids, err, again, alive)
"#;

/// What FORKER printed for a pids limit of `limit`: everything up to the limit ran, the
/// next fork failed with EAGAIN, so did one half a second later, and exactly `limit`
/// processes were alive at once.
fn expected_forker_output(limit: u32) -> String {
    format!("{} EAGAIN EAGAIN {limit}\n", limit - 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_reaches_the_pids_limit_holds_it_and_leaves_nothing() -> TestResult {
    require_fuse!();
    const LIMIT: u32 = 16;
    let r = rig(LIMIT)?;
    let input = r.work.with_file_name("input-forks");
    std::fs::create_dir_all(&input)?;
    let mark = unique_mark("fork-bomb");
    let act = Act {
        argv: &["python3", "-c", FORKER, "64"],
        env: &[(MARK_VAR, &mark)],
        timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    };
    let d = upload_action(&r.client, &input, &act).await?;
    let o = r.exec.execute(d, true).await?;
    assert_eq!(o.status.code, 0, "{}", o.status.message);
    assert_eq!(o.result.exit_code, 0);
    assert_eq!(stdout_of(&r, &o).await?, expected_forker_output(LIMIT), "children, error, retry, alive");
    let left = marked_processes(&mark);
    assert!(left.is_empty(), "processes of the action survived it: {left:?}");
    no_leftovers(&r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn casfs_run_holds_its_default_pids_limit_of_1024() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let client = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    let input = tmp.path().join("input");
    std::fs::create_dir_all(&input)?;
    let mark = unique_mark("default-limit");
    let act = Act { argv: &["python3", "-c", FORKER, "1100"], env: &[(MARK_VAR, &mark)], ..Default::default() };
    let d = upload_action(&client, &input, &act).await?;
    let out = std::process::Command::new(casfs_bin())
        .args(["run", &d.to_string(), "--remote", &server.url, "--work-dir"])
        .arg(tmp.path().join("work"))
        .arg("--cache-dir")
        .arg(tmp.path().join("cache"))
        .env_remove("CASFS_PIDS_LIMIT")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let result: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let stdout = result["stdout_digest"].as_str().ok_or("no stdout digest")?;
    let stdout = casfs::cas::Cas::read(&client, &casfs::digest::Digest::parse(stdout)?).await?;
    assert_eq!(String::from_utf8_lossy(&stdout), expected_forker_output(1024));
    let left = marked_processes(&mark);
    assert!(left.is_empty(), "processes of the action survived it: {left:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_casfs_run_stops_a_running_action_and_cleans_up() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let client = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    let input = tmp.path().join("input");
    std::fs::create_dir_all(&input)?;
    let mark = unique_mark("sigterm");
    let act =
        Act { argv: &["sh", "-c", "sleep 1000 & sleep 1000; wait"], env: &[(MARK_VAR, &mark)], ..Default::default() };
    let d = upload_action(&client, &input, &act).await?;
    let work = tmp.path().join("work");
    let mut child = std::process::Command::new(casfs_bin())
        .args(["run", &d.to_string(), "--remote", &server.url, "--work-dir"])
        .arg(&work)
        .arg("--cache-dir")
        .arg(tmp.path().join("cache"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // The action has started once both of its sleeps exist.
    let sleeps = || marked_processes(&mark).iter().filter(|(_, comm)| comm == "sleep").count();
    for _ in 0..600 {
        if sleeps() == 2 || child.try_wait()?.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sleeps(), 2, "the action never started: {:?}", marked_processes(&mark));
    assert!(std::fs::read_to_string("/proc/mounts")?.contains(work.to_string_lossy().as_ref()), "no input mount");
    signal(child.id() as i32, libc::SIGTERM);
    let out = child.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "an interrupted run could not run its action: {err}");
    assert!(err.contains("interrupted"), "{err}");
    let left = marked_processes(&mark);
    assert!(left.is_empty(), "the action's processes survived: {left:?}");
    assert!(!std::fs::read_to_string("/proc/mounts")?.contains(work.to_string_lossy().as_ref()), "mounts left");
    let scratch: Vec<_> = std::fs::read_dir(&work)?.flatten().filter(|e| e.file_name() != ".lock").collect();
    assert!(scratch.is_empty(), "scratch left: {scratch:?}");
    Ok(())
}
