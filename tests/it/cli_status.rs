//! What the command line tells scripts and people: the exit status of `casfs run` for each
//! way an action can go, and colour in logs only on a terminal without NO_COLOR.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use casfs::cas::{GrpcStore, RemoteConfig};

use crate::common::*;
use crate::exec::{upload_action, Act};

/// `casfs run DIGEST` against `url` with scratch space under `dir`: (status, stdout, stderr).
fn casfs_run(dir: &Path, url: &str, digest: &str) -> TestResult<(i32, String, String)> {
    let work = dir.join("work");
    let cache = dir.join("cache");
    let args =
        ["run", digest, "--remote", url, "--retries", "0", "--work-dir", path(&work)?, "--cache-dir", path(&cache)?];
    casfs(&args)
}

fn path(p: &Path) -> TestResult<&str> {
    Ok(p.to_str().ok_or("non-UTF-8 path")?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn casfs_run_exit_status_says_how_the_action_went() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let client = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    let input = tmp.path().join("input");
    std::fs::create_dir_all(&input)?;
    let action = |argv: &'static [&'static str], timeout: Option<u64>| Act {
        argv,
        timeout: timeout.map(Duration::from_secs),
        ..Default::default()
    };
    let run = |d: &str| casfs_run(tmp.path(), &server.url, d);

    // 0: the command ran and exited 0; again from the action cache.
    let ok = upload_action(&client, &input, &action(&["true"], None)).await?.to_string();
    let (code, out, err) = run(&ok)?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"exit_code\": 0"), "{out}");
    let (code, _, err) = run(&ok)?;
    assert_eq!((code, err.contains("served from the action cache")), (0, true), "{err}");

    // 3: the command ran and exited non-zero; the ActionResult still says with what.
    let failing = upload_action(&client, &input, &action(&["sh", "-c", "exit 7"], None)).await?.to_string();
    let (code, out, err) = run(&failing)?;
    assert_eq!(code, 3, "{err}");
    assert!(out.contains("\"exit_code\": 7"), "{out}");

    // 4: the action timed out.
    let slow = upload_action(&client, &input, &action(&["sleep", "1000"], Some(1))).await?.to_string();
    let (code, _, err) = run(&slow)?;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("status 4"), "{err}");

    // 1: casfs could not run it: an Action the CAS lacks, a server that is not there.
    let absent = casfs::digest::Digest::of_bytes(b"no such action").to_string();
    let (code, _, err) = run(&absent)?;
    assert_eq!(code, 1, "{err}");
    let nobody = format!("grpc://127.0.0.1:{}", free_port()?);
    let (code, _, err) = casfs_run(tmp.path(), &nobody, &ok)?;
    assert_eq!(code, 1, "{err}");

    // 2: usage.
    let (code, _, err) = run("not-a-digest")?;
    assert_eq!(code, 2, "{err}");
    Ok(())
}

#[test]
fn casfs_run_help_documents_its_exit_statuses() -> TestResult {
    let (code, out, _) = casfs(&["run", "--help"])?;
    assert_eq!(code, 0);
    for line in [
        "0  the command ran and exited 0",
        "1  casfs could not run it",
        "2  usage error",
        "3  the command ran and exited non-zero",
        "4  the action timed out",
    ] {
        assert!(out.contains(line), "--help lacks {line:?}:\n{out}");
    }
    Ok(())
}

/// A pseudo-terminal: (master, slave).
fn pty() -> TestResult<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (-1, -1);
    let rc =
        // SAFETY: openpty writes two descriptors into the two locals; the rest are NULL.
        unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    if rc != 0 {
        return Err(format!("openpty: {}", std::io::Error::last_os_error()).into());
    }
    // SAFETY: openpty just made both descriptors; each gets exactly one owner.
    Ok(unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) })
}

/// What `casfs serve` logs up to the moment it serves, with its stderr on a terminal or a
/// pipe, and NO_COLOR set to `no_color` (or unset).
fn serve_start_log(dir: &Path, terminal: bool, no_color: Option<&str>) -> TestResult<String> {
    let mut cmd = Command::new(casfs_bin());
    cmd.args(["serve", "--no-execution", "--listen", "127.0.0.1:0", "--storage", path(dir)?])
        .env("CASFS_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    if let Some(v) = no_color {
        cmd.env("NO_COLOR", v);
    }
    let master = if terminal {
        let (master, slave) = pty()?;
        cmd.stderr(Stdio::from(slave));
        Some(master)
    } else {
        cmd.stderr(Stdio::piped());
        None
    };
    let mut child = cmd.spawn()?;
    drop(cmd); // Our copy of the terminal's slave side: the master reads EIO once the child is gone.
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("stdout")?).read_line(&mut line)?;
    let _ = child.kill();
    child.wait()?;
    let mut log = Vec::new();
    match master {
        // Read until the terminal reports that its other side is closed (EIO).
        Some(m) => {
            let _ = std::fs::File::from(m).read_to_end(&mut log);
        }
        None => {
            child.stderr.take().ok_or("stderr")?.read_to_end(&mut log)?;
        }
    }
    let log = String::from_utf8_lossy(&log).into_owned();
    assert!(line.starts_with("casfs: serving on "), "{line:?}\n{log}");
    assert!(log.contains("storage opened"), "no log line:\n{log}");
    Ok(log)
}

#[test]
fn logs_have_colour_only_on_a_terminal_without_no_color() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let storage = tmp.path().join("storage");
    let log = serve_start_log(&storage, false, None)?;
    assert!(!log.contains('\x1b'), "colour in a pipe: {log:?}");
    let log = serve_start_log(&storage, true, None)?;
    assert!(log.contains("\x1b["), "no colour on a terminal: {log:?}");
    let log = serve_start_log(&storage, true, Some("1"))?;
    assert!(!log.contains('\x1b'), "colour despite NO_COLOR: {log:?}");
    Ok(())
}

#[test]
fn a_mount_log_file_has_no_colour_even_when_started_from_a_terminal() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    std::fs::create_dir_all(tmp.path().join("src"))?;
    std::fs::write(tmp.path().join("src/a.txt"), "a\n")?;
    let (code, root, err) = casfs(&["upload", path(&tmp.path().join("src"))?, "--remote", &server.url])?;
    assert_eq!(code, 0, "{err}");
    let (mnt, log, pidfile) = (tmp.path().join("mnt"), tmp.path().join("mount.log"), tmp.path().join("mount.pid"));
    std::fs::create_dir_all(&mnt)?;
    let (_master, slave) = pty()?;
    let slave2 = slave.try_clone()?;
    let status = Command::new(casfs_bin())
        .args(["mount", root.trim(), path(&mnt)?, "--remote", &server.url, "--cache-dir"])
        .arg(tmp.path().join("cache"))
        .args(["--log-file", path(&log)?, "--pidfile", path(&pidfile)?])
        .env("CASFS_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::from(slave))
        .stderr(Stdio::from(slave2))
        .status()?;
    assert!(status.success());
    assert_eq!(std::fs::read_to_string(mnt.join("a.txt"))?, "a\n");
    let pid: i32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
    signal(pid, libc::SIGTERM);
    for _ in 0..200 {
        if !casfs::fs::mount::is_mounted(&mnt) && !pidfile.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if casfs::fs::mount::is_mounted(&mnt) {
        let _ = casfs::fs::mount::detach(&mnt);
        return Err("SIGTERM did not unmount".into());
    }
    let text = std::fs::read_to_string(&log)?;
    assert!(text.contains("FUSE connection initialised"), "{text}");
    assert!(!text.contains('\x1b'), "colour in the log file: {text:?}");
    Ok(())
}
