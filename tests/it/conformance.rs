//! The store contract, checked against every backend: memory, disk, and the gRPC client
//! talking to a real in-process server over loopback (itself over memory and disk).

use bytes::Bytes;

use casfs::cas::{ActionCache, Cas, DiskStore, GrpcStore, MemoryStore, RemoteConfig};
use casfs::digest::{Digest, EMPTY};
use casfs::error::Error;
use casfs::proto::reapi;
use casfs::tree::{DirEntry, Directory, FileEntry};

use crate::common::*;

const SMALL: &[u8] = b"hello\n";

async fn suite(cas: &dyn Cas, ac: &dyn ActionCache) -> TestResult {
    // The empty blob is always there.
    assert!(cas.find_missing(&[EMPTY]).await?.is_empty());
    assert_eq!(cas.read(&EMPTY).await?.len(), 0);

    // Absent blobs: reported missing once, in request order; reads fail with MissingBlob.
    let a = Digest::of_bytes(b"a");
    let b = Digest::of_bytes(b"b");
    assert_eq!(cas.find_missing(&[b, a, b, EMPTY]).await?, vec![b, a]);
    match cas.read(&a).await {
        Err(Error::MissingBlob(d)) => assert_eq!(d, a),
        other => return Err(format!("read of a missing blob gave {other:?}").into()),
    }

    // A write whose bytes do not match is refused and stores nothing.
    match cas.write(&a, Bytes::from_static(b"not a")).await {
        Err(e) => assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}"),
        Ok(()) => return Err("mismatched write accepted".into()),
    }
    assert_eq!(cas.find_missing(&[a]).await?, vec![a]);

    // Good writes, repeated writes, whole and ranged reads.
    let small = Digest::of_bytes(SMALL);
    cas.write(&small, Bytes::from_static(SMALL)).await?;
    cas.write(&small, Bytes::from_static(SMALL)).await?;
    assert_eq!(cas.read(&small).await?, SMALL);
    assert_eq!(cas.read_range(&small, 1, 3).await?, &SMALL[1..4]);
    assert_eq!(cas.read_range(&small, 2, 0).await?, &SMALL[2..]);
    assert_eq!(cas.read_range(&small, 6, 0).await?.len(), 0);
    assert!(cas.read_range(&small, 7, 0).await.is_err(), "offset past the end must fail");

    // A blob larger than any batch: streamed both ways, verified.
    let big_bytes = Bytes::from(pseudo_random(7, (9 << 20) + 13));
    let big = Digest::of_bytes(&big_bytes);
    cas.write(&big, big_bytes.clone()).await?;
    assert_eq!(cas.read(&big).await?, big_bytes);
    assert_eq!(cas.read_range(&big, 5 << 20, 100).await?, big_bytes.slice((5 << 20)..(5 << 20) + 100));
    let tmp = tempfile::tempdir()?;
    cas.read_to_file(&big, &tmp.path().join("big")).await?;
    assert_eq!(std::fs::read(tmp.path().join("big"))?, big_bytes);
    std::fs::write(tmp.path().join("src"), &big_bytes[..1 << 20])?;
    let part = Digest::of_bytes(&big_bytes[..1 << 20]);
    cas.write_file(&part, &tmp.path().join("src")).await?;
    assert!(cas.find_missing(&[part]).await?.is_empty());

    // Many blobs at once: each result stands alone.
    let blobs: Vec<(Digest, Bytes)> = (0..300u64)
        .map(|i| {
            let data = Bytes::from(pseudo_random(100 + i, (i as usize * 101) % 40_000));
            (Digest::of_bytes(&data), data)
        })
        .collect();
    for (_, r) in cas.write_many(blobs.clone()).await? {
        r?;
    }
    let mut wanted: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
    wanted.push(b);
    let got = cas.read_many(&wanted).await?;
    assert_eq!(got.len(), wanted.len());
    for (d, r) in got {
        if d == b {
            assert!(matches!(r, Err(Error::MissingBlob(_))), "missing blob in a batch: {r:?}");
        } else {
            let data = r?;
            assert_eq!(Digest::of_bytes(&data), d);
        }
    }

    // A two-level tree comes back whole from get_tree, root first.
    let leaf = Directory {
        files: vec![FileEntry { name: "f".into(), digest: small, executable: true }],
        ..Default::default()
    };
    let (leaf_d, leaf_bytes) = leaf.encode();
    let root = Directory {
        dirs: vec![DirEntry { name: "x".into(), digest: leaf_d }, DirEntry { name: "y".into(), digest: leaf_d }],
        ..Default::default()
    };
    let (root_d, root_bytes) = root.encode();
    cas.write(&leaf_d, leaf_bytes.into()).await?;
    cas.write(&root_d, root_bytes.into()).await?;
    let tree = cas.get_tree(&root_d).await?;
    assert_eq!(tree.len(), 2);
    assert_eq!(tree[0].0, root_d);
    assert_eq!(tree[1].1, leaf);

    // Action cache round trip; unknown actions are None.
    let action = Digest::of_bytes(b"an action");
    assert!(ac.get_action_result(&action).await?.is_none());
    let result = reapi::ActionResult { exit_code: 3, stdout_digest: Some(small.to_proto()), ..Default::default() };
    ac.update_action_result(&action, &result).await?;
    assert_eq!(ac.get_action_result(&action).await?, Some(result));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_conforms() -> TestResult {
    let m = MemoryStore::new();
    suite(&m, &m).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_store_conforms() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = DiskStore::open(dir.path(), 0)?;
    suite(&d, &d).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_store_over_memory_server_conforms() -> TestResult {
    let (_m, backend) = memory_backend();
    let server = serve_in_process(backend).await?;
    let client = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    suite(&client, &client).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_store_over_disk_server_conforms() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (_d, backend) = disk_backend(dir.path())?;
    let server = serve_in_process(backend).await?;
    let mut cfg = RemoteConfig::new(&server.url);
    cfg.instance_name = "some/nested/instance".into();
    let client = GrpcStore::new(&cfg)?;
    suite(&client, &client).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_store_survives_restart_and_evicts_lru() -> TestResult {
    let dir = tempfile::tempdir()?;
    let blobs: Vec<(Digest, Bytes)> = (0..10u64)
        .map(|i| {
            let data = Bytes::from(pseudo_random(i, 1000));
            (Digest::of_bytes(&data), data)
        })
        .collect();
    {
        let d = DiskStore::open(dir.path(), 0)?;
        let base = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for (i, (digest, data)) in blobs.iter().enumerate() {
            d.write(digest, data.clone()).await?;
            // File systems stamp mtimes coarsely; give each blob a distinct one so the
            // recency order the store rebuilds at open is the write order.
            let f = std::fs::File::options().write(true).open(d.blob_path(digest))?;
            f.set_modified(base + std::time::Duration::from_secs(i as u64))?;
        }
        assert_eq!(d.total_bytes(), 10_000);
    }
    // Reopened with a 5,000-byte bound: the oldest blobs go, the newest stay.
    let d = DiskStore::open(dir.path(), 5000)?;
    assert_eq!(d.blob_count(), 5);
    assert!(d.total_bytes() <= 5000);
    // Touch the oldest survivor, add a new blob: the next-oldest is evicted instead.
    let survivors: Vec<Digest> = blobs.iter().map(|(d, _)| *d).filter(|x| d.contains(x)).collect();
    d.read(&survivors[0]).await?;
    let extra = Bytes::from(pseudo_random(99, 1000));
    d.write(&Digest::of_bytes(&extra), extra.clone()).await?;
    assert!(d.contains(&survivors[0]), "recently read blob was evicted");
    assert!(!d.contains(&survivors[1]), "least recently used blob was kept");
    assert!(!d.blob_path(&survivors[1]).exists(), "evicted blob file still on disk");
    Ok(())
}
