//! The browse mount against a real `casfs serve`: blobs and Directories by digest, action
//! results with every kind of output, bounded memory over 10,000 digests, hostile names.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use casfs::cas::{ActionCache, Cas, GrpcStore, RemoteConfig};
use casfs::digest::Digest;
use casfs::proto::reapi;
use casfs::tree::build_local_tree;

use crate::common::*;
use crate::mount::MountProcess;

fn mode_of(p: &Path) -> TestResult<u32> {
    Ok(std::fs::metadata(p)?.permissions().mode() & 0o777)
}

#[test]
fn blobs_and_directories_by_digest() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    generate_tree(&src, &TreeSpec { files: 500, dirs: 20, large: vec![5 << 20] })?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let (code, out, err) = casfs(&["upload", src.to_str().ok_or("path")?, "--remote", &server.url])?;
    assert_eq!(code, 0, "{err}");
    let root = Digest::parse(out.trim())?;
    let mnt = tmp.path().join("mnt");
    let _m = MountProcess::start("--browse", &mnt, &server.url, &tmp.path().join("cache"), &[])?;
    let blobs = mnt.join("_/blobs/sha256");
    diff_r(&src, &blobs.join("directory").join(root.to_path_form()))?;
    // Digest folders list only their README.
    let listed: Vec<String> = std::fs::read_dir(blobs.join("directory"))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    assert_eq!(listed, ["README"]);
    let big = std::fs::read(src.join("large-0.bin"))?;
    let d = Digest::of_bytes(&big).to_path_form();
    assert_eq!(std::fs::read(blobs.join("file").join(&d))?, big);
    assert_eq!(mode_of(&blobs.join("file").join(&d))?, 0o444);
    assert_eq!(mode_of(&blobs.join("executable").join(&d))?, 0o555);
    // Nested instance names resolve (this server shares one namespace across instances).
    diff_r(&src, &mnt.join("ci/linux/blobs/sha256/directory").join(root.to_path_form()))?;
    Ok(())
}

/// Uploads everything an action result refers to and stores it in the action cache.
async fn store_action(client: &GrpcStore, tmp: &Path) -> TestResult<(Digest, reapi::ActionResult, std::path::PathBuf)> {
    // An output directory, as a Tree.
    let outdir = tmp.join("outdir");
    std::fs::create_dir_all(outdir.join("nested/deeper"))?;
    std::fs::write(outdir.join("a.txt"), "output a\n")?;
    std::fs::write(outdir.join("nested/deeper/b.bin"), pseudo_random(4, 70_000))?;
    std::fs::set_permissions(outdir.join("a.txt"), std::fs::Permissions::from_mode(0o755))?;
    std::os::unix::fs::symlink("a.txt", outdir.join("link-in-tree"))?;
    casfs::transfer::upload_dir(client, &outdir, false).await?;
    let local = build_local_tree(&outdir, &|_| {})?;
    let root = reapi::Directory::decode(local.directories[&local.root].as_slice())?;
    let children = local
        .directories
        .iter()
        .filter(|(d, _)| **d != local.root)
        .map(|(_, b)| reapi::Directory::decode(b.as_slice()))
        .collect::<Result<Vec<_>, _>>()?;
    let tree = reapi::Tree { root: Some(root), children }.encode_to_vec();
    let tree_digest = Digest::of_bytes(&tree);
    client.write(&tree_digest, tree.into()).await?;

    let obj = Bytes::from(pseudo_random(8, 123_456));
    let stdout = Bytes::from_static(b"compiling...\ndone\n");
    let stderr = Bytes::from_static(b"warning: something\n");
    for b in [&obj, &stdout, &stderr] {
        client.write(&Digest::of_bytes(b), b.clone()).await?;
    }
    let command = reapi::Command {
        arguments: vec!["/bin/cc".into(), "-c".into(), "x.c".into()],
        output_paths: vec!["out/x.o".into(), "out/dir".into()],
        ..Default::default()
    }
    .encode_to_vec();
    let command_digest = Digest::of_bytes(&command);
    client.write(&command_digest, command.into()).await?;
    let action =
        reapi::Action { command_digest: Some(command_digest.to_proto()), ..Default::default() }.encode_to_vec();
    let action_digest = Digest::of_bytes(&action);
    client.write(&action_digest, action.into()).await?;

    let result = reapi::ActionResult {
        exit_code: 42,
        output_files: vec![reapi::OutputFile {
            path: "out/x.o".into(),
            digest: Some(Digest::of_bytes(&obj).to_proto()),
            is_executable: false,
            ..Default::default()
        }],
        output_directories: vec![reapi::OutputDirectory {
            path: "out/dir".into(),
            tree_digest: Some(tree_digest.to_proto()),
            ..Default::default()
        }],
        output_symlinks: vec![reapi::OutputSymlink {
            path: "out/latest".into(),
            target: "x.o".into(),
            node_properties: None,
        }],
        stdout_digest: Some(Digest::of_bytes(&stdout).to_proto()),
        stderr_raw: stderr.clone(),
        ..Default::default()
    };
    client.update_action_result(&action_digest, &result).await?;
    Ok((action_digest, result, outdir))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_results_with_every_kind_of_output() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let client = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    let (action, result, outdir) = store_action(&client, tmp.path()).await?;
    let mnt = tmp.path().join("mnt");
    let _m = MountProcess::start("--browse", &mnt, &server.url, &tmp.path().join("cache"), &[])?;
    let view = mnt.join("_/actions/sha256").join(action.to_path_form());
    assert_eq!(std::fs::read_to_string(view.join("exit_code"))?, "42\n");
    assert_eq!(std::fs::read(view.join("stdout"))?, b"compiling...\ndone\n");
    assert_eq!(std::fs::read(view.join("stderr"))?, b"warning: something\n");
    let out = view.join("outputs/out");
    let obj = client.read(&Digest::try_from(result.output_files[0].digest.as_ref().ok_or("digest")?)?).await?;
    assert_eq!(std::fs::read(out.join("x.o"))?, obj);
    assert_eq!(std::fs::read_link(out.join("latest"))?, Path::new("x.o"));
    diff_r(&outdir, &out.join("dir"))?;
    assert_eq!(mode_of(&out.join("dir/a.txt"))?, 0o555);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(view.join("action_result.json"))?)?;
    assert_eq!(json["exit_code"], 42);
    let cmd: serde_json::Value = serde_json::from_slice(&std::fs::read(view.join("command.json"))?)?;
    assert_eq!(cmd["arguments"][0], "/bin/cc");
    assert!(view.join("action.json").exists());

    // The same views without a mount.
    let (code, ls, err) = casfs(&["ls", "-r", "--action", &action.to_string(), "--remote", &server.url])?;
    assert_eq!(code, 0, "{err}");
    for want in ["exit_code", "outputs/out/x.o", "outputs/out/dir/nested/deeper/b.bin", "outputs/out/latest -> x.o"] {
        assert!(ls.contains(want), "ls --action lacks {want}:\n{ls}");
    }
    let (code, text, err) = casfs(&["cat", "--action", &action.to_string(), "stdout", "--remote", &server.url])?;
    assert_eq!((code, text.as_str()), (0, "compiling...\ndone\n"), "{err}");
    let missing = Digest::of_bytes(b"no such action").to_string();
    let (code, _, err) = casfs(&["cat", "--action", &missing, "stdout", "--remote", &server.url])?;
    assert_eq!(code, 1);
    assert!(err.contains("no cached result"), "{err}");
    Ok(())
}

fn rss_kib(pid: i32) -> TestResult<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).ok_or("VmRSS value")?.parse()?)
}

/// RSS the daemon must stay under while 10,000 digests are visited.
const RSS_BOUND_KIB: u64 = 256 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_digests_keep_memory_bounded() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let client = Arc::new(GrpcStore::new(&RemoteConfig::new(&server.url))?);
    let blobs: Vec<(Digest, Bytes)> = (0..10_000u64)
        .map(|i| {
            let b = Bytes::from(format!("blob number {i}\n{}", "x".repeat((i % 200) as usize)));
            (Digest::of_bytes(&b), b)
        })
        .collect();
    for (_, r) in client.write_many(blobs.clone()).await? {
        r?;
    }
    let mnt = tmp.path().join("mnt");
    let m = MountProcess::start("--browse", &mnt, &server.url, &tmp.path().join("cache"), &[])?;
    let files = mnt.join("_/blobs/sha256/file");
    let start = rss_kib(m.pid)?;
    let mut peak = start;
    let paths: Vec<std::path::PathBuf> = blobs.iter().map(|(d, _)| files.join(d.to_path_form())).collect();
    let checked = tokio::task::spawn_blocking(move || -> TestResult<u64> {
        let mut peak = 0;
        for (i, p) in paths.iter().enumerate() {
            let meta = std::fs::metadata(p)?;
            assert!(meta.len() > 0);
            if i % 10 == 0 {
                std::fs::read(p)?;
            }
            if i % 1000 == 0 {
                peak = peak.max(rss_kib(m.pid)?);
            }
        }
        Ok(peak)
    })
    .await??;
    peak = peak.max(checked);
    eprintln!(
        "browse daemon RSS: {start} KiB at start, peak {peak} KiB over 10,000 digests (bound {RSS_BOUND_KIB} KiB)"
    );
    assert!(peak < RSS_BOUND_KIB, "RSS {peak} KiB over the bound");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_are_enoent_or_eio_and_harmless() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let client = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    let file = Bytes::from_static(b"just a file, not a Directory message\xff\xff");
    let fd = Digest::of_bytes(&file);
    client.write(&fd, file).await?;
    let mnt = tmp.path().join("mnt");
    let m = MountProcess::start("--browse", &mnt, &server.url, &tmp.path().join("cache"), &[])?;
    let dir = mnt.join("_/blobs/sha256/directory");
    let wrong_size = format!("{}-{}", fd.hash_hex(), fd.size() + 1);
    let long = "a".repeat(300);
    let cases: Vec<(String, &[i32])> = vec![
        ("zz-1".into(), &[libc::ENOENT]),
        ("not-a-digest".into(), &[libc::ENOENT]),
        (format!("{}-x", fd.hash_hex()), &[libc::ENOENT]),
        (wrong_size, &[libc::ENOENT]),
        (long, &[libc::ENOENT, libc::ENAMETOOLONG]),
        (fd.to_path_form(), &[libc::EIO]),
    ];
    for (name, allowed) in cases {
        let err = std::fs::metadata(dir.join(&name)).expect_err(&name);
        assert!(allowed.contains(&err.raw_os_error().unwrap_or(0)), "{name}: {err}");
    }
    let err = std::fs::metadata(mnt.join("_/actions/sha256").join(fd.to_path_form())).expect_err("no action");
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    // sha512 and the other supported functions have folders; an unsupported one has none.
    let err = std::fs::metadata(mnt.join("_/blobs/vso")).expect_err("vso");
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    // The daemon is unaffected and logged the bad Directory.
    assert_eq!(std::fs::read(mnt.join("_/blobs/sha256/file").join(fd.to_path_form()))?.len() as u64, fd.size());
    assert!(m.log_text().contains(&fd.hash_hex()), "{}", m.log_text());
    assert!(signal(m.pid, 0));
    Ok(())
}
