//! Named instances on one endpoint (`casfs serve --instance`) and the split of execution
//! from storage (`casfs serve --cas URL`), over real `casfs serve` processes.

use std::path::Path;

use casfs::cas::{ActionCache, Cas, GrpcStore, RemoteConfig};
use casfs::digest::Digest;
use casfs::proto::bytestream::{byte_stream_client::ByteStreamClient, ReadRequest};
use casfs::proto::reapi::{self, content_addressable_storage_client::ContentAddressableStorageClient};

use crate::common::*;
use crate::exec::{upload_action, Act};
use crate::mount::{http_get, MountProcess};

fn client(url: &str, instance: &str) -> TestResult<GrpcStore> {
    let mut cfg = RemoteConfig::new(url);
    cfg.instance_name = instance.into();
    cfg.retries = 0;
    Ok(GrpcStore::new(&cfg)?)
}

fn a_result(stdout: &Digest) -> reapi::ActionResult {
    reapi::ActionResult { stdout_digest: Some(stdout.to_proto()), ..Default::default() }
}

async fn caps(c: &GrpcStore, instance: &str) -> Result<reapi::ServerCapabilities, tonic::Status> {
    let req = reapi::GetCapabilitiesRequest { instance_name: instance.into() };
    Ok(reapi::capabilities_client::CapabilitiesClient::new(c.conn()).get_capabilities(req).await?.into_inner())
}

async fn find_missing(c: &GrpcStore, instance: &str, d: &Digest) -> Result<Vec<reapi::Digest>, tonic::Status> {
    let req = reapi::FindMissingBlobsRequest {
        instance_name: instance.into(),
        blob_digests: vec![d.to_proto()],
        ..Default::default()
    };
    Ok(ContentAddressableStorageClient::new(c.conn()).find_missing_blobs(req).await?.into_inner().missing_blob_digests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instances_results_and_blobs_are_not_anothers_unless_the_cas_is_shared() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let log_a = tmp.path().join("a.log");
    let log_all = tmp.path().join("all.log");
    let instance_a = format!("a=access-log={}", log_a.display());
    let args = [
        "--no-execution",
        "--access-log",
        &log_all.to_string_lossy(),
        "--instance",
        &instance_a,
        "--instance",
        "b",
        "--instance",
        "c=shared-cas",
        "--instance",
        "team/d=shared-cas",
    ];
    let server = ServeProcess::start_with(&tmp.path().join("storage"), "127.0.0.1:0", &args)?;
    let (a, b, c, d) = (
        client(&server.url, "a")?,
        client(&server.url, "b")?,
        client(&server.url, "c")?,
        client(&server.url, "team/d")?,
    );
    let blob = Digest::of_bytes(b"only in a\n");
    a.write(&blob, "only in a\n".into()).await?;
    let action = Digest::of_bytes(b"an action");
    a.update_action_result(&action, &a_result(&blob)).await?;
    assert!(a.get_action_result(&action).await?.is_some(), "a reads its own result");
    assert_eq!(b.find_missing(&[blob]).await?, vec![blob], "a blob of a is missing in b");
    assert!(b.read(&blob).await.is_err());
    assert!(b.get_action_result(&action).await?.is_none(), "a result written through a is a miss through b");

    // c and team/d share their CAS, not their action caches.
    let shared = Digest::of_bytes(b"shared\n");
    c.write(&shared, "shared\n".into()).await?;
    assert!(d.find_missing(&[shared]).await?.is_empty(), "a blob of c is present in d (shared CAS)");
    assert_eq!(&d.read(&shared).await?[..], b"shared\n");
    assert_eq!(a.find_missing(&[shared]).await?, vec![shared], "a has its own CAS");
    c.update_action_result(&action, &a_result(&shared)).await?;
    assert!(c.get_action_result(&action).await?.is_some());
    assert!(d.get_action_result(&action).await?.is_none(), "d has its own action cache");
    // The access log follows the instance: a's own file, the server's for the others.
    let a_lines = std::fs::read_to_string(&log_a)?;
    assert!(a_lines.contains(&format!("write {blob}")), "{a_lines}");
    assert!(!a_lines.contains(&shared.to_string()), "{a_lines}");
    let other_lines = std::fs::read_to_string(&log_all)?;
    assert!(other_lines.contains(&format!("write {shared}")), "{other_lines}");
    assert!(!other_lines.contains(&format!("write {blob}")), "{other_lines}");
    // Each instance's folder is its own.
    assert!(tmp.path().join("storage/instances/a").is_dir());
    assert!(tmp.path().join("storage/instances/team_d").is_dir());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_hostile_instance_names_are_refused_with_the_known_names() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let args = ["--no-execution", "--instance", "a", "--instance", "b"];
    let server = ServeProcess::start_with(&tmp.path().join("storage"), "127.0.0.1:0", &args)?;
    let a = client(&server.url, "a")?;
    let blob = Digest::of_bytes(b"x");
    a.write(&blob, "x".into()).await?;
    let huge = "n".repeat(1 << 20);
    for name in ["", "typo", "../a", "a/..", "blobs", "a/blobs", huge.as_str()] {
        let st = find_missing(&a, name, &blob).await.expect_err("unknown instance accepted");
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
        assert!(st.message().contains("\"a\", \"b\""), "the known names are listed: {}", st.message());
        assert!(st.message().len() < 1000, "the name is not echoed whole");
        let st = caps(&a, name).await.expect_err("capabilities of an unknown instance");
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    }
    // ByteStream names carry the instance as their prefix.
    let mut bs = ByteStreamClient::new(a.conn());
    for name in [
        format!("typo/blobs/{blob}"),
        format!("../a/blobs/{blob}"),
        format!("{huge}/blobs/{blob}"),
        format!("a/b/blobs/{blob}"),
    ] {
        let req = ReadRequest { resource_name: name.clone(), read_offset: 0, read_limit: 0 };
        let st = match bs.read(req).await {
            Ok(mut s) => s.get_mut().message().await.expect_err("read under an unknown instance"),
            Err(st) => st,
        };
        assert!(matches!(st.code(), tonic::Code::InvalidArgument), "{}: {st:?}", &name[..name.len().min(80)]);
    }
    let req = ReadRequest { resource_name: format!("a/blobs/{blob}"), read_offset: 0, read_limit: 0 };
    let got = bs.read(req).await?.into_inner().message().await?.ok_or("no data")?;
    assert_eq!(&got.data[..], b"x", "the known instance still reads");
    // The configuration refuses bad names, and a name given twice.
    for bad in ["../x", "a/blobs", "a=nonsense"] {
        let (code, _, err) = casfs(&["serve", "--listen", "127.0.0.1:0", "--instance", bad])?;
        assert_eq!(code, 2, "--instance {bad:?}: {err}");
    }
    let storage = tmp.path().join("other");
    let (code, _, err) = casfs(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--storage",
        &storage.to_string_lossy(),
        "--instance",
        "a",
        "--instance",
        "a",
    ])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("twice"), "{err}");
    Ok(())
}

/// What the remote-apis-testing contract checks, against `url` and `instance`.
async fn contract_holds(url: &str, instance: &str, input: &Path) -> TestResult {
    let c = client(url, instance)?;
    let caps = caps(&c, instance).await?;
    assert!(caps.execution_capabilities.as_ref().is_some_and(|e| e.exec_enabled), "{caps:?}");
    std::fs::create_dir_all(input)?;
    std::fs::write(input.join("data.txt"), "contract\n")?;
    let act = Act { argv: &["cat", "data.txt"], ..Default::default() };
    let action = upload_action(&c, input, &act).await?;
    let resp = casfs::cas::execution::execute(&c, action, false, |_, _| {}).await?;
    assert_eq!(resp.status.map(|s| s.code), Some(0));
    let stdout = resp.result.ok_or("no result")?.stdout_digest.ok_or("no stdout")?;
    assert_eq!(&c.read(&Digest::try_from(&stdout)?).await?[..], b"contract\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contract_holds_for_an_explicitly_configured_remote_execution_instance() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let args = ["--instance", "remote-execution", "--instance", "store=no-execution", "--metrics-listen", &metrics];
    let server = ServeProcess::start_with(&tmp.path().join("storage"), "127.0.0.1:0", &args)?;
    contract_holds(&server.url, "remote-execution", &tmp.path().join("in")).await?;
    // The storage-only instance says so and executes nothing.
    let store = client(&server.url, "store")?;
    let store_caps = caps(&store, "store").await?;
    assert!(!store_caps.execution_capabilities.is_some_and(|e| e.exec_enabled));
    let input = tmp.path().join("in");
    let action = upload_action(&store, &input, &Act { argv: &["true"], ..Default::default() }).await?;
    let err = casfs::cas::execution::execute(&store, action, false, |_, _| {}).await.expect_err("store executed");
    assert!(err.to_string().contains("storage only"), "{err}");
    // The default instance is not configured: refused, naming the configured ones.
    let st = caps(&store, "").await.expect_err("default instance served");
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(st.message().contains("\"remote-execution\", \"store\""), "{st:?}");
    let page = http_get(&metrics, "/metrics")?;
    assert_eq!(metric(&page, "casfs_exec_actions_total{instance=\"remote-execution\"}")?, 1, "{page}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_server_in_front_of_a_store_server_runs_and_stores_there() -> TestResult {
    let tmp = tempfile::tempdir()?;
    // The store serves instance `main` only; the executor names it upstream.
    let store_args = ["--no-execution", "--instance", "main"];
    let store_srv = ServeProcess::start_with(&tmp.path().join("store"), "127.0.0.1:0", &store_args)?;
    let cache = tmp.path().join("cache");
    let exec_args =
        ["--cas", store_srv.url.as_str(), "--instance-name", "main", "--cache-dir", &cache.to_string_lossy()];
    let exec_srv = ServeProcess::start_with(&tmp.path().join("exec"), "127.0.0.1:0", &exec_args)?;
    let store = client(&store_srv.url, "main")?;
    let exec = client(&exec_srv.url, "")?;
    // The client uploads to the store server (Pants' --remote-store-address) and executes on
    // the execution server (--remote-execution-address).
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input)?;
    std::fs::write(input.join("data.txt"), "split\n")?;
    let act = Act {
        argv: &["sh", "-c", "cat data.txt; tr a-z A-Z < data.txt > out.txt"],
        output_files: &["out.txt"],
        ..Default::default()
    };
    let action = upload_action(&store, &input, &act).await?;
    let resp = casfs::cas::execution::execute(&exec, action, false, |_, _| {}).await?;
    assert_eq!(resp.status.as_ref().map(|s| s.code), Some(0), "{:?}", resp.status);
    let result = resp.result.ok_or("no result")?;
    assert_eq!(result.exit_code, 0);
    // Outputs and the result landed in the store server.
    let stdout = Digest::try_from(result.stdout_digest.as_ref().ok_or("no stdout")?)?;
    assert_eq!(&store.read(&stdout).await?[..], b"split\n");
    let out = Digest::try_from(result.output_files.first().and_then(|f| f.digest.as_ref()).ok_or("no output")?)?;
    assert_eq!(&store.read(&out).await?[..], b"SPLIT\n");
    let cached = store.get_action_result(&action).await?.ok_or("no action result in the store")?;
    assert_eq!(cached.output_files, result.output_files);
    // Its inputs went through the executor's local blob cache.
    assert!(cache.is_dir(), "the local blob cache was used");
    // A second Execute is a cache hit read from the store; the execution server also passes
    // CAS calls through to the store.
    let again = casfs::cas::execution::execute(&exec, action, false, |_, _| {}).await?;
    assert!(again.cached_result, "a second run is served from the store's action cache");
    assert_eq!(&exec.read(&out).await?[..], b"SPLIT\n");
    // The store server itself executes nothing.
    assert!(!caps(&store, "main").await?.execution_capabilities.is_some_and(|e| e.exec_enabled));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn casfs_run_executes_against_an_instance_of_a_server() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let args = ["--no-execution", "--instance", "a", "--instance", "b"];
    let server = ServeProcess::start_with(&tmp.path().join("storage"), "127.0.0.1:0", &args)?;
    let a = client(&server.url, "a")?;
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input)?;
    std::fs::write(input.join("data.txt"), "run\n")?;
    let action = upload_action(&a, &input, &Act { argv: &["cat", "data.txt"], ..Default::default() }).await?;
    let cache = tmp.path().join("cache");
    let text = action.to_string();
    let run = |instance: &str| {
        casfs(&[
            "run",
            "--remote",
            &server.url,
            "--instance-name",
            instance,
            "--cache-dir",
            &cache.to_string_lossy(),
            &text,
        ])
    };
    let (code, out, err) = run("a")?;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(a.get_action_result(&action).await?.is_some(), "the result went to instance a");
    assert!(client(&server.url, "b")?.get_action_result(&action).await?.is_none(), "and not to b");
    let (code, _, err) = run("typo")?;
    assert_ne!(code, 0);
    assert!(err.contains("unknown instance name"), "{err}");
    Ok(())
}

#[test]
fn the_browse_mount_and_a_digest_mount_follow_the_instance() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let args = ["--no-execution", "--instance", "a", "--instance", "b"];
    let server = ServeProcess::start_with(&tmp.path().join("storage"), "127.0.0.1:0", &args)?;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("only-in-a.txt"), "instance a\n")?;
    let (code, out, err) =
        casfs(&["upload", src.to_str().ok_or("path")?, "--remote", &server.url, "--instance-name", "a"])?;
    assert_eq!(code, 0, "{err}");
    let root = Digest::parse(out.trim())?;
    let mnt = tmp.path().join("mnt");
    let m = MountProcess::start("--browse", &mnt, &server.url, &tmp.path().join("cache"), &[])?;
    let dir = |instance: &str| mnt.join(instance).join("blobs/sha256/directory").join(root.to_path_form());
    // b and an unknown name first: the mount's local blob cache is one for all instances
    // (content-addressed), so a digest read through a is then at hand under b as well.
    assert!(std::fs::metadata(dir("b")).is_err(), "a tree of a is absent in b");
    assert!(std::fs::metadata(dir("typo")).is_err(), "an unknown instance shows nothing");
    assert_eq!(std::fs::read_to_string(dir("a").join("only-in-a.txt"))?, "instance a\n");
    drop(m);
    // A digest mount with the instance name reads it; with another, it fails cleanly.
    let mnt2 = tmp.path().join("mnt2");
    let root_text = root.to_string();
    let m = MountProcess::start(&root_text, &mnt2, &server.url, &tmp.path().join("cache2"), &["--instance-name", "a"])?;
    assert_eq!(std::fs::read_to_string(mnt2.join("only-in-a.txt"))?, "instance a\n");
    drop(m);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_of_an_execution_server_map_to_instances_of_its_store() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let store_args = ["--no-execution", "--instance", "main", "--instance", "other"];
    let store_srv = ServeProcess::start_with(&tmp.path().join("store"), "127.0.0.1:0", &store_args)?;
    let cache = tmp.path().join("cache");
    let exec_args = [
        "--cas",
        store_srv.url.as_str(),
        "--instance",
        "main",
        "--instance",
        "alias=upstream=other,no-execution",
        "--cache-dir",
        &cache.to_string_lossy(),
    ];
    let exec_srv = ServeProcess::start_with(&tmp.path().join("exec"), "127.0.0.1:0", &exec_args)?;
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input)?;
    std::fs::write(input.join("data.txt"), "mapped\n")?;
    // Everything through the execution server: it passes CAS calls on to the store.
    let main = client(&exec_srv.url, "main")?;
    let action = upload_action(&main, &input, &Act { argv: &["cat", "data.txt"], ..Default::default() }).await?;
    let resp = casfs::cas::execution::execute(&main, action, false, |_, _| {}).await?;
    assert_eq!(resp.status.as_ref().map(|s| s.code), Some(0), "{:?}", resp.status);
    assert!(client(&store_srv.url, "main")?.get_action_result(&action).await?.is_some(), "result in the store's main");
    assert!(client(&store_srv.url, "other")?.get_action_result(&action).await?.is_none());
    // Each executing instance has a local blob cache of its own.
    assert!(cache.join("instances/main").is_dir(), "no cache folder of instance main");
    assert!(!cache.join("instances/alias").exists(), "alias executes nothing");
    // `alias` is the store's `other`, storage only.
    let alias = client(&exec_srv.url, "alias")?;
    let blob = Digest::of_bytes(b"to other\n");
    alias.write(&blob, "to other\n".into()).await?;
    assert!(client(&store_srv.url, "other")?.find_missing(&[blob]).await?.is_empty(), "written to other");
    assert_eq!(client(&store_srv.url, "main")?.find_missing(&[blob]).await?, vec![blob]);
    assert!(!caps(&alias, "alias").await?.execution_capabilities.is_some_and(|e| e.exec_enabled));
    let st = find_missing(&alias, "other", &blob).await.expect_err("the store's name is not the front's");
    assert!(st.message().contains("\"alias\", \"main\""), "{st:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_server_reaches_its_store_over_tls_with_a_token() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let p = |n: &str| tmp.path().join(n).to_string_lossy().into_owned();
    std::fs::write(p("cert.pem"), ck.cert.pem())?;
    std::fs::write(p("key.pem"), ck.signing_key.serialize_pem())?;
    std::fs::write(p("token"), "s3cret\n")?;
    let store_args =
        ["--no-execution", "--tls-cert", &p("cert.pem"), "--tls-key", &p("key.pem"), "--auth-token-file", &p("token")];
    let store_srv = ServeProcess::start_with(&tmp.path().join("store"), "127.0.0.1:0", &store_args)?;
    let store_url = store_srv.url.replace("127.0.0.1", "localhost");
    assert!(store_url.starts_with("grpcs://"), "{store_url}");
    let exec_args = [
        "--cas",
        &store_url,
        "--tls-ca-file",
        &p("cert.pem"),
        "--remote-header",
        "authorization=Bearer s3cret",
        "--cache-dir",
        &p("cache"),
    ];
    let exec_srv = ServeProcess::start_with(&tmp.path().join("exec"), "127.0.0.1:0", &exec_args)?;
    let exec = client(&exec_srv.url, "")?;
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input)?;
    std::fs::write(input.join("data.txt"), "guarded\n")?;
    let action = upload_action(&exec, &input, &Act { argv: &["cat", "data.txt"], ..Default::default() }).await?;
    let resp = casfs::cas::execution::execute(&exec, action, false, |_, _| {}).await?;
    assert_eq!(resp.status.as_ref().map(|s| s.code), Some(0), "{:?}", resp.status);
    let mut cfg = RemoteConfig::new(&store_url);
    cfg.tls_ca_file = Some(tmp.path().join("cert.pem"));
    cfg.headers.push(("authorization".into(), "Bearer s3cret".into()));
    let store = GrpcStore::new(&cfg)?;
    let result = store.get_action_result(&action).await?.ok_or("no result in the store")?;
    let stdout = Digest::try_from(result.stdout_digest.as_ref().ok_or("no stdout")?)?;
    assert_eq!(&store.read(&stdout).await?[..], b"guarded\n");
    Ok(())
}
