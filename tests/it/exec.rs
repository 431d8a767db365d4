//! The executor against a real `casfs serve`: a gcc compile matching a local one bit for bit,
//! a cache hit, timeouts, containment of escapes and network use (pids limits and cleanup
//! after signals: `exec_limits`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;

use casfs::cas::{ActionCache, Cas, GrpcStore, RemoteConfig};
use casfs::digest::Digest;
use casfs::exec::{CachedExecutor, ExecConfig, Executor, Limits, Materialize, SandboxConfig};
use casfs::fs::FetchConfig;
use casfs::metrics::Metrics;
use casfs::proto::reapi;

use crate::common::*;

/// What an action runs and expects.
#[derive(Default)]
pub(crate) struct Act<'a> {
    pub argv: &'a [&'a str],
    pub output_files: &'a [&'a str],
    pub output_paths: &'a [&'a str],
    pub timeout: Option<Duration>,
    pub network: bool,
    pub do_not_cache: bool,
    /// Environment variables besides PATH.
    pub env: &'a [(&'a str, &'a str)],
    /// Ask for uid 0 inside the action's user namespace (`run-as-root=true`).
    pub run_as_root: bool,
}

/// The Command's environment: PATH and `a.env`, sorted by name as REAPI requires.
fn environment(a: &Act<'_>) -> Vec<reapi::command::EnvironmentVariable> {
    let mut env: Vec<_> = std::iter::once(("PATH", "/usr/bin:/bin"))
        .chain(a.env.iter().copied())
        .map(|(name, value)| reapi::command::EnvironmentVariable { name: name.into(), value: value.into() })
        .collect();
    env.sort_by(|x, y| x.name.cmp(&y.name));
    env
}

pub(crate) async fn upload_action(client: &GrpcStore, input: &Path, a: &Act<'_>) -> TestResult<Digest> {
    let root = casfs::transfer::upload_dir(client, input, false).await?.root;
    let mut properties = vec![reapi::platform::Property { name: "OSFamily".into(), value: "linux".into() }];
    if a.network {
        properties.push(reapi::platform::Property { name: "network".into(), value: "true".into() });
    }
    if a.run_as_root {
        properties.push(reapi::platform::Property { name: "run-as-root".into(), value: "true".into() });
    }
    let command = reapi::Command {
        arguments: a.argv.iter().map(|s| s.to_string()).collect(),
        environment_variables: environment(a),
        output_files: a.output_files.iter().map(|s| s.to_string()).collect(),
        output_paths: a.output_paths.iter().map(|s| s.to_string()).collect(),
        platform: Some(reapi::Platform { properties }),
        ..Default::default()
    };
    let cb = command.encode_to_vec();
    let cd = Digest::of_bytes(&cb);
    client.write(&cd, cb.into()).await?;
    let action = reapi::Action {
        command_digest: Some(cd.to_proto()),
        input_root_digest: Some(root.to_proto()),
        timeout: a.timeout.map(|t| prost_types::Duration { seconds: t.as_secs() as i64, nanos: 0 }),
        do_not_cache: a.do_not_cache,
        ..Default::default()
    };
    let ab = action.encode_to_vec();
    let ad = Digest::of_bytes(&ab);
    client.write(&ad, ab.into()).await?;
    Ok(ad)
}

/// A `casfs serve`, a client of it and an executor working under `work`.
pub(crate) struct Rig {
    _tmp: tempfile::TempDir,
    _server: ServeProcess,
    pub client: Arc<GrpcStore>,
    pub exec: CachedExecutor,
    pub work: std::path::PathBuf,
    pub url: String,
}

pub(crate) fn rig(pids_limit: u32) -> TestResult<Rig> {
    rig_with(pids_limit, Materialize::Lazy)
}

fn rig_with(pids_limit: u32, materialize: Materialize) -> TestResult<Rig> {
    rig_as(pids_limit, materialize, None)
}

fn rig_as(pids_limit: u32, materialize: Materialize, run_as: Option<(u32, u32)>) -> TestResult<Rig> {
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let client = Arc::new(GrpcStore::new(&RemoteConfig::new(&server.url))?);
    let cache = local_cache(&tmp.path().join("cache"))?;
    let work = tmp.path().join("work");
    let cfg = ExecConfig {
        materialize,
        work_dir: work.clone(),
        limits: Limits {
            default_timeout: Duration::from_secs(120),
            max_timeout: Duration::from_secs(600),
            ..Limits::default()
        },
        sandbox: SandboxConfig { pids_limit, run_as, ..SandboxConfig::default() },
        worker_name: "test-worker".into(),
        fetch: FetchConfig { deadline: Duration::from_secs(20), ..FetchConfig::default() },
    };
    let exec = cached_executor(&client, cache, cfg);
    let url = server.url.clone();
    Ok(Rig { _tmp: tmp, _server: server, client, exec, work, url })
}

/// An executor over `client` with its action cache in front, as `casfs run` has it.
fn cached_executor(client: &Arc<GrpcStore>, cache: Arc<casfs::cache::LocalCache>, cfg: ExecConfig) -> CachedExecutor {
    CachedExecutor::new(Arc::new(Executor::new(client.clone(), cache, cfg, Metrics::new())), client.clone())
}

pub(crate) fn no_leftovers(r: &Rig) -> TestResult {
    let left: Vec<_> = std::fs::read_dir(&r.work)?.collect();
    assert!(left.is_empty(), "scratch folders left: {left:?}");
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    let work = r.work.to_string_lossy();
    assert!(!mounts.contains(work.as_ref()), "mounts left under {work}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcc_compile_matches_a_local_build_and_hits_the_cache() -> TestResult {
    require_fuse!();
    if std::process::Command::new("gcc").arg("--version").output().is_err() {
        skip!("gcc is not installed");
    }
    let r = rig(1024)?;
    let src = r.work.parent().ok_or("parent")?.join("src");
    std::fs::create_dir_all(src.join("greet"))?;
    std::fs::write(src.join("greet/greet.h"), "const char *greet(void);\n")?;
    std::fs::write(
        src.join("greet/greet.c"),
        "#include \"greet.h\"\nconst char *greet(void) { return \"hello from casfs\"; }\n",
    )?;
    std::fs::write(
        src.join("main.c"),
        "#include <stdio.h>\n#include \"greet/greet.h\"\nint main(void) { puts(greet()); return 0; }\n",
    )?;
    let argv = ["gcc", "-O2", "-o", "out/hello", "main.c", "greet/greet.c"];
    let d = upload_action(&r.client, &src, &Act { argv: &argv, output_files: &["out/hello"], ..Default::default() })
        .await?;
    let o = r.exec.execute(d, false).await?;
    assert_eq!(o.status.code, 0, "{}", o.status.message);
    assert_eq!(
        o.result.exit_code,
        0,
        "stderr: {:?}",
        String::from_utf8_lossy(
            &r.client.read(&Digest::try_from(o.result.stderr_digest.as_ref().ok_or("stderr")?)?).await?
        )
    );
    assert!(!o.cached);
    let remote_bin =
        r.client.read(&Digest::try_from(o.result.output_files[0].digest.as_ref().ok_or("digest")?)?).await?;
    assert!(o.result.output_files[0].is_executable);

    // The same compile, locally, in a copy of the sources.
    let local = r.work.parent().ok_or("parent")?.join("local");
    std::fs::create_dir_all(local.join("out"))?;
    std::fs::create_dir_all(local.join("greet"))?;
    for f in ["main.c", "greet/greet.c", "greet/greet.h"] {
        std::fs::copy(src.join(f), local.join(f))?;
    }
    let st = std::process::Command::new("gcc").args(&argv[1..]).current_dir(&local).status()?;
    assert!(st.success());
    assert_eq!(std::fs::read(local.join("out/hello"))?, remote_bin.to_vec(), "remote and local binaries differ");
    let run = std::process::Command::new(local.join("out/hello")).output()?;
    assert_eq!(String::from_utf8_lossy(&run.stdout), "hello from casfs\n");

    let again = r.exec.execute(d, false).await?;
    assert!(again.cached);
    assert_eq!(r.exec.metrics().get("casfs_exec_cache_hits_total"), 1);
    let meta = again.result.execution_metadata.ok_or("metadata")?;
    assert_eq!(meta.worker, "test-worker");
    for t in [
        meta.queued_timestamp,
        meta.worker_start_timestamp,
        meta.input_fetch_start_timestamp,
        meta.execution_start_timestamp,
        meta.execution_completed_timestamp,
        meta.output_upload_completed_timestamp,
        meta.worker_completed_timestamp,
    ] {
        assert!(t.is_some(), "a timestamp is missing");
    }
    no_leftovers(&r)
}

pub(crate) async fn stdout_of(r: &Rig, o: &casfs::exec::Outcome) -> TestResult<String> {
    let d = Digest::try_from(o.result.stdout_digest.as_ref().ok_or("stdout")?)?;
    Ok(String::from_utf8_lossy(&r.client.read(&d).await?).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_escapes_and_network_are_contained() -> TestResult {
    require_fuse!();
    let r = rig(64)?;
    let input = r.work.parent().ok_or("parent")?.join("input");
    std::fs::create_dir_all(input.join("out"))?;
    std::fs::write(input.join("data.txt"), "input data\n")?;

    // sleep 1000 with a 2 s timeout: DEADLINE_EXCEEDED, stdout still attached.
    let d = upload_action(
        &r.client,
        &input,
        &Act {
            argv: &["sh", "-c", "echo started; sleep 1000"],
            timeout: Some(Duration::from_secs(2)),
            ..Default::default()
        },
    )
    .await?;
    let o = r.exec.execute(d, false).await?;
    assert_eq!(o.status.code, tonic::Code::DeadlineExceeded as i32);
    assert_eq!(stdout_of(&r, &o).await?, "started\n");
    assert!(r.client.get_action_result(&d).await?.is_none(), "a timed-out action was cached");

    // An output symlink to /etc/passwd is reported as a symlink; its target is never read.
    let d = upload_action(
        &r.client,
        &input,
        &Act { argv: &["ln", "-s", "/etc/passwd", "out/link"], output_files: &["out/link"], ..Default::default() },
    )
    .await?;
    let o = r.exec.execute(d, false).await?;
    assert_eq!(o.result.exit_code, 0);
    assert!(o.result.output_files.is_empty());
    assert_eq!(o.result.output_file_symlinks[0].target, "/etc/passwd");
    assert_eq!(o.result.output_symlinks[0].path, "out/link");

    // A ../ output path is refused before anything runs.
    let d =
        upload_action(&r.client, &input, &Act { argv: &["true"], output_files: &["../escape"], ..Default::default() })
            .await?;
    let err = r.exec.execute(d, false).await.expect_err("../ output accepted");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // Writing outside the working directory: host folders are read-only, the rest lands in
    // the action's own layer and never on the host.
    let marker = format!("/casfs-escape-{}", std::process::id());
    let script = format!("echo x > {marker}; echo y > /usr/casfs-evil; echo done");
    let d = upload_action(&r.client, &input, &Act { argv: &["sh", "-c", &script], ..Default::default() }).await?;
    let o = r.exec.execute(d, false).await?;
    assert_eq!(stdout_of(&r, &o).await?, "done\n");
    assert!(!Path::new(&marker).exists() && !Path::new("/usr/casfs-evil").exists(), "the command wrote on the host");

    // No network unless the platform asks for it.
    let port = r.url.rsplit(':').next().ok_or("port")?.to_string();
    let probe =
        format!("import socket; socket.create_connection(('127.0.0.1', {port}), timeout=3); print('connected')");
    let d = upload_action(&r.client, &input, &Act { argv: &["python3", "-c", &probe], ..Default::default() }).await?;
    let o = r.exec.execute(d, false).await?;
    assert_ne!(o.result.exit_code, 0, "reached the network without network=true");
    let d = upload_action(
        &r.client,
        &input,
        &Act { argv: &["python3", "-c", &probe], network: true, ..Default::default() },
    )
    .await?;
    let o = r.exec.execute(d, false).await?;
    assert_eq!(stdout_of(&r, &o).await?, "connected\n");
    no_leftovers(&r)
}

/// A lazy executor working in `work`.
fn lazy_config(work: &Path, fetch: FetchConfig) -> ExecConfig {
    ExecConfig {
        materialize: Materialize::Lazy,
        work_dir: work.to_path_buf(),
        limits: Limits::default(),
        sandbox: SandboxConfig::default(),
        worker_name: "test".into(),
        fetch,
    }
}

/// An ActionResult without what legitimately differs between two runs.
fn comparable(mut r: reapi::ActionResult) -> reapi::ActionResult {
    r.execution_metadata = None;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_and_eager_give_identical_results() -> TestResult {
    require_fuse!();
    let lazy = rig_with(1024, Materialize::Lazy)?;
    let eager = rig_with(1024, Materialize::Eager)?;
    let input = lazy.work.parent().ok_or("parent")?.join("input");
    std::fs::create_dir_all(input.join("src/sub"))?;
    std::fs::write(input.join("src/a.txt"), "alpha\n")?;
    std::fs::write(input.join("src/sub/b.txt"), "beta\n")?;
    // Large enough to be opened with passthrough in the lazy root; appended to below, so
    // overlayfs copies it up from the passthrough file.
    std::fs::write(input.join("src/big.bin"), pseudo_random(11, 3 << 20))?;
    std::fs::write(input.join("tool.sh"), "#!/bin/sh\necho tool ran \"$@\"\n")?;
    std::fs::set_permissions(input.join("tool.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let script = "mkdir -p out/dir/nested && cp src/a.txt out/dir/ && cat src/sub/b.txt > out/dir/nested/b2 && \
                  ln -s a.txt out/dir/link && ./tool.sh x > out/log && cp -r src out/copy && echo to-stderr >&2 && \
                  sha256sum src/big.bin > out/dir/big.sum && cat src/a.txt >> src/big.bin";
    let argv1 = ["sh", "-c", script];
    let acts: Vec<Act> = vec![
        Act { argv: &argv1, output_paths: &["out/dir", "out/log", "out/copy", "src"], ..Default::default() },
        Act { argv: &["sh", "-c", "echo failing; exit 3"], output_files: &["nothing"], ..Default::default() },
    ];
    for a in &acts {
        let dl = upload_action(&lazy.client, &input, a).await?;
        let de = upload_action(&eager.client, &input, a).await?;
        assert_eq!(dl, de);
        let ol = lazy.exec.execute(dl, true).await?;
        let oe = eager.exec.execute(de, true).await?;
        assert_eq!(ol.status, oe.status);
        assert_eq!(comparable(ol.result.clone()), comparable(oe.result), "lazy and eager disagree");
        assert!(!ol.result.output_directories.is_empty() || ol.result.exit_code == 3);
    }
    no_leftovers(&lazy)?;
    no_leftovers(&eager)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_one_percent_of_a_100k_file_root_fetches_one_percent() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let input = tmp.path().join("input");
    for d in 0..1000 {
        let dir = input.join(format!("dir-{d:03}"));
        std::fs::create_dir_all(&dir)?;
        for f in 0..100 {
            std::fs::write(dir.join(format!("f{f:02}")), format!("content of dir {d} file {f}\n"))?;
        }
    }
    let log = tmp.path().join("access.log");
    let server = ServeProcess::start_with(
        &tmp.path().join("storage"),
        "127.0.0.1:0",
        &["--access-log", log.to_str().ok_or("path")?],
    )?;
    let client = Arc::new(GrpcStore::new(&RemoteConfig::new(&server.url))?);
    let script = "cat dir-00*/* > out/all && wc -l < out/all";
    let d = upload_action(
        &client,
        &input,
        &Act { argv: &["sh", "-c", script], output_files: &["out/all"], ..Default::default() },
    )
    .await?;
    std::fs::write(&log, b"")?;
    let cfg = lazy_config(&tmp.path().join("work"), FetchConfig::default());
    // Access profiles off: with them, a first run with no profile yet prefetches the whole
    // root on purpose (tests/it/profiles.rs); this is about the mount's own laziness.
    let off = casfs::exec::ProfileConfig { enabled: false, ..Default::default() };
    let exec = Executor::new(client.clone(), local_cache(&tmp.path().join("cache"))?, cfg, Metrics::new());
    let exec = CachedExecutor::new(Arc::new(exec.with_profiles(off)), client.clone());
    let o = exec.execute(d, false).await?;
    assert_eq!(o.result.exit_code, 0);
    let out = client.read(&Digest::try_from(o.result.output_files[0].digest.as_ref().ok_or("digest")?)?).await?;
    assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1000);
    let reads = std::fs::read_to_string(&log)?.lines().filter(|l| l.starts_with("read ")).count();
    eprintln!("input root of 101,001 blobs (100,000 files, 1,001 Directories): {reads} blobs read by the executor");
    // 1,000 files + the root and 10 Directories + Action + Command, and nothing else.
    assert!((1000..=1020).contains(&reads), "{reads} blobs fetched for a 1% read");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_failures_mid_run_are_infrastructure_failures() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let input = tmp.path().join("input");
    std::fs::create_dir_all(&input)?;
    std::fs::write(input.join("data.txt"), "needed later\n")?;
    std::fs::write(input.join("gone.txt"), "deleted from the server\n")?;
    let storage = tmp.path().join("storage");
    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut server = ServeProcess::start_on(&storage, &listen)?;
    let client = Arc::new(GrpcStore::new(&RemoteConfig::new(&server.url))?);
    let cfg = lazy_config(
        &tmp.path().join("work"),
        FetchConfig { deadline: Duration::from_secs(3), ..FetchConfig::default() },
    );
    let exec = Arc::new(cached_executor(&client, local_cache(&tmp.path().join("cache"))?, cfg));

    // A blob missing from the CAS while the command reads it: FAILED_PRECONDITION MISSING.
    let gone = Digest::of_bytes(b"deleted from the server\n");
    let d = upload_action(&client, &input, &Act { argv: &["cat", "gone.txt"], ..Default::default() }).await?;
    let hex = gone.hash_hex();
    std::fs::remove_file(storage.join("cas").join(&hex[..2]).join(&hex))?;
    drop(server);
    server = ServeProcess::start_on(&storage, &listen)?;
    let err = exec.execute(d, false).await.expect_err("missing input reported as success");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    let status = err.to_rpc_status();
    let pf = casfs::proto::rpc::PreconditionFailure::decode(status.details[0].value.as_slice())?;
    assert_eq!(pf.violations[0].r#type, "MISSING");
    assert_eq!(pf.violations[0].subject, format!("blobs/{hex}/{}", gone.size()));

    // The CAS going away while the command waits to read: UNAVAILABLE, never cached.
    let d = upload_action(&client, &input, &Act { argv: &["sh", "-c", "sleep 2; cat data.txt"], ..Default::default() })
        .await?;
    let e2 = exec.clone();
    let run = tokio::spawn(async move { e2.execute(d, false).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.kill();
    let err = tokio::time::timeout(Duration::from_secs(60), run)
        .await??
        .expect_err("CAS outage reported as the command's result");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    let _server = ServeProcess::start_on(&storage, &listen)?;
    assert!(client.get_action_result(&d).await?.is_none());
    let left: Vec<_> = std::fs::read_dir(tmp.path().join("work"))?.collect();
    assert!(left.is_empty(), "scratch left: {left:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_as_another_user_can_write_outputs_but_not_inputs() -> TestResult {
    require_fuse!();
    for mode in [Materialize::Lazy, Materialize::Eager] {
        let r = rig_as(1024, mode, Some((65534, 65534)))?;
        let input = r.work.with_file_name("input-run-as");
        std::fs::create_dir_all(input.join("src"))?;
        std::fs::write(input.join("src/in.txt"), "input\n")?;
        let script = "id -u > out/deep/uid; cat src/in.txt > src/copy.txt; cp src/copy.txt out/deep/; \
                      if echo x >> src/in.txt; then echo input-writable; else echo input-protected; fi";
        let act = Act {
            argv: &["sh", "-c", script],
            output_paths: &["out/deep/uid", "out/deep/copy.txt"],
            ..Default::default()
        };
        let action = upload_action(&r.client, &input, &act).await?;
        let o = r.exec.execute(action, true).await?;
        assert_eq!(o.result.exit_code, 0, "{mode:?}: {}", stdout_of(&r, &o).await?);
        let files: std::collections::HashMap<_, _> =
            o.result.output_files.iter().map(|f| (f.path.clone(), f.digest.clone())).collect();
        let uid = Digest::try_from(files.get("out/deep/uid").ok_or("no uid output")?.as_ref().ok_or("digest")?)?;
        assert_eq!(&r.client.read(&uid).await?[..], b"65534\n", "{mode:?}");
        assert!(files.contains_key("out/deep/copy.txt"), "{mode:?}");
        assert_eq!(stdout_of(&r, &o).await?, "input-protected\n", "{mode:?}: inputs stay read-only");
        no_leftovers(&r)?;
    }
    Ok(())
}
