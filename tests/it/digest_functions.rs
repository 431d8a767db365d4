//! Every digest function against independent tools (coreutils' sha1sum, md5sum, sha384sum,
//! sha512sum, sha256sum and b3sum), and storage/serving of blobs under each function.

use std::io::Write;
use std::process::{Command, Stdio};

use bytes::Bytes;

use casfs::cas::{Cas, GrpcStore, RemoteConfig};
use casfs::digest::{Digest, DigestFunction, Hasher};
use casfs::error::Error;
use casfs::proto::reapi;
use casfs::proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use casfs::tree::build_local_tree_with;

use crate::common::*;

/// The command-line tool that prints `function`'s hash.
fn tool(function: DigestFunction) -> &'static str {
    match function {
        DigestFunction::Sha256 => "sha256sum",
        DigestFunction::Sha1 => "sha1sum",
        DigestFunction::Md5 => "md5sum",
        DigestFunction::Sha384 => "sha384sum",
        DigestFunction::Sha512 => "sha512sum",
        DigestFunction::Blake3 => "b3sum",
    }
}

/// Runs `tool` on `data` through stdin; None when the tool is not installed.
fn run_tool(tool: &str, data: &[u8]) -> TestResult<Option<String>> {
    let mut child = match Command::new(tool).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let owned = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&owned));
    let out = child.wait_with_output()?;
    writer.join().map_err(|_| "writer panicked")??;
    assert!(out.status.success(), "{tool} failed");
    let text = String::from_utf8(out.stdout)?;
    Ok(Some(text.split_whitespace().next().ok_or("empty output")?.to_string()))
}

#[test]
fn every_function_agrees_with_its_command_line_tool() -> TestResult {
    let samples: Vec<Vec<u8>> =
        vec![Vec::new(), b"hello\n".to_vec(), pseudo_random(7, 1000), pseudo_random(8, (1 << 20) + 17)];
    for function in DigestFunction::ALL {
        for data in &samples {
            let Some(want) = run_tool(tool(function), data)? else {
                skip!("{} is not installed (scripts/lib/install.sh: apt_install b3sum)", tool(function));
            };
            let whole = Digest::of_bytes_with(function, data);
            assert_eq!(whole.hash_hex(), want, "{function} of {} bytes", data.len());
            assert_eq!(whole.size(), data.len() as u64);
            let mut h = Hasher::new_with(function);
            data.chunks(4099).for_each(|c| h.update(c));
            assert_eq!(h.finish(), whole, "{function} streamed");
            let file = tempfile::NamedTempFile::new()?;
            std::fs::write(file.path(), data)?;
            assert_eq!(casfs::digest::hash_file_with(function, file.path())?, whole);
        }
    }
    Ok(())
}

fn client(url: &str) -> TestResult<GrpcStore> {
    Ok(GrpcStore::new(&RemoteConfig::new(url))?)
}

/// Small (batched) and large (ByteStream) blobs and a whole tree under every function, through
/// a real `casfs serve` on disk, read back again after a restart (the store's scan).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_function_round_trips_through_a_real_server() -> TestResult {
    let storage = tempfile::tempdir()?;
    let src = tempfile::tempdir()?;
    generate_tree(src.path(), &TreeSpec { files: 30, dirs: 6, large: vec![300_000] })?;
    let big = Bytes::from(pseudo_random(9, 5 << 20));
    let mut kept = Vec::new();
    {
        let server = ServeProcess::start(storage.path())?;
        let cas = client(&server.url)?;
        for f in DigestFunction::ALL {
            let small = Bytes::from(format!("small blob under {f}"));
            let (ds, db) = (Digest::of_bytes_with(f, &small), Digest::of_bytes_with(f, &big));
            assert_eq!(cas.find_missing(&[ds, db]).await?, vec![ds, db], "{f}");
            cas.write(&ds, small.clone()).await?;
            cas.write(&db, big.clone()).await?;
            assert!(cas.find_missing(&[ds, db]).await?.is_empty(), "{f}");
            assert_eq!(cas.read(&ds).await?, small);
            assert_eq!(cas.read(&db).await?, big);
            let tree = build_local_tree_with(f, src.path(), &|_| {})?;
            assert_eq!(tree.root.function(), f);
            for (d, bytes) in &tree.directories {
                cas.write(d, Bytes::from(bytes.clone())).await?;
            }
            for (d, path) in &tree.files {
                cas.write_file(d, path).await?;
            }
            let walked = cas.get_tree(&tree.root).await?;
            assert_eq!(walked.len(), tree.directories.len(), "{f} GetTree");
            assert!(walked.iter().all(|(d, _)| d.function() == f));
            kept.push((ds, small, db));
        }
    }
    let server = ServeProcess::start(storage.path())?;
    let cas = client(&server.url)?;
    for (ds, small, db) in kept {
        assert_eq!(cas.read(&ds).await?, small, "{} after restart", ds.function());
        assert_eq!(cas.read(&db).await?.len(), big.len());
        let hex = ds.hash_hex();
        let name =
            if ds.function() == DigestFunction::Sha256 { hex.clone() } else { format!("{}.{hex}", ds.function()) };
        assert!(storage.path().join("cas").join(&hex[..2]).join(name).is_file(), "{ds:?} file name");
    }
    Ok(())
}

/// The same bytes under two functions are two blobs; a SHA-256 hash string sent as BLAKE3 names
/// a different (absent) blob; an unset function is inferred from the hash length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_on_one_server_are_never_confused() -> TestResult {
    let storage = tempfile::tempdir()?;
    let server = ServeProcess::start(storage.path())?;
    let cas = client(&server.url)?;
    let data = Bytes::from_static(b"same bytes, two functions\n");
    let sha = Digest::of_bytes(&data);
    cas.write(&sha, data.clone()).await?;
    let as_blake3 = Digest::from_parts_with(DigestFunction::Blake3, &sha.hash_hex(), sha.size() as i64)?;
    assert_ne!(as_blake3, sha);
    assert_eq!(cas.find_missing(&[sha, as_blake3]).await?, vec![as_blake3]);
    assert!(matches!(cas.read(&as_blake3).await, Err(Error::MissingBlob(_))));
    let refused = cas.write(&as_blake3, data.clone()).await;
    assert!(refused.is_err(), "SHA-256 bytes accepted under a BLAKE3 name: {refused:?}");
    let b3 = Digest::of_bytes_with(DigestFunction::Blake3, &data);
    cas.write(&b3, data.clone()).await?;
    assert!(cas.find_missing(&[sha, b3]).await?.is_empty());
    assert_eq!(cas.read(&b3).await?, data);

    // Raw requests: no digest_function, so the length decides (40 hex: SHA-1).
    let sha1 = Digest::of_bytes_with(DigestFunction::Sha1, &data);
    let mut raw = ContentAddressableStorageClient::connect(server.url.clone()).await?;
    let ask = |function: i32, d: &Digest| reapi::FindMissingBlobsRequest {
        instance_name: String::new(),
        blob_digests: vec![d.to_proto()],
        digest_function: function,
    };
    let missing = raw.find_missing_blobs(ask(0, &sha1)).await?.into_inner().missing_blob_digests;
    assert_eq!(missing.len(), 1);
    cas.write(&sha1, data.clone()).await?;
    assert!(raw.find_missing_blobs(ask(0, &sha1)).await?.into_inner().missing_blob_digests.is_empty());
    // A 64-character hash without a function is SHA-256, never BLAKE3; with BLAKE3 it is b3.
    let b3_wire = ask(0, &Digest::from_parts_with(DigestFunction::Sha256, &b3.hash_hex(), b3.size() as i64)?);
    assert_eq!(raw.find_missing_blobs(b3_wire).await?.into_inner().missing_blob_digests.len(), 1);
    let b3_named = ask(DigestFunction::Blake3.proto_value(), &b3);
    assert!(raw.find_missing_blobs(b3_named).await?.into_inner().missing_blob_digests.is_empty());
    let wrong_len = ask(DigestFunction::Sha512.proto_value(), &sha);
    let e = raw.find_missing_blobs(wrong_len).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let unknown = raw.find_missing_blobs(ask(4, &sha)).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument, "{unknown}");

    // Capabilities list every function.
    let caps = cas.capabilities().await?;
    let listed = caps.cache_capabilities.ok_or("no cache capabilities")?.digest_functions;
    assert_eq!(listed, DigestFunction::ALL.map(|f| f.proto_value()).to_vec());
    Ok(())
}

/// The local cache keeps small blobs of every function across a restart (packs hold SHA-256
/// only; other functions get blob files named by function).
#[test]
fn local_cache_keeps_small_blobs_of_other_functions() -> TestResult {
    use casfs::cache::{CacheConfig, LocalCache};
    let dir = tempfile::tempdir()?;
    let data = Bytes::from_static(b"a small cached blob\n");
    let others: Vec<Digest> = DigestFunction::ALL
        .into_iter()
        .filter(|f| *f != DigestFunction::Sha256)
        .map(|f| Digest::of_bytes_with(f, &data))
        .collect();
    {
        let cache = LocalCache::open(&CacheConfig::new(dir.path(), 0), &casfs::metrics::Metrics::new())?;
        for d in &others {
            cache.insert_verified(*d, data.clone());
        }
    }
    let cache = LocalCache::open(&CacheConfig::new(dir.path(), 0), &casfs::metrics::Metrics::new())?;
    for d in &others {
        assert!(cache.contains(d), "{d:?} lost across a restart");
    }
    Ok(())
}
