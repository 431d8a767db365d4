//! `casfs worker` against a scripted Bots service: lease reporting through failures,
//! cancellation, session loss, infrastructure failures as statuses, SIGTERM drain/abandon.
//! (scripts/interop-farm runs the same worker under a real BuildGrid.)

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use prost::Message;
use tonic::{Request, Response, Status};

use casfs::cas::{Cas, GrpcStore, RemoteConfig};
use casfs::digest::Digest;
use casfs::proto::google::devtools::remoteworkers::v1test2::bots_server::{Bots, BotsServer};
use casfs::proto::google::devtools::remoteworkers::v1test2::{
    BotSession, BotStatus, CreateBotSessionRequest, Lease, LeaseState, UpdateBotSessionRequest,
};
use casfs::proto::reapi;

use crate::common::*;

const ACTION_URL: &str = "type.googleapis.com/build.bazel.remote.execution.v2.Action";

/// What the scripted scheduler has seen and will do.
#[derive(Default)]
struct State {
    sessions: u32,
    session: String,
    queue: VecDeque<Lease>,
    /// Leases handed out and not yet completed or taken away (BuildGrid's view).
    held: BTreeMap<String, Lease>,
    /// Completed leases accepted, in order.
    completed: Vec<Lease>,
    /// Completed leases for ids not held (a second report of the same result).
    stray_completions: u32,
    /// Calls that carried a completed lease, failed ones included.
    completion_calls: u32,
    /// Fail the first call carrying a completed lease with UNAVAILABLE.
    fail_first_completion: bool,
    /// Codes to fail the next calls with.
    fail_next: VecDeque<tonic::Code>,
    /// Leases to take away (left out of the next answer).
    cancel: BTreeSet<String>,
    /// Every lease id reported ACTIVE so far.
    seen_active: BTreeSet<String>,
    /// Bot status of every update.
    statuses: Vec<i32>,
    /// Hold calls that hand out nothing this long (BuildGrid's long poll during execution).
    hold: Option<Duration>,
    /// When each lease was handed out and when its completion was accepted.
    handed_at: BTreeMap<String, Instant>,
    done_at: BTreeMap<String, Instant>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<State>>);

impl Fake {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn answer(session: &BotSession, name: &str, leases: Vec<Lease>) -> BotSession {
        BotSession {
            name: name.to_string(),
            leases,
            expire_time: Some(prost_types::Timestamp::from(SystemTime::now() + Duration::from_secs(10))),
            version: "1".into(),
            ..session.clone()
        }
    }
}

#[tonic::async_trait]
impl Bots for Fake {
    async fn create_bot_session(&self, req: Request<CreateBotSessionRequest>) -> Result<Response<BotSession>, Status> {
        let s = req.into_inner().bot_session.ok_or_else(|| Status::invalid_argument("no session"))?;
        if s.bot_id.is_empty() {
            return Err(Status::invalid_argument("no bot id"));
        }
        let name = self.with(|st| {
            st.sessions += 1;
            st.session = format!("fake/{}", st.sessions);
            st.held.clear();
            st.session.clone()
        });
        Ok(Response::new(Fake::answer(&s, &name, vec![])))
    }

    async fn update_bot_session(&self, req: Request<UpdateBotSessionRequest>) -> Result<Response<BotSession>, Status> {
        let req = req.into_inner();
        let s = req.bot_session.ok_or_else(|| Status::invalid_argument("no session"))?;
        let capacity: usize = s
            .worker
            .as_ref()
            .and_then(|w| w.configs.iter().find(|c| c.key == "capacity"))
            .and_then(|c| c.value.parse().ok())
            .unwrap_or(1);
        let answer = self.with(|st| -> Result<(Vec<Lease>, String, Option<Duration>), Status> {
            let mut handed = false;
            st.statuses.push(s.status);
            if s.leases.iter().any(|l| l.state == LeaseState::Completed as i32) {
                st.completion_calls += 1;
                if std::mem::take(&mut st.fail_first_completion) {
                    return Err(Status::unavailable("injected: the answer to a report is lost"));
                }
            }
            if let Some(code) = st.fail_next.pop_front() {
                return Err(Status::new(code, "injected"));
            }
            if req.name != st.session {
                return Err(Status::data_loss("no such session"));
            }
            let mut answer = Vec::new();
            for l in &s.leases {
                if l.state == LeaseState::Completed as i32 {
                    if st.held.remove(&l.id).is_some() {
                        st.done_at.insert(l.id.clone(), Instant::now());
                        st.completed.push(l.clone());
                    } else {
                        st.stray_completions += 1;
                    }
                } else if l.state == LeaseState::Active as i32 {
                    st.seen_active.insert(l.id.clone());
                    if st.held.contains_key(&l.id) && !st.cancel.contains(&l.id) {
                        answer.push(l.clone());
                    } else {
                        st.held.remove(&l.id);
                    }
                }
            }
            // Like BuildGrid, hand out again what the bot holds but did not mention (the
            // answer that carried it was lost).
            for (id, l) in &st.held {
                if !s.leases.iter().any(|x| &x.id == id) && !st.cancel.contains(id) {
                    answer.push(l.clone());
                }
            }
            while s.status == BotStatus::Ok as i32 && st.held.len() < capacity {
                let Some(l) = st.queue.pop_front() else { break };
                st.held.insert(l.id.clone(), l.clone());
                st.handed_at.insert(l.id.clone(), Instant::now());
                handed = true;
                answer.push(l);
            }
            let hold = if handed { None } else { st.hold };
            Ok((answer, st.session.clone(), hold))
        })?;
        let (leases, name, hold) = answer;
        if let Some(h) = hold {
            tokio::time::sleep(h).await;
        } else if leases.is_empty() {
            // A short long poll.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Response::new(Fake::answer(&s, &name, leases)))
    }
}

/// Serves the fake on 127.0.0.1:0; returns its URL.
async fn serve_fake(fake: Fake) -> TestResult<String> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("grpc://{}", l.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(BotsServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    Ok(url)
}

/// A `casfs worker` child process; SIGKILLed on drop.
struct WorkerProc {
    child: Child,
    metrics: u16,
}

impl WorkerProc {
    fn start(dir: &Path, scheduler: &str, cas: &str, extra: &[&str]) -> TestResult<Self> {
        let metrics = free_port()?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("worker.log"))?;
        let child = Command::new(casfs_bin())
            .args(["worker", "--scheduler", scheduler, "--cas", cas, "--bot-id", "test-bot", "--work-dir"])
            .arg(dir.join("work"))
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics}"), "--long-poll", "5s"])
            .args(extra)
            .env("CASFS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(WorkerProc { child, metrics })
    }

    fn metric(&self, name: &str) -> u64 {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.metrics)) else { return 0 };
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    }

    fn signal(&self, sig: i32) {
        signal(self.child.id() as i32, sig);
    }

    /// Waits up to `secs` for the process to exit; its exit code.
    fn wait_exit(&mut self, secs: u64) -> TestResult<i32> {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("worker still running after {secs}s").into())
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` every 50 ms for up to `secs`.
async fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) -> TestResult {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if cond() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("timed out after {secs}s waiting for {what}").into())
}

/// Uploads an action running `script` with `sh -c` in an input root holding `in.txt`;
/// returns its digest and serialized bytes.
async fn action(cas: &GrpcStore, script: &str, outputs: &[&str]) -> TestResult<(Digest, Bytes)> {
    let input = tempfile::tempdir()?;
    std::fs::write(input.path().join("in.txt"), "input\n")?;
    let root = casfs::transfer::upload_dir(cas, input.path(), false).await?.root;
    let command = reapi::Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        output_paths: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let cb = command.encode_to_vec();
    let cd = Digest::of_bytes(&cb);
    cas.write(&cd, cb.into()).await?;
    let a = reapi::Action {
        command_digest: Some(cd.to_proto()),
        input_root_digest: Some(root.to_proto()),
        ..Default::default()
    };
    let ab = Bytes::from(a.encode_to_vec());
    let ad = Digest::of_bytes(&ab);
    cas.write(&ad, ab.clone()).await?;
    Ok((ad, ab))
}

fn lease(id: &str, action: &Bytes) -> Lease {
    Lease {
        id: id.into(),
        state: LeaseState::Active as i32,
        payload: Some(prost_types::Any { type_url: ACTION_URL.into(), value: action.to_vec() }),
        ..Default::default()
    }
}

fn result_of(l: &Lease) -> TestResult<reapi::ActionResult> {
    let any = l.result.as_ref().ok_or("completed lease without a result")?;
    Ok(reapi::ActionResult::decode(any.value.as_slice())?)
}

fn code_of(l: &Lease) -> i32 {
    l.status.as_ref().map(|s| s.code).unwrap_or(-1)
}

struct Rig {
    tmp: tempfile::TempDir,
    _cas: InProcessServer,
    cas_url: String,
    client: GrpcStore,
    fake: Fake,
    url: String,
}

async fn rig() -> TestResult<Rig> {
    let tmp = tempfile::tempdir()?;
    let (_, backend) = memory_backend();
    let cas = serve_in_process(backend).await?;
    let client = GrpcStore::new(&RemoteConfig::new(&cas.url))?;
    let fake = Fake::default();
    let url = serve_fake(fake.clone()).await?;
    Ok(Rig { tmp, cas_url: cas.url.clone(), _cas: cas, client, fake, url })
}

fn mounts_under(dir: &Path) -> usize {
    let d = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mounts").unwrap_or_default().lines().filter(|l| l.contains(&d)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_is_reported_once_through_a_lost_answer() -> TestResult {
    require_fuse!();
    let r = rig().await?;
    let (_, a) = action(&r.client, "tr a-z A-Z < in.txt > out.txt; echo ran", &["out.txt"]).await?;
    r.fake.with(|s| {
        s.fail_first_completion = true;
        s.queue.push_back(lease("i/one", &a));
    });
    let w = WorkerProc::start(r.tmp.path(), &r.url, &r.cas_url, &[])?;
    wait_until(60, "the completed lease", || r.fake.with(|s| !s.completed.is_empty())).await?;
    // A few more heartbeats: the result must not come again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (completed, stray, calls, sessions) =
        r.fake.with(|s| (s.completed.clone(), s.stray_completions, s.completion_calls, s.sessions));
    assert_eq!(completed.len(), 1, "one completion");
    assert_eq!(stray, 0, "no second report of the same result");
    assert_eq!(calls, 2, "the report whose answer was lost was sent once more");
    assert_eq!(sessions, 1, "a transient failure keeps the session");
    let l = &completed[0];
    assert_eq!(code_of(l), 0);
    let res = result_of(l)?;
    assert_eq!(res.exit_code, 0);
    assert_eq!(res.execution_metadata.as_ref().map(|m| m.worker.as_str()), Some("test-bot"));
    let out = res.output_files.iter().find(|f| f.path == "out.txt").ok_or("no out.txt")?;
    let bytes = r.client.read(&Digest::try_from(out.digest.as_ref().ok_or("no digest")?)?).await?;
    assert_eq!(&bytes[..], b"INPUT\n");
    assert_eq!(w.metric("casfs_worker_leases_completed_total"), 1);
    assert_eq!(w.metric("casfs_worker_update_errors_total"), 1);
    assert_eq!(w.metric("casfs_exec_cache_hits_total"), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_leases_are_stopped_and_a_lost_session_is_replaced() -> TestResult {
    require_fuse!();
    let r = rig().await?;
    let (_, slow) = action(&r.client, "echo started; sleep 61.75", &[]).await?;
    let (_, quick) = action(&r.client, "cat in.txt", &[]).await?;
    r.fake.with(|s| s.queue.push_back(lease("i/slow", &slow)));
    let w = WorkerProc::start(r.tmp.path(), &r.url, &r.cas_url, &[])?;
    wait_until(60, "the slow lease to run", || r.fake.with(|s| s.seen_active.contains("i/slow"))).await?;
    let work = r.tmp.path().join("work");
    assert!(mounts_under(&work) >= 2, "the action's FUSE mount and overlay are up");
    r.fake.with(|s| s.cancel.insert("i/slow".into()));
    wait_until(30, "the cancellation", || w.metric("casfs_worker_leases_cancelled_total") == 1).await?;
    wait_until(10, "the action's mounts to go", || mounts_under(&work) == 0).await?;
    // Stopped, not left to finish: its process is gone.
    let sleepers = std::process::Command::new("pgrep").args(["-f", "sleep 61.75"]).output()?;
    assert!(sleepers.stdout.is_empty(), "the cancelled action's process survived");
    assert_eq!(w.metric("casfs_worker_leases_running"), 0);

    // The session is lost: the worker opens a new one and works on.
    r.fake.with(|s| {
        s.fail_next.push_back(tonic::Code::DataLoss);
        s.queue.push_back(lease("i/quick", &quick));
    });
    wait_until(60, "the quick lease", || r.fake.with(|s| s.completed.iter().any(|l| l.id == "i/quick"))).await?;
    let (sessions, completed) = r.fake.with(|s| (s.sessions, s.completed.clone()));
    assert_eq!(sessions, 2, "a new session after DATA_LOSS");
    assert!(completed.iter().all(|l| l.id != "i/slow"), "no result for the cancelled lease");
    assert_eq!(w.metric("casfs_worker_sessions_lost_total"), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infrastructure_failures_are_lease_statuses_not_exit_codes() -> TestResult {
    require_fuse!();
    let r = rig().await?;
    let missing =
        reapi::Action { command_digest: Some(Digest::of_bytes(b"no such command").to_proto()), ..Default::default() }
            .encode_to_vec();
    let missing_action = Digest::of_bytes(b"an action nobody uploaded");
    r.fake.with(|s| {
        // The Action's Command is not in the CAS.
        s.queue.push_back(lease("i/missing", &Bytes::from(missing)));
        // The payload is not an Action at all.
        let mut bad = lease("i/bad", &Bytes::from_static(b"\xff\xff"));
        if let Some(p) = bad.payload.as_mut() {
            p.type_url = "type.googleapis.com/google.protobuf.Empty".into();
        }
        s.queue.push_back(bad);
        // A bare Action digest (older schedulers) that is not in the CAS.
        s.queue.push_back(Lease {
            id: "i/digest".into(),
            state: LeaseState::Active as i32,
            payload: Some(prost_types::Any {
                type_url: "type.googleapis.com/build.bazel.remote.execution.v2.Digest".into(),
                value: missing_action.to_proto().encode_to_vec(),
            }),
            ..Default::default()
        });
    });
    let w = WorkerProc::start(r.tmp.path(), &r.url, &r.cas_url, &[])?;
    wait_until(60, "three completions", || r.fake.with(|s| s.completed.len() == 3)).await?;
    let completed = r.fake.with(|s| s.completed.clone());
    let by_id = |id: &str| completed.iter().find(|l| l.id == id).cloned().ok_or(format!("no {id}"));
    let m = by_id("i/missing")?;
    assert_eq!(code_of(&m), tonic::Code::FailedPrecondition as i32);
    let details = &m.status.as_ref().ok_or("status")?.details;
    let pf = casfs::proto::rpc::PreconditionFailure::decode(details.first().ok_or("no details")?.value.as_slice())?;
    assert_eq!(pf.violations[0].r#type, "MISSING");
    assert!(pf.violations[0].subject.starts_with("blobs/"), "{:?}", pf.violations);
    assert!(m.result.is_none(), "no ActionResult, so no exit code");
    assert_eq!(code_of(&by_id("i/bad")?), tonic::Code::InvalidArgument as i32);
    assert_eq!(code_of(&by_id("i/digest")?), tonic::Code::FailedPrecondition as i32);
    assert_eq!(w.metric("casfs_worker_leases_refused_total"), 1);
    drop(w);

    // A CAS nobody listens on: UNAVAILABLE, which BuildGrid retries on another bot.
    let dead = format!("grpc://127.0.0.1:{}", free_port()?);
    let (_, a) = action(&r.client, "true", &[]).await?;
    r.fake.with(|s| s.queue.push_back(lease("i/dead-cas", &a)));
    let dir = r.tmp.path().join("dead");
    std::fs::create_dir(&dir)?;
    let _w = WorkerProc::start(&dir, &r.url, &dead, &["--retries", "1", "--rpc-timeout", "2s"])?;
    wait_until(60, "the dead-CAS completion", || r.fake.with(|s| s.completed.iter().any(|l| l.id == "i/dead-cas")))
        .await?;
    let l = r.fake.with(|s| s.completed.iter().find(|l| l.id == "i/dead-cas").cloned()).ok_or("lease")?;
    assert_eq!(code_of(&l), tonic::Code::Unavailable as i32, "{:?}", l.status);
    assert!(l.result.is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_a_second_signal_abandons() -> TestResult {
    require_fuse!();
    let r = rig().await?;
    let (_, short) = action(&r.client, "sleep 2; echo finished", &[]).await?;
    r.fake.with(|s| s.queue.push_back(lease("i/short", &short)));
    let mut w = WorkerProc::start(r.tmp.path(), &r.url, &r.cas_url, &[])?;
    wait_until(60, "the short lease to run", || w.metric("casfs_worker_leases_running") == 1).await?;
    w.signal(libc::SIGTERM);
    // Work that arrives while draining is not taken.
    let (_, other) = action(&r.client, "true", &[]).await?;
    r.fake.with(|s| s.queue.push_back(lease("i/late", &other)));
    assert_eq!(w.wait_exit(30)?, 0);
    let (completed, statuses) = r.fake.with(|s| (s.completed.clone(), s.statuses.clone()));
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0].id, "i/short");
    assert_eq!(code_of(&completed[0]), 0, "finished, not abandoned");
    assert_eq!(statuses.last(), Some(&(BotStatus::BotTerminating as i32)), "told the scheduler it is going");
    drop(w);

    // Second signal: the running action is stopped and its lease handed back.
    let dir = r.tmp.path().join("second");
    std::fs::create_dir(&dir)?;
    let (_, slow) = action(&r.client, "sleep 60", &[]).await?;
    r.fake.with(|s| {
        s.queue.clear();
        s.queue.push_back(lease("i/slow", &slow));
    });
    let mut w = WorkerProc::start(&dir, &r.url, &r.cas_url, &[])?;
    wait_until(60, "the slow lease to run", || w.metric("casfs_worker_leases_running") == 1).await?;
    w.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.signal(libc::SIGTERM);
    assert_eq!(w.wait_exit(30)?, 0);
    let l = r.fake.with(|s| s.completed.iter().find(|l| l.id == "i/slow").cloned()).ok_or("not handed back")?;
    assert_eq!(code_of(&l), tonic::Code::Unavailable as i32, "UNAVAILABLE: the scheduler re-queues it");
    assert_eq!(mounts_under(&dir), 0);
    Ok(())
}

/// Pids whose command line is exactly `argv`.
fn processes(argv: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain(std::iter::once(0))).collect();
    let Ok(rd) = std::fs::read_dir("/proc") else { return vec![] };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_leaves_nothing_once_restarted() -> TestResult {
    require_fuse!();
    let r = rig().await?;
    // A duration no other test uses, to find this action's process.
    let (_, slow) = action(&r.client, "exec sleep 613", &[]).await?;
    r.fake.with(|s| s.queue.push_back(lease("i/orphan", &slow)));
    let mut w = WorkerProc::start(r.tmp.path(), &r.url, &r.cas_url, &[])?;
    wait_until(60, "the action to start", || !processes(&["sleep", "613"]).is_empty()).await?;
    w.signal(libc::SIGKILL);
    w.wait_exit(10)?;
    let work = r.tmp.path().join("work");
    let orphans = processes(&["sleep", "613"]);
    let scratch =
        std::fs::read_dir(&work)?.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("action-"));
    assert_eq!(scratch.count(), 1, "the killed worker's scratch folder is left");
    assert!(mounts_under(&work) >= 1, "and its mounts");
    assert_eq!(orphans.len(), 1, "and its action's process");

    let w2 = WorkerProc::start(r.tmp.path(), &r.url, &r.cas_url, &[])?;
    wait_until(30, "the new session", || r.fake.with(|s| s.sessions == 2)).await?;
    wait_until(10, "the orphan to be killed", || processes(&["sleep", "613"]).is_empty()).await?;
    assert_eq!(mounts_under(&work), 0, "stale mounts cleared");
    let left: Vec<_> = std::fs::read_dir(&work)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("action-"))
        .collect();
    assert!(left.is_empty(), "stale scratch folders cleared: {left:?}");
    wait_until(10, "the restarted worker to attach", || w2.metric("casfs_worker_connected") == 1).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_runs_that_many_leases_at_once() -> TestResult {
    require_fuse!();
    let r = rig().await?;
    let (_, a) = action(&r.client, "sleep 3; cat in.txt", &[]).await?;
    r.fake.with(|s| {
        for i in 0..4 {
            s.queue.push_back(lease(&format!("i/{i}"), &a));
        }
    });
    let w = WorkerProc::start(r.tmp.path(), &r.url, &r.cas_url, &["--concurrency", "3"])?;
    wait_until(60, "three leases running", || w.metric("casfs_worker_leases_running") == 3).await?;
    assert_eq!(r.fake.with(|s| s.held.len()), 3, "the capacity sent is 3");
    wait_until(60, "all four completed", || r.fake.with(|s| s.completed.len() == 4)).await?;
    let completed = r.fake.with(|s| s.completed.clone());
    for l in &completed {
        assert_eq!(code_of(l), 0);
        assert_eq!(result_of(l)?.exit_code, 0);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_is_reported_at_once_even_while_the_scheduler_holds_the_call() -> TestResult {
    require_fuse!();
    let r = rig().await?;
    let (_, a) = action(&r.client, "sleep 1", &[]).await?;
    r.fake.with(|s| {
        s.hold = Some(Duration::from_secs(8));
        s.queue.push_back(lease("i/held", &a));
    });
    let _w = WorkerProc::start(r.tmp.path(), &r.url, &r.cas_url, &["--concurrency", "2"])?;
    wait_until(60, "the completion", || r.fake.with(|s| s.done_at.contains_key("i/held"))).await?;
    let took = r.fake.with(|s| s.done_at["i/held"] - s.handed_at["i/held"]);
    // 1 s of command, a moment to finish the call in flight, not the 8 s hold.
    assert!(took < Duration::from_secs(4), "reported {took:?} after it was handed out");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_runs_against_a_named_instance_of_casfs_serve() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let args = ["--no-execution", "--instance", "main", "--instance", "other"];
    let server = ServeProcess::start_with(&tmp.path().join("storage"), "127.0.0.1:0", &args)?;
    let mut cfg = RemoteConfig::new(&server.url);
    cfg.instance_name = "main".into();
    let client = GrpcStore::new(&cfg)?;
    let fake = Fake::default();
    let url = serve_fake(fake.clone()).await?;
    let (_, a) = action(&client, "tr a-z A-Z < in.txt > out.txt", &["out.txt"]).await?;
    fake.with(|s| s.queue.push_back(lease("main/one", &a)));
    let _w = WorkerProc::start(tmp.path(), &url, &server.url, &["--instance-name", "main"])?;
    wait_until(60, "the completed lease", || fake.with(|s| !s.completed.is_empty())).await?;
    let l = fake.with(|s| s.completed[0].clone());
    assert_eq!(code_of(&l), 0, "{:?}", l.status);
    let res = result_of(&l)?;
    let out = res.output_files.iter().find(|f| f.path == "out.txt").ok_or("no out.txt")?;
    let out = Digest::try_from(out.digest.as_ref().ok_or("no digest")?)?;
    assert_eq!(&client.read(&out).await?[..], b"INPUT\n", "the output went to instance main");
    let mut other = RemoteConfig::new(&server.url);
    other.instance_name = "other".into();
    assert_eq!(GrpcStore::new(&other)?.find_missing(&[out]).await?, vec![out], "and not to other");
    Ok(())
}
