//! The Execution service of a real `casfs serve`: operation streams and stages, WaitExecution,
//! in-flight deduplication, errors in the response, action cache checks, and a load of 64
//! concurrent actions on 4 slots.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost::Message;

use casfs::cas::{Cas, GrpcStore, RemoteConfig};
use casfs::digest::Digest;
use casfs::proto::longrunning::{operation, Operation};
use casfs::proto::reapi::{self, execution_client::ExecutionClient, execution_stage::Value as Stage};

use crate::common::*;
use crate::exec::{upload_action, Act};

struct Rig {
    tmp: tempfile::TempDir,
    server: ServeProcess,
    client: Arc<GrpcStore>,
}

fn rig(extra: &[&str]) -> TestResult<Rig> {
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start_with(&tmp.path().join("storage"), "127.0.0.1:0", extra)?;
    let client = Arc::new(GrpcStore::new(&RemoteConfig::new(&server.url))?);
    std::fs::create_dir_all(tmp.path().join("in"))?;
    std::fs::write(tmp.path().join("in/data.txt"), "input data\n")?;
    Ok(Rig { tmp, server, client })
}

impl Rig {
    fn exec(&self) -> ExecutionClient<casfs::cas::Conn> {
        ExecutionClient::new(self.client.conn())
    }

    async fn action(&self, a: &Act<'_>) -> TestResult<Digest> {
        upload_action(&self.client, &self.tmp.path().join("in"), a).await
    }

    /// Every Operation of one Execute call, in order.
    async fn execute_all(&self, action: Digest, skip: bool) -> TestResult<Vec<Operation>> {
        let req = reapi::ExecuteRequest {
            action_digest: Some(action.to_proto()),
            skip_cache_lookup: skip,
            ..Default::default()
        };
        let mut s = self.exec().execute(req).await?.into_inner();
        let mut ops = Vec::new();
        while let Some(op) = s.message().await? {
            ops.push(op);
        }
        Ok(ops)
    }

    async fn read(&self, d: &Option<reapi::Digest>) -> TestResult<String> {
        let d = Digest::try_from(d.as_ref().ok_or("no digest")?)?;
        Ok(String::from_utf8_lossy(&self.client.read(&d).await?).into_owned())
    }
}

fn stage(op: &Operation) -> TestResult<(Stage, reapi::ExecuteOperationMetadata)> {
    let any = op.metadata.as_ref().ok_or("operation without metadata")?;
    assert!(any.type_url.ends_with("build.bazel.remote.execution.v2.ExecuteOperationMetadata"));
    let m = reapi::ExecuteOperationMetadata::decode(any.value.as_slice())?;
    Ok((Stage::try_from(m.stage)?, m))
}

fn response(op: &Operation) -> TestResult<reapi::ExecuteResponse> {
    assert!(op.done, "only a done operation has a response");
    match &op.result {
        Some(operation::Result::Response(any)) => {
            assert!(any.type_url.ends_with("build.bazel.remote.execution.v2.ExecuteResponse"));
            Ok(reapi::ExecuteResponse::decode(any.value.as_slice())?)
        }
        other => Err(format!("unexpected operation result {other:?}").into()),
    }
}

fn last_response(ops: &[Operation]) -> TestResult<reapi::ExecuteResponse> {
    response(ops.last().ok_or("empty operation stream")?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_streams_stages_and_wait_execution_reattaches() -> TestResult {
    let r = rig(&[])?;
    let caps = r.client.capabilities().await?;
    assert!(caps.execution_capabilities.as_ref().ok_or("no execution capabilities")?.exec_enabled);

    let act = Act { argv: &["sh", "-c", "sleep 1; cat data.txt; echo oops >&2"], ..Default::default() };
    let action = r.action(&act).await?;
    let req = reapi::ExecuteRequest { action_digest: Some(action.to_proto()), ..Default::default() };
    let mut s = r.exec().execute(req).await?.into_inner();
    let first = s.message().await?.ok_or("no first operation")?;
    assert!(first.name.starts_with("operations/") && !first.done);
    let (st, meta) = stage(&first)?;
    assert_ne!(st, Stage::Completed);
    assert_eq!(meta.action_digest, Some(action.to_proto()));

    // A second client reattaches by name while the action runs and sees the same end.
    let mut w = r.exec().wait_execution(reapi::WaitExecutionRequest { name: first.name.clone() }).await?.into_inner();
    let mut waited = Vec::new();
    while let Some(op) = w.message().await? {
        assert_eq!(op.name, first.name);
        waited.push(op);
    }
    let mut ops = vec![first];
    while let Some(op) = s.message().await? {
        ops.push(op);
    }
    // Stages only move forward, and done is set exactly on COMPLETED.
    let stages: Vec<Stage> = ops.iter().map(|o| stage(o).map(|s| s.0)).collect::<TestResult<_>>()?;
    assert!(stages.windows(2).all(|w| (w[0] as i32) < (w[1] as i32)), "stages {stages:?}");
    assert!(stages.contains(&Stage::Executing), "stages {stages:?}");
    for o in &ops {
        assert_eq!(o.done, stage(o)?.0 == Stage::Completed);
    }
    let resp = last_response(&ops)?;
    assert_eq!(resp.status.as_ref().map(|s| s.code), Some(0));
    assert!(!resp.cached_result);
    let result = resp.result.ok_or("no result")?;
    assert_eq!(result.exit_code, 0);
    assert_eq!(r.read(&result.stdout_digest).await?, "input data\n");
    assert_eq!(r.read(&result.stderr_digest).await?, "oops\n");
    let m = result.execution_metadata.ok_or("no execution metadata")?;
    assert!(m.worker.starts_with("casfs-serve@"));
    for (name, t) in [
        ("queued", &m.queued_timestamp),
        ("worker start", &m.worker_start_timestamp),
        ("input fetch start", &m.input_fetch_start_timestamp),
        ("input fetch completed", &m.input_fetch_completed_timestamp),
        ("execution start", &m.execution_start_timestamp),
        ("execution completed", &m.execution_completed_timestamp),
        ("upload start", &m.output_upload_start_timestamp),
        ("upload completed", &m.output_upload_completed_timestamp),
        ("worker completed", &m.worker_completed_timestamp),
    ] {
        assert!(t.is_some(), "{name} timestamp missing");
    }
    assert_eq!(response(waited.last().ok_or("wait stream empty")?)?.result.map(|r| r.exit_code), Some(0));

    // A finished operation can still be waited on: one message, done.
    let mut w = r.exec().wait_execution(reapi::WaitExecutionRequest { name: ops[0].name.clone() }).await?.into_inner();
    let op = w.message().await?.ok_or("no operation")?;
    assert!(op.done && w.message().await?.is_none());
    // Unknown operations are NOT_FOUND.
    let req = reapi::WaitExecutionRequest { name: "operations/no-such-thing".into() };
    let err = match r.exec().wait_execution(req).await {
        Ok(mut s) => s.get_mut().message().await.err().ok_or("unknown operation was found")?,
        Err(e) => e,
    };
    assert_eq!(err.code(), tonic::Code::NotFound);

    // The second run is a cache hit; skip_cache_lookup runs it again.
    let again = r.execute_all(action, false).await?;
    let resp = last_response(&again)?;
    assert!(resp.cached_result, "second execution should be served from the action cache");
    let fresh = last_response(&r.execute_all(action, true).await?)?;
    assert!(!fresh.cached_result);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_actions_in_flight_share_an_operation_unless_do_not_cache() -> TestResult {
    let r = rig(&[])?;
    for (do_not_cache, shared) in [(false, true), (true, false)] {
        let act = Act { argv: &["sh", "-c", "sleep 1.5; date +%s%N"], do_not_cache, ..Default::default() };
        let action = r.action(&act).await?;
        let (a, b) = tokio::join!(r.execute_all(action, false), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            r.execute_all(action, false).await
        });
        let (a, b) = (a?, b?);
        assert_eq!(a[0].name == b[0].name, shared, "do_not_cache={do_not_cache}");
        let (ra, rb) = (last_response(&a)?.result.ok_or("a")?, last_response(&b)?.result.ok_or("b")?);
        assert_eq!(ra.stdout_digest == rb.stdout_digest, shared, "one run or two");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_reported_in_the_response_and_never_cached() -> TestResult {
    let r = rig(&["--max-timeout", "10s"])?;
    // Missing input root: FAILED_PRECONDITION with a MISSING violation naming the blob.
    let ghost = Digest::of_bytes(b"a directory nobody uploaded");
    let command = reapi::Command { arguments: vec!["/bin/true".into()], ..Default::default() };
    let cb = command.encode_to_vec();
    let cd = Digest::of_bytes(&cb);
    r.client.write(&cd, cb.into()).await?;
    let action = reapi::Action {
        command_digest: Some(cd.to_proto()),
        input_root_digest: Some(ghost.to_proto()),
        ..Default::default()
    };
    let ab = action.encode_to_vec();
    let ad = Digest::of_bytes(&ab);
    r.client.write(&ad, ab.into()).await?;
    let resp = last_response(&r.execute_all(ad, false).await?)?;
    let st = resp.status.ok_or("no status")?;
    assert_eq!(st.code, tonic::Code::FailedPrecondition as i32, "{}", st.message);
    let pf = st.details.iter().find(|d| d.type_url.ends_with("google.rpc.PreconditionFailure")).ok_or("no details")?;
    let pf = casfs::proto::rpc::PreconditionFailure::decode(pf.value.as_slice())?;
    assert_eq!(pf.violations[0].r#type, "MISSING");
    assert_eq!(pf.violations[0].subject, format!("blobs/{}/{}", ghost.hash_hex(), ghost.size()));

    // A missing Action is reported the same way.
    let nowhere = Digest::of_bytes(b"no such action");
    let st = last_response(&r.execute_all(nowhere, false).await?)?.status.ok_or("no status")?;
    assert_eq!(st.code, tonic::Code::FailedPrecondition as i32);

    // A timeout above the maximum: INVALID_ARGUMENT.
    let act = Act { argv: &["true"], timeout: Some(Duration::from_secs(60)), ..Default::default() };
    let st = last_response(&r.execute_all(r.action(&act).await?, false).await?)?.status.ok_or("no status")?;
    assert_eq!(st.code, tonic::Code::InvalidArgument as i32, "{}", st.message);

    // A malformed digest is refused before any operation exists.
    let req = reapi::ExecuteRequest {
        action_digest: Some(reapi::Digest { hash: "xyz".into(), size_bytes: 3 }),
        ..Default::default()
    };
    assert_eq!(r.exec().execute(req).await.err().ok_or("accepted")?.code(), tonic::Code::InvalidArgument);

    // Timed out: DEADLINE_EXCEEDED with stdout attached; a non-zero exit is not cached.
    let act = Act {
        argv: &["sh", "-c", "echo started; sleep 100"],
        timeout: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    let resp = last_response(&r.execute_all(r.action(&act).await?, false).await?)?;
    assert_eq!(resp.status.as_ref().map(|s| s.code), Some(tonic::Code::DeadlineExceeded as i32));
    assert_eq!(r.read(&resp.result.ok_or("no result")?.stdout_digest).await?, "started\n");
    let act = Act { argv: &["sh", "-c", "exit 3"], ..Default::default() };
    let failing = r.action(&act).await?;
    for _ in 0..2 {
        let resp = last_response(&r.execute_all(failing, false).await?)?;
        assert_eq!(resp.result.map(|x| x.exit_code), Some(3));
        assert!(!resp.cached_result, "a failing action must not be cached");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_result_whose_outputs_were_evicted_runs_again() -> TestResult {
    let r = rig(&[])?;
    let act = Act { argv: &["sh", "-c", "date +%s%N > out.txt"], output_files: &["out.txt"], ..Default::default() };
    let action = r.action(&act).await?;
    let first = last_response(&r.execute_all(action, false).await?)?.result.ok_or("no result")?;
    let out = Digest::try_from(first.output_files[0].digest.as_ref().ok_or("no digest")?)?;
    assert!(last_response(&r.execute_all(action, false).await?)?.cached_result);
    // Evict the output blob while the server is down (it indexes its storage at start).
    let mut r = r;
    r.server.kill();
    let h = out.hash_hex();
    std::fs::remove_file(r.tmp.path().join("storage/cas").join(&h[..2]).join(&h))?;
    r.server = ServeProcess::start(&r.tmp.path().join("storage"))?;
    r.client = Arc::new(GrpcStore::new(&RemoteConfig::new(&r.server.url))?);
    let again = last_response(&r.execute_all(action, false).await?)?;
    assert!(!again.cached_result, "a result pointing at a missing blob must not be served");
    assert_ne!(again.result.ok_or("no result")?.output_files[0].digest, first.output_files[0].digest);
    Ok(())
}

fn seconds(t: &Option<prost_types::Timestamp>) -> f64 {
    t.as_ref().map(|t| t.seconds as f64 + t.nanos as f64 / 1e9).unwrap_or(0.0)
}

fn rss_peak_kib(pid: u32) -> TestResult<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).ok_or("no VmHWM")?;
    Ok(line.split_whitespace().nth(1).ok_or("VmHWM")?.parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_actions_on_four_slots_all_complete() -> TestResult {
    let r = rig(&["--max-concurrent-actions", "4"])?;
    let started = SystemTime::now();
    let mut actions = Vec::new();
    for i in 0..64 {
        let script = format!("sleep 0.2; echo {i} > out/n.txt; cat data.txt >> out/n.txt");
        let argv = ["sh", "-c", script.as_str()];
        let act = Act { argv: &argv, output_paths: &["out/n.txt"], ..Default::default() };
        actions.push((i, r.action(&act).await?));
    }
    let r = Arc::new(r);
    // Mounts under the storage while they run: bounded by the slots however fast actions
    // come and go (an action's mounts are gone before its slot is free).
    let storage = r.tmp.path().join("storage").to_string_lossy().into_owned();
    let (done, mut stop) = tokio::sync::watch::channel(false);
    let sampler = tokio::spawn(async move {
        let mut most = 0;
        while !*stop.borrow() {
            let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
            most = most.max(mounts.lines().filter(|l| l.contains(&storage)).count());
            let _ = tokio::time::timeout(std::time::Duration::from_millis(20), stop.changed()).await;
        }
        most
    });
    let runs = actions.into_iter().map(|(i, a)| {
        let r = r.clone();
        async move { (i, r.execute_all(a, false).await) }
    });
    let results = futures::future::join_all(runs).await;
    let _ = done.send(true);
    let most_mounts = sampler.await?;
    // Two mounts an action (input root and writable layer), 4 actions at once.
    assert!(most_mounts <= 2 * 4, "{most_mounts} mounts at once under the storage");
    let mut spans = Vec::new();
    for (i, ops) in results {
        let resp = last_response(&ops?)?;
        assert_eq!(resp.status.as_ref().map(|s| s.code), Some(0), "action {i}");
        let result = resp.result.ok_or("no result")?;
        assert_eq!(result.output_files.len(), 1);
        let stderr = r.read(&result.stderr_digest).await.unwrap_or_default();
        assert_eq!(result.exit_code, 0, "action {i}: stderr {stderr}");
        assert_eq!(r.read(&result.output_files[0].digest).await?, format!("{i}\ninput data\n"));
        let m = result.execution_metadata.ok_or("no metadata")?;
        spans.push((seconds(&m.worker_start_timestamp), seconds(&m.worker_completed_timestamp)));
    }
    // Never more than 4 actions inside the executor at once.
    let most = spans.iter().map(|(s, _)| spans.iter().filter(|(a, b)| a <= s && s < b).count()).max().unwrap_or(0);
    assert!(most <= 4, "{most} actions overlapped with --max-concurrent-actions 4");
    let rss = rss_peak_kib(r.server.child.id())?;
    eprintln!(
        "64 actions in {:?}; peak server RSS {} MiB; max overlap {most}; most mounts {most_mounts}",
        started.elapsed()?,
        rss / 1024
    );
    assert!(rss < 256 * 1024, "server peak RSS {rss} KiB");
    // Nothing left behind: no mounts under the storage, no scratch folders.
    let storage = r.tmp.path().join("storage");
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    assert!(!mounts.contains(storage.to_string_lossy().as_ref()), "mounts left under {}", storage.display());
    let left = scratch_folders(&storage.join("exec"))?;
    assert!(left.is_empty(), "scratch folders left: {left:?}");
    Ok(())
}

fn scratch_folders(dir: &Path) -> TestResult<Vec<String>> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Ok(vec![]) };
    Ok(rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("action-"))
        .collect())
}

/// Whether 127.0.0.1:8980 can be bound right now (bound and let go at once).
fn port_8980_free() -> bool {
    std::net::TcpListener::bind("127.0.0.1:8980").is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remote_apis_testing_contract_holds() -> TestResult {
    // Port 8980 with no flags, instance `remote-execution`, platform OSFamily=linux.
    if !port_8980_free() {
        skip!("127.0.0.1:8980 is taken on this machine (by another test run or server)");
    }
    let tmp = tempfile::tempdir()?;
    let mut child = std::process::Command::new(casfs_bin())
        .args(["serve", "--storage"])
        .arg(tmp.path().join("storage"))
        .stdout(std::process::Stdio::piped())
        .env("CASFS_LOG", "warn")
        .env_remove("CASFS_LISTEN")
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().ok_or("stdout")?), &mut line)?;
    let mut guard = Some(scopeguard(child));
    const SERVING: &str = "casfs: serving on grpc://127.0.0.1:8980";
    if line.trim() != SERVING {
        // Stopped, our server holds nothing: if the port is still taken, someone took it
        // between the probe and the server's bind.
        drop(guard.take());
        if !port_8980_free() {
            skip!("127.0.0.1:8980 was taken while casfs serve started ({line:?})");
        }
    }
    assert_eq!(line.trim(), SERVING, "casfs serve without --listen");
    // Something really answers REAPI there.
    let mut cfg = RemoteConfig::new("grpc://127.0.0.1:8980");
    cfg.instance_name = "remote-execution".into();
    let client = GrpcStore::new(&cfg)?;
    let caps = reapi::capabilities_client::CapabilitiesClient::new(client.conn())
        .get_capabilities(reapi::GetCapabilitiesRequest { instance_name: "remote-execution".into() })
        .await?
        .into_inner();
    assert!(caps.execution_capabilities.as_ref().is_some_and(|e| e.exec_enabled), "{caps:?}");
    std::fs::create_dir_all(tmp.path().join("in"))?;
    std::fs::write(tmp.path().join("in/data.txt"), "contract\n")?;
    let act = Act { argv: &["cat", "data.txt"], ..Default::default() };
    let action = upload_action(&client, &tmp.path().join("in"), &act).await?;
    let resp = casfs::cas::execution::execute(&client, action, false, |_, _| {}).await?;
    assert_eq!(resp.status.map(|s| s.code), Some(0));
    let stdout = resp.result.ok_or("no result")?.stdout_digest.ok_or("no stdout")?;
    assert_eq!(&client.read(&Digest::try_from(&stdout)?).await?[..], b"contract\n");
    drop(guard);
    Ok(())
}

/// Kills a child process when dropped.
fn scopeguard(child: std::process::Child) -> impl Drop {
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    Kill(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_command_without_path_is_found_and_its_environment_stays_empty() -> TestResult {
    // What Pants sends first: `env -0` with no environment at all.
    let r = rig(&[])?;
    let command = reapi::Command { arguments: vec!["env".into(), "-0".into()], ..Default::default() };
    let cb = command.encode_to_vec();
    let cd = Digest::of_bytes(&cb);
    r.client.write(&cd, cb.into()).await?;
    let empty = casfs::tree::Directory::default().encode().0;
    let action = reapi::Action {
        command_digest: Some(cd.to_proto()),
        input_root_digest: Some(empty.to_proto()),
        ..Default::default()
    };
    let ab = action.encode_to_vec();
    let ad = Digest::of_bytes(&ab);
    r.client.write(&ad, ab.into()).await?;
    let resp = last_response(&r.execute_all(ad, false).await?)?;
    assert_eq!(resp.status.as_ref().map(|s| s.code), Some(0), "{:?}", resp.status);
    let result = resp.result.ok_or("no result")?;
    assert_eq!(result.exit_code, 0);
    assert_eq!(r.read(&result.stdout_digest).await?, "", "nothing inherited");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_nobody_waits_for_is_cancelled_and_its_processes_killed() -> TestResult {
    let r = rig(&["--abandon-after", "1s"])?;
    let act = Act { argv: &["sh", "-c", "sleep 31.25"], ..Default::default() };
    let action = r.action(&act).await?;
    let req = reapi::ExecuteRequest { action_digest: Some(action.to_proto()), ..Default::default() };
    let running = || -> TestResult<bool> {
        let out = std::process::Command::new("pgrep").args(["-f", "sleep 31.25"]).output()?;
        Ok(!out.stdout.is_empty())
    };
    let mut s = r.exec().execute(req).await?.into_inner();
    let name = s.message().await?.ok_or("no operation")?.name;
    for _ in 0..100 {
        if running()? {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(running()?, "the action should be running");
    drop(s); // The client goes away.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!running()?, "an abandoned action kept running");
    let mut w = r.exec().wait_execution(reapi::WaitExecutionRequest { name }).await?.into_inner();
    let op = w.message().await?.ok_or("no operation")?;
    let st = response(&op)?.status.ok_or("no status")?;
    assert_eq!(st.code, tonic::Code::Cancelled as i32, "{}", st.message);
    Ok(())
}
