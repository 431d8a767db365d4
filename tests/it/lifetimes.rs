//! Blob lifetimes as REAPI asks: what FindMissingBlobs or an action-cache hit vouches for is
//! not evicted for `--min-blob-lifetime`; an upload that would need it gone is refused until
//! the promise lapses; what nobody vouched for is evicted as before.

use casfs::cas::{ActionCache, Cas, GrpcStore, RemoteConfig};
use casfs::digest::Digest;
use casfs::proto::reapi;

use crate::common::*;
use crate::mount::http_get;

const MIB: usize = 1 << 20;

async fn put(store: &GrpcStore, seed: u64, len: usize) -> TestResult<Digest> {
    let data = pseudo_random(seed, len);
    let d = Digest::of_bytes(&data);
    store.write(&d, data.into()).await?;
    Ok(d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_server_vouched_for_survives_churn() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let server = ServeProcess::start_with(
        &tmp.path().join("storage"),
        "127.0.0.1:0",
        &["--storage-size", "20M", "--metrics-listen", &metrics],
    )?;
    let store = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    // Asked about with FindMissingBlobs after every upload (as Bazel does).
    let asked = put(&store, 1, MIB).await?;
    // Referenced only by an action result (a file and an output directory's content) that
    // clients keep fetching.
    let output = put(&store, 2, MIB).await?;
    let in_tree = put(&store, 3, MIB).await?;
    let dir = reapi::Directory {
        files: vec![reapi::FileNode { name: "f".into(), digest: Some(in_tree.to_proto()), ..Default::default() }],
        ..Default::default()
    };
    let tree = reapi::Tree { root: Some(dir), children: vec![] };
    let (tree_digest, tree_bytes) = Digest::of_message(&tree);
    store.write(&tree_digest, tree_bytes.into()).await?;
    let action = Digest::of_bytes(b"an action");
    let result = reapi::ActionResult {
        output_files: vec![reapi::OutputFile {
            path: "out".into(),
            digest: Some(output.to_proto()),
            ..Default::default()
        }],
        output_directories: vec![reapi::OutputDirectory {
            path: "dir".into(),
            tree_digest: Some(tree_digest.to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    store.update_action_result(&action, &result).await?;
    // Nobody mentions this one again.
    let forgotten = put(&store, 4, MIB).await?;

    for round in 0..40u64 {
        put(&store, 100 + round, MIB).await?;
        assert!(store.find_missing(&[asked]).await?.is_empty(), "round {round}: the vouched blob is gone");
        assert!(store.get_action_result(&action).await?.is_some(), "round {round}: the result became a miss");
    }
    for d in [asked, output, in_tree, tree_digest] {
        assert_eq!(store.read(&d).await?.len() as u64, d.size());
    }
    assert_eq!(store.find_missing(&[forgotten]).await?, vec![forgotten], "the unreferenced blob was kept");
    let text = http_get(&metrics, "/metrics")?;
    assert!(metric(&text, "casfs_storage_evictions_total")? >= 20, "{text}");
    assert_eq!(metric(&text, "casfs_storage_refused_uploads_total")?, 0, "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_of_promises_refuses_uploads_until_they_lapse() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let server = ServeProcess::start_with(
        &tmp.path().join("storage"),
        "127.0.0.1:0",
        &["--storage-size", "4M", "--min-blob-lifetime", "3s", "--metrics-listen", &metrics],
    )?;
    let store = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    let mut promised = Vec::new();
    for seed in 0..4 {
        promised.push(put(&store, seed, MIB - 4096).await?);
    }
    assert!(store.find_missing(&promised).await?.is_empty());
    let started = std::time::Instant::now();
    // Every byte is promised: the next upload does not fit (a large one streams through
    // ByteStream, a small one through a batch: both refuse).
    let e = put(&store, 50, 2 * MIB).await.expect_err("upload over promised blobs");
    assert!(e.to_string().contains("--min-blob-lifetime"), "{e}");
    let e = put(&store, 51, 64 << 10).await.expect_err("small upload over promised blobs");
    assert!(e.to_string().contains("RESOURCE_EXHAUSTED") || e.to_string().contains("ResourceExhausted"), "{e}");
    assert!(store.find_missing(&promised).await?.is_empty(), "a promised blob was evicted");
    let text = http_get(&metrics, "/metrics")?;
    assert!(metric(&text, "casfs_storage_refused_uploads_total")? >= 2, "{text}");
    // Once the promises lapse, uploads evict them as before.
    let lapse = std::time::Duration::from_secs(3).saturating_sub(started.elapsed());
    tokio::time::sleep(lapse + std::time::Duration::from_millis(500)).await;
    let d = put(&store, 52, 2 * MIB).await?;
    assert!(store.find_missing(&[d]).await?.is_empty());
    let gone = store.find_missing(&promised).await?;
    assert!(!gone.is_empty(), "nothing was evicted to make room");
    Ok(())
}
