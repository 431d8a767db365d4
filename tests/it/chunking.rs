//! Chunked blobs (REAPI SplitBlob/SpliceBlob): the server's contract, a re-upload and a mount
//! of a changed large file that move only the changed chunks (bytes counted on the wire by a
//! TCP proxy), and a server lying in its chunk list, which must never yield wrong bytes.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use tonic::Code;

use casfs::cas::chunks::{self, ChunkParams};
use casfs::cas::{ByteStream, Cas, GrpcStore, MemoryStore, RemoteConfig, SharedCas};
use casfs::digest::Digest;
use casfs::proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use casfs::proto::reapi::{self, capabilities_client::CapabilitiesClient};
use casfs::server::Backend;

use crate::common::*;
use crate::mount::MountProcess;
use crate::slow_links::Proxy;

/// Size of the changed large file, in MiB (`CASFS_CHUNKING_MIB`).
fn big_mib() -> usize {
    std::env::var("CASFS_CHUNKING_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(128)
}

async fn raw_client(url: &str) -> TestResult<ContentAddressableStorageClient<tonic::transport::Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(url.replace("grpc://", "http://"))?.connect().await?;
    Ok(ContentAddressableStorageClient::new(ch).max_decoding_message_size(64 << 20))
}

fn split_req(blob: &Digest) -> reapi::SplitBlobRequest {
    reapi::SplitBlobRequest { blob_digest: Some(blob.to_proto()), chunking_function: 1, ..Default::default() }
}

fn splice_req(blob: &Digest, chunks: &[Digest]) -> reapi::SpliceBlobRequest {
    reapi::SpliceBlobRequest {
        blob_digest: Some(blob.to_proto()),
        chunk_digests: chunks.iter().map(|d| d.to_proto()).collect(),
        chunking_function: 1,
        ..Default::default()
    }
}

fn digests(list: &[reapi::Digest]) -> TestResult<Vec<Digest>> {
    Ok(list.iter().map(Digest::try_from).collect::<Result<Vec<_>, _>>()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_then_splice_round_trips_and_capabilities_say_so() -> TestResult {
    let (_, backend) = memory_backend();
    let server = serve_in_process(backend).await?;
    let ch = tonic::transport::Endpoint::from_shared(server.url.replace("grpc://", "http://"))?.connect().await?;
    let caps = CapabilitiesClient::new(ch).get_capabilities(reapi::GetCapabilitiesRequest::default()).await?;
    let cache = caps.into_inner().cache_capabilities.ok_or("no cache capabilities")?;
    assert!(cache.split_blob_support && cache.splice_blob_support);
    let params = cache.fast_cdc_2020_params.ok_or("no FastCDC parameters")?;
    assert_eq!((params.avg_chunk_size_bytes, params.seed), (512 << 10, 0));

    let store = GrpcStore::new(&chunking_client(&server.url))?;
    let data = Bytes::from(pseudo_random(21, 9 << 20));
    let blob = Digest::of_bytes(&data);
    store.write(&blob, data.clone()).await?;
    let mut cas = raw_client(&server.url).await?;
    let resp = cas.split_blob(split_req(&blob)).await?.into_inner();
    assert_eq!(resp.chunking_function, 1);
    let list = digests(&resp.chunk_digests)?;
    assert!(list.len() >= 4, "{} chunks for 9 MiB", list.len());
    assert!(list.iter().all(|c| c.size() <= ChunkParams::DEFAULT.max() as u64));
    assert_eq!(list.iter().map(|c| c.size()).sum::<u64>(), blob.size());
    let mut got = std::collections::HashMap::new();
    for (d, r) in store.read_many(&list).await? {
        got.insert(d, r?);
    }
    let joined: Vec<Bytes> = list.iter().map(|d| got[d].clone()).collect();
    assert_eq!(joined.concat(), data.to_vec(), "the chunks do not concatenate to the blob");

    // The same chunks, spliced on a server that has only them, make the blob again.
    let (other_store, other) = memory_backend();
    let other_server = serve_in_process(other).await?;
    for (d, b) in list.iter().zip(&joined) {
        other_store.write(d, b.clone()).await?;
    }
    assert_eq!(other_store.find_missing(&[blob]).await?, vec![blob]);
    let mut other_cas = raw_client(&other_server.url).await?;
    let done = other_cas.splice_blob(splice_req(&blob, &list)).await?.into_inner();
    assert_eq!(digests(&[done.blob_digest.ok_or("no digest")?])?, vec![blob]);
    assert_eq!(other_store.read(&blob).await?, data);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_refuses_missing_chunks_wrong_digests_and_lying_sizes() -> TestResult {
    let (mem, backend) = memory_backend();
    let server = serve_in_process(backend).await?;
    let mut cas = raw_client(&server.url).await?;
    let (a, b) = (Bytes::from(pseudo_random(1, 300_000)), Bytes::from(pseudo_random(2, 200_000)));
    let (da, db) = (Digest::of_bytes(&a), Digest::of_bytes(&b));
    mem.write(&da, a.clone()).await?;
    let whole = Digest::of_bytes(&[a.clone(), b.clone()].concat());

    let e = cas.splice_blob(splice_req(&whole, &[da, db])).await.expect_err("spliced with a missing chunk");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains(&db.hash_hex()), "the missing chunk is not named: {}", e.message());

    mem.write(&db, b.clone()).await?;
    // The chunks are all there but make other bytes than the digest says (same size).
    let liar = Digest::of_bytes(&pseudo_random(3, 500_000));
    let e = cas.splice_blob(splice_req(&liar, &[da, db])).await.expect_err("spliced into a wrong digest");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(mem.find_missing(&[liar]).await?, vec![liar], "a mismatched splice stored something");

    // Sizes that cannot add up are refused before anything is read.
    for list in [vec![da], vec![da, db, da]] {
        let e = cas.splice_blob(splice_req(&whole, &list)).await.expect_err("sizes do not add up");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    let lying_size = Digest::from_parts(&db.hash_hex(), 300_000)?;
    let bigger = Digest::from_parts(&whole.hash_hex(), 600_000)?;
    let e = cas.splice_blob(splice_req(&bigger, &[da, lying_size])).await.expect_err("a chunk lied about its size");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let mut unknown = splice_req(&whole, &[da, db]);
    unknown.chunking_function = 99;
    assert_eq!(cas.splice_blob(unknown).await.expect_err("unknown chunking").code(), Code::InvalidArgument);
    let many = vec![Digest::of_bytes(b"x"); chunks::MAX_SPLICE_CHUNKS + 1];
    let huge = Digest::from_parts(&whole.hash_hex(), many.len() as i64)?;
    let e = cas.splice_blob(splice_req(&huge, &many)).await.expect_err("absurd chunk count");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let absent = Digest::of_bytes(b"never stored");
    assert_eq!(cas.split_blob(split_req(&absent)).await.expect_err("split of nothing").code(), Code::NotFound);

    // And the honest splice works, once.
    cas.splice_blob(splice_req(&whole, &[da, db])).await?;
    assert_eq!(mem.read(&whole).await?, [a, b].concat());
    Ok(())
}

/// A client config with chunked transfers on (they are opt-in).
fn chunking_client(url: &str) -> RemoteConfig {
    let mut cfg = RemoteConfig::new(url);
    cfg.chunking = true;
    cfg
}

/// Writes `data` as `dir/big.bin` and uploads `dir` through `url`; returns the root digest.
fn upload(dir: &Path, data: &[u8], url: &str, extra: &[&str]) -> TestResult<String> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("big.bin"), data)?;
    let mut args = vec!["upload", dir.to_str().ok_or("path")?, "--remote", url];
    args.extend_from_slice(extra);
    let (code, out, err) = casfs(&args)?;
    assert_eq!(code, 0, "{err}");
    Ok(out.trim().to_string())
}

#[test]
fn a_changed_mib_is_all_a_reupload_sends_and_all_a_mount_fetches() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let proxy = Proxy::start(server.url.strip_prefix("grpc://").ok_or("url")?.parse()?, 1 << 40, Default::default())?;
    let size = big_mib() << 20;
    let mut data = pseudo_random(5, size);
    let root1 = upload(&tmp.path().join("v1"), &data, &proxy.url(), &["--chunking"])?;
    let first = proxy.up.load(std::sync::atomic::Ordering::Relaxed);
    let d1 = Digest::of_bytes(&data);
    data[size / 2..size / 2 + (1 << 20)].copy_from_slice(&pseudo_random(6, 1 << 20));
    let d2 = Digest::of_bytes(&data);
    let root2 = upload(&tmp.path().join("v2"), &data, &proxy.url(), &["--chunking"])?;
    let sent = proxy.up.load(std::sync::atomic::Ordering::Relaxed) - first;
    // The same change uploaded whole, for comparison.
    data[size / 4..size / 4 + (1 << 20)].copy_from_slice(&pseudo_random(7, 1 << 20));
    let before = proxy.up.load(std::sync::atomic::Ordering::Relaxed);
    upload(&tmp.path().join("v3"), &data, &proxy.url(), &[])?;
    let whole = proxy.up.load(std::sync::atomic::Ordering::Relaxed) - before;
    drop(data);
    eprintln!(
        "{} MiB file, one MiB changed: chunked re-upload sent {sent} bytes, whole {whole} bytes (first upload {first})",
        size >> 20
    );
    assert!(first >= size as u64 && whole >= size as u64, "the proxy missed the uploads");
    assert!(sent * 20 < size as u64, "re-upload sent {sent} bytes of {size}");

    // casfs download by chunks gets the right bytes.
    let dest = tmp.path().join("dest");
    let (code, _, err) =
        casfs(&["download", &root2, dest.to_str().ok_or("path")?, "--remote", &proxy.url(), "--chunking"])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(casfs::digest::hash_file(&dest.join("big.bin"))?, d2);

    require_fuse!();
    let cache = tmp.path().join("cache");
    let m1 = MountProcess::start(&root1, &tmp.path().join("mnt1"), &proxy.url(), &cache, &["--chunking"])?;
    assert_eq!(casfs::digest::hash_file(&m1.mountpoint.join("big.bin"))?, d1);
    drop(m1);
    // A cached chunk the new version shares goes bad on disk: it is fetched again, never served.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let list =
        rt.block_on(async { GrpcStore::new(&chunking_client(&server.url))?.split(&d2).await })?.ok_or("no split")?;
    let shared = list
        .iter()
        .map(|c| cache.join("cas").join(&c.hash_hex()[..2]).join(c.hash_hex()))
        .find(|p| p.exists())
        .ok_or("no chunk of the new version in the cache")?;
    std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let len = std::fs::metadata(&shared)?.len() as usize;
    std::fs::write(&shared, vec![b'X'; len])?;
    let before = proxy.down_bytes();
    let m2 = MountProcess::start(&root2, &tmp.path().join("mnt2"), &proxy.url(), &cache, &["--chunking"])?;
    let got = casfs::digest::hash_file(&m2.mountpoint.join("big.bin"));
    let fetched = proxy.down_bytes() - before;
    assert_eq!(got.map_err(|e| format!("{e}\n{}", m2.log_text()))?, d2, "wrong bytes");
    eprintln!("mount of the new version (same cache): fetched {fetched} bytes of {size}");
    assert!(fetched * 20 < size as u64, "the mount fetched {fetched} bytes of {size}\n{}", m2.log_text());
    Ok(())
}

/// A store whose chunk list for one blob is another blob's (of the same size): every chunk
/// is genuine, the list is a lie.
struct LyingSplits {
    inner: SharedCas,
    target: Digest,
    decoy: Digest,
}

#[async_trait::async_trait]
impl Cas for LyingSplits {
    async fn find_missing(&self, digests: &[Digest]) -> casfs::Result<Vec<Digest>> {
        self.inner.find_missing(digests).await
    }
    async fn read_stream(&self, digest: &Digest, offset: u64, limit: u64) -> casfs::Result<ByteStream> {
        self.inner.read_stream(digest, offset, limit).await
    }
    async fn write_stream(&self, digest: &Digest, data: ByteStream) -> casfs::Result<()> {
        self.inner.write_stream(digest, data).await
    }
    async fn read(&self, digest: &Digest) -> casfs::Result<Bytes> {
        self.inner.read(digest).await
    }
    async fn write(&self, digest: &Digest, data: Bytes) -> casfs::Result<()> {
        self.inner.write(digest, data).await
    }
    async fn split(&self, digest: &Digest) -> casfs::Result<Option<Vec<Digest>>> {
        if *digest != self.target {
            return Ok(None);
        }
        Ok(Some(chunks::split_stored(&self.inner, &self.decoy, ChunkParams::DEFAULT).await?))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_chunk_list_is_an_error_never_wrong_bytes() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (real, decoy) = (pseudo_random(8, 6 << 20), pseudo_random(9, 6 << 20));
    let (target, decoy_d) = (Digest::of_bytes(&real), Digest::of_bytes(&decoy));
    let mem = Arc::new(MemoryStore::new());
    mem.write(&decoy_d, decoy.into()).await?;
    let liar = Arc::new(LyingSplits { inner: mem.clone(), target, decoy: decoy_d });
    let server = serve_in_process(Backend::new(liar, mem.clone())).await?;
    let (url, dir) = (server.url.clone(), tmp.path().to_path_buf());
    let root = tokio::task::spawn_blocking(move || upload(&dir.join("src"), &real, &url, &["--chunking"])).await??;

    let dest = tmp.path().join("dest");
    let args = ["download", &root, dest.to_str().ok_or("path")?, "--remote", &server.url, "--chunking"];
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let (code, _, err) =
        tokio::task::spawn_blocking(move || casfs(&args.iter().map(String::as_str).collect::<Vec<_>>())).await??;
    assert_ne!(code, 0, "casfs download accepted a lying chunk list");
    assert!(err.contains(&target.hash_hex()) || err.to_lowercase().contains("mismatch"), "{err}");
    let got = dest.join("big.bin");
    assert!(!got.exists() || casfs::digest::hash_file(&got)? == target, "wrong bytes were written");

    require_fuse!();
    let (url, dir) = (server.url.clone(), tmp.path().to_path_buf());
    let (code, stderr, log) = tokio::task::spawn_blocking(move || -> TestResult<(i32, String, String)> {
        let m = MountProcess::start(&root, &dir.join("mnt"), &url, &dir.join("cache"), &["--chunking"])?;
        let out =
            std::process::Command::new("timeout").arg("60").arg("cat").arg(m.mountpoint.join("big.bin")).output()?;
        Ok((out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned(), m.log_text()))
    })
    .await??;
    assert_ne!(code, 0, "the mount served bytes from a lying chunk list");
    assert!(stderr.contains("Input/output error"), "{stderr}\n{log}");
    assert!(log.contains(&target.hash_hex()), "no log line names {target}:\n{log}");
    Ok(())
}
