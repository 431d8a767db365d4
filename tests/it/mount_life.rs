//! A mount daemon's life when its filesystem is taken away from outside: `umount` and
//! `umount -l` (how operators, systemd and other sandboxes unmount) end the daemon cleanly.

use std::io::Read;
use std::path::Path;
use std::process::Command;

use crate::common::*;
use crate::mount::MountProcess;

/// A tree with one 4 MiB file, uploaded; returns its root digest and the file's bytes.
fn upload(dir: &Path, server: &ServeProcess) -> TestResult<(String, Vec<u8>)> {
    let src = dir.join("src");
    std::fs::create_dir_all(&src)?;
    let big = pseudo_random(11, 4 << 20);
    std::fs::write(src.join("big.bin"), &big)?;
    std::fs::write(src.join("small.txt"), "small\n")?;
    let (code, out, err) = casfs(&["upload", src.to_str().ok_or("path")?, "--remote", &server.url])?;
    assert_eq!(code, 0, "{err}");
    Ok((out.trim().to_string(), big))
}

fn umount(args: &[&str], mnt: &Path) -> TestResult {
    let st = Command::new("umount").args(args).arg(mnt).status()?;
    assert!(st.success(), "umount {args:?} failed");
    Ok(())
}

#[test]
fn umount_of_an_idle_mount_ends_its_daemon() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let (root, _) = upload(tmp.path(), &server)?;
    let mnt = tmp.path().join("mnt");
    let m = MountProcess::start(&root, &mnt, &server.url, &tmp.path().join("cache"), &[])?;
    assert_eq!(std::fs::read_to_string(mnt.join("small.txt"))?, "small\n");

    umount(&[], &mnt)?;
    assert!(m.wait_exit(), "the daemon outlived its mount:\n{}", m.log_text());
    assert!(!m.pidfile.exists(), "pidfile left behind");
    assert!(!casfs::fs::mount::is_mounted(&mnt));
    assert!(m.log_text().contains("unmounted from outside"), "{}", m.log_text());
    Ok(())
}

#[test]
fn lazy_umount_with_a_reader_mid_file_ends_its_daemon_and_keeps_the_cache() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let mut server = ServeProcess::start(&tmp.path().join("storage"))?;
    let (root, big) = upload(tmp.path(), &server)?;
    let mnt = tmp.path().join("mnt");
    let cache = tmp.path().join("cache");
    let m = MountProcess::start(&root, &mnt, &server.url, &cache, &[])?;

    // A reader holds the large file open, half read.
    let mut reader = std::fs::File::open(mnt.join("big.bin"))?;
    let mut half = vec![0u8; big.len() / 2];
    reader.read_exact(&mut half)?;
    assert_eq!(half, big[..big.len() / 2]);

    umount(&["-l"], &mnt)?;
    assert!(m.wait_exit(), "the daemon outlived its lazily unmounted mount:\n{}", m.log_text());
    assert!(!m.pidfile.exists(), "pidfile left behind");
    // The reader is not left hanging: it finishes (passthrough reads need no daemon) or
    // gets an error, at once.
    let mut rest = Vec::new();
    if reader.read_to_end(&mut rest).is_ok() {
        assert_eq!(rest, big[big.len() / 2..], "a finished read must be right");
    }
    drop(reader);

    // What was fetched reached the cache: a new mount serves it with the server gone.
    server.kill();
    let again = MountProcess::start(&root, &mnt, "grpc://127.0.0.1:9", &cache, &["--fetch-timeout", "2s"])?;
    assert_eq!(std::fs::read(mnt.join("big.bin"))?, big, "the cache lost the file");
    drop(again);
    Ok(())
}
