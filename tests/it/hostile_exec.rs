//! Hostile clients of the action cache and Execution service, and what a client is told
//! when TLS is set up wrong: forged results refused, oversized actions refused unread,
//! a large stdout streamed through `casfs execute` in bounded memory.

use std::io::Read;
use std::process::{Command, Stdio};

use bytes::Bytes;
use prost::Message;

use casfs::cas::{ActionCache, Cas, GrpcStore, RemoteConfig};
use casfs::digest::Digest;
use casfs::proto::longrunning::operation;
use casfs::proto::reapi::{self, action_cache_client::ActionCacheClient, execution_client::ExecutionClient};

use crate::common::*;
use crate::exec::{upload_action, Act};
use crate::hostile_clients::peak_rss_mib;

fn act<'a>(argv: &'a [&'a str]) -> Act<'a> {
    Act { argv, ..Default::default() }
}

/// Runs `action` with Execute and returns its final ExecuteResponse.
async fn execute(client: &GrpcStore, action: Digest) -> TestResult<reapi::ExecuteResponse> {
    let req = reapi::ExecuteRequest { action_digest: Some(action.to_proto()), ..Default::default() };
    let mut s = ExecutionClient::new(client.conn()).execute(req).await?.into_inner();
    while let Some(op) = s.message().await? {
        if op.done {
            return match op.result {
                Some(operation::Result::Response(any)) => Ok(reapi::ExecuteResponse::decode(any.value.as_slice())?),
                other => Err(format!("unexpected result {other:?}").into()),
            };
        }
    }
    Err("the operation never completed".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ac_writes_none_forged_results_are_refused_and_execute_still_caches() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start_with(&tmp.path().join("storage"), "127.0.0.1:0", &["--ac-writes", "none"])?;
    let client = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    std::fs::create_dir_all(tmp.path().join("in"))?;
    let action = upload_action(&client, &tmp.path().join("in"), &act(&["echo", "genuine"])).await?;

    // The forged result: exit 0, stdout "forged", for an action others will run.
    let forged_out = Bytes::from_static(b"forged\n");
    let fd = Digest::of_bytes(&forged_out);
    client.write(&fd, forged_out).await?;
    let forged = reapi::ActionResult { stdout_digest: Some(fd.to_proto()), ..Default::default() };
    let mut ac = ActionCacheClient::new(client.conn());
    let req = reapi::UpdateActionResultRequest {
        action_digest: Some(action.to_proto()),
        action_result: Some(forged),
        ..Default::default()
    };
    let st = ac.update_action_result(req).await.err().ok_or("a client's action result was accepted")?;
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
    for why in ["--ac-writes", "--remote_upload_local_results=false"] {
        assert!(st.message().contains(why), "the refusal does not mention {why}: {}", st.message());
    }
    let caps = client.capabilities().await?;
    let update = caps.cache_capabilities.and_then(|c| c.action_cache_update_capabilities);
    assert_eq!(update.map(|u| u.update_enabled), Some(false), "Capabilities must not advertise AC updates");
    assert!(client.get_action_result(&action).await?.is_none(), "the forged result is served");

    // The server's own executor still records results, and they are served as cache hits.
    let first = execute(&client, action).await?;
    let result = first.result.ok_or("no result")?;
    let out = client.read(&Digest::try_from(result.stdout_digest.as_ref().ok_or("no stdout")?)?).await?;
    assert_eq!(&out[..], b"genuine\n");
    assert!(!first.cached_result);
    let cached = client.get_action_result(&action).await?.ok_or("Execute did not cache its result")?;
    assert_eq!(cached.stdout_digest, result.stdout_digest);
    assert!(execute(&client, action).await?.cached_result);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_actions_are_refused_unread() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let client = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    // A 48 MiB blob named as the action of 16 concurrent Executes.
    let blob = Bytes::from(pseudo_random(11, 48 << 20));
    let d = Digest::of_bytes(&blob);
    client.write(&d, blob).await?;
    let calls = (0..16).map(|_| {
        let mut ex = ExecutionClient::new(client.conn());
        async move {
            let req = reapi::ExecuteRequest { action_digest: Some(d.to_proto()), ..Default::default() };
            ex.execute(req).await.map(|_| ())
        }
    });
    let results = futures::future::join_all(calls).await;
    let peak = peak_rss_mib(server.child.id())?;
    eprintln!("server peak RSS after 16 Executes of a 48 MiB action: {peak} MiB");
    for r in results {
        let st = r.err().ok_or("a 48 MiB action was accepted")?;
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    }
    assert!(peak < 256, "peak RSS {peak} MiB: the server read what it refused");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_more_actions() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start_with(
        &tmp.path().join("storage"),
        "127.0.0.1:0",
        &["--max-concurrent-actions", "1", "--max-queued-actions", "2"],
    )?;
    let client = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    std::fs::create_dir_all(tmp.path().join("in"))?;
    let mut actions = Vec::new();
    for secs in ["60", "61", "62", "63"] {
        actions.push(upload_action(&client, &tmp.path().join("in"), &act(&["sleep", secs])).await?);
    }
    let start = |d: Digest| {
        let mut ex = ExecutionClient::new(client.conn());
        async move {
            let req = reapi::ExecuteRequest { action_digest: Some(d.to_proto()), ..Default::default() };
            ex.execute(req).await
        }
    };
    // The first runs (its stream says EXECUTING), the next two wait, the fourth is refused.
    let mut running = start(actions[0]).await?.into_inner();
    loop {
        let op = running.message().await?.ok_or("the first action's stream ended")?;
        let any = op.metadata.ok_or("no metadata")?;
        let stage = reapi::ExecuteOperationMetadata::decode(any.value.as_slice())?.stage;
        if stage == reapi::execution_stage::Value::Executing as i32 {
            break;
        }
    }
    let _queued = (start(actions[1]).await?, start(actions[2]).await?);
    let st = start(actions[3]).await.err().ok_or("a third action was queued past --max-queued-actions 2")?;
    assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");
    Ok(())
}

#[test]
fn casfs_execute_streams_a_large_stdout_in_bounded_memory() -> TestResult {
    const SIZE: u64 = 200 << 20;
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    std::fs::create_dir_all(tmp.path().join("in"))?;
    let mut child = Command::new(casfs_bin())
        .args(["execute", "--remote", &server.url, "--input"])
        .arg(tmp.path().join("in"))
        .args(["--", "head", "-c", &SIZE.to_string(), "/dev/zero"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    // The child's own peak, polled from /proc: VmHWM is a high-water mark of its memory
    // after exec. (wait4's ru_maxrss would also count the test process, whose memory the
    // child shared until exec: Rust spawns with vfork.)
    let pid = child.id();
    let watcher = std::thread::spawn(move || {
        let mut peak = 0;
        while let Ok(p) = peak_rss_mib(pid) {
            peak = peak.max(p);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        peak
    });
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (mut count, mut nonzero) = (0u64, 0u64);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = stdout.read(&mut buf)?;
        if n == 0 {
            break;
        }
        count += n as u64;
        nonzero += buf[..n].iter().filter(|b| **b != 0).count() as u64;
    }
    let status = child.wait()?;
    let err = errors.join().map_err(|_| "stderr reader panicked")?;
    assert!(status.success(), "casfs execute: {status:?}\n{err}");
    assert_eq!((count, nonzero), (SIZE, 0), "stdout bytes\n{err}");
    let peak = watcher.join().map_err(|_| "watcher panicked")?;
    eprintln!("casfs execute peak RSS for a {} MiB stdout: {peak} MiB", SIZE >> 20);
    assert!(peak < 64, "casfs execute peaked at {peak} MiB for a {} MiB stdout", SIZE >> 20);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_certificate_as_server_certificate_gets_a_hint() -> TestResult {
    let tmp = tempfile::tempdir()?;
    // What plain `openssl req -x509` makes: a self-signed certificate with CA:TRUE.
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let (cert_path, key_path) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    let (c, k) = (cert_path.to_string_lossy().into_owned(), key_path.to_string_lossy().into_owned());
    let server = ServeProcess::start_with(
        &tmp.path().join("storage"),
        "127.0.0.1:0",
        &["--no-execution", "--tls-cert", &c, "--tls-key", &k],
    )?;
    let url = server.url.replace("127.0.0.1", "localhost");
    let d = Digest::of_bytes(b"anything").to_string();
    let (code, _, err) = casfs(&["cat", "--remote", &url, "--tls-ca-file", &c, "--retries", "0", &d])?;
    assert_ne!(code, 0);
    assert!(err.contains("CaUsedAsEndEntity"), "{err}");
    for hint in ["CA:FALSE", "--tls-ca-file", "openssl req -x509"] {
        assert!(err.contains(hint), "the error does not say {hint:?}:\n{err}");
    }
    // The library error carries the same hint.
    let mut cfg = RemoteConfig::new(&url);
    cfg.tls_ca_file = Some(cert_path);
    cfg.retries = 0;
    let e = GrpcStore::new(&cfg)?.find_missing(&[Digest::of_bytes(b"x")]).await.err().ok_or("TLS accepted")?;
    assert!(e.to_string().contains("CA:FALSE"), "{e}");
    Ok(())
}
