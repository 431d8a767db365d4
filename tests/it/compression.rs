//! zstd end to end through a real `casfs serve`: round trips with compression on and off,
//! bytes on the wire counted by the server, a mount reading compressed, and zstd bombs and
//! lying sizes refused without the server's memory growing.

use std::io::Write as _;
use std::path::Path;

use bytes::Bytes;
use tonic::transport::Channel;

use casfs::cas::{Cas, GrpcStore, RemoteConfig};
use casfs::digest::Digest;
use casfs::proto::bytestream::byte_stream_client::ByteStreamClient;
use casfs::proto::bytestream::{ReadRequest, WriteRequest};
use casfs::proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use casfs::proto::reapi::{self, batch_update_blobs_request};

use crate::common::*;
use crate::mount::{http_get, MountProcess};

/// `Compressor.Value` ZSTD.
const ZSTD: i32 = 1;
/// What a zstd bomb expands to.
const BOMB_BYTES: u64 = 1 << 30;
/// The server's peak resident memory may not come near the bomb: a sixteenth of it at most
/// (it peaks near 20 MiB; a server that inflated the bomb would need over 1 GiB).
const RSS_CEILING_KIB: u64 = (BOMB_BYTES >> 10) / 16;

/// Text-like bytes (words from a small vocabulary, lines of varying length): compressible
/// the way source files are, unlike zeros or random bytes.
fn text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "fn ", "let ", "self", ".read(", "digest", " = ", "Ok(())", ";\n", "    ", "match ", "=> ", "blob", "size",
        "&mut ", "}\n", "// the ",
    ];
    let noise = pseudo_random(seed, len / 4 + 8);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(WORDS[(noise[i % noise.len()] % 16) as usize].as_bytes());
        if noise[(i * 7) % noise.len()] < 8 {
            out.extend_from_slice(format!("{}", noise[(i * 3) % noise.len()]).as_bytes());
        }
        i += 1;
    }
    out.truncate(len);
    out
}

fn metric_or_zero(text: &str, name: &str) -> u64 {
    metric(text, name).unwrap_or(0)
}

fn wire(metrics: &str, rpc: &str, direction: &str, compressor: &str) -> u64 {
    metric_or_zero(
        metrics,
        &format!("casfs_{rpc}_wire_bytes_total{{direction=\"{direction}\",compressor=\"{compressor}\"}}"),
    )
}

fn serve_with_metrics(storage: &Path) -> TestResult<(ServeProcess, String)> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let server = ServeProcess::start_with(storage, "127.0.0.1:0", &["--metrics-listen", &addr])?;
    Ok((server, addr))
}

fn client(url: &str, threshold: Option<u64>) -> TestResult<GrpcStore> {
    let mut cfg = RemoteConfig::new(url);
    cfg.compress_threshold = threshold;
    Ok(GrpcStore::new(&cfg)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_round_trip_compressed_and_not_with_bytes_counted() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (server, metrics_addr) = serve_with_metrics(&tmp.path().join("storage"))?;
    let small = Bytes::from(text(1, 40 << 10)); // in a batch
    let large = Bytes::from(text(2, 12 << 20)); // by ByteStream
    let random = Bytes::from(pseudo_random(3, 100 << 10)); // gains nothing: sent as is
    let blobs = [&small, &large, &random];

    let on = client(&server.url, Some(4 << 10))?;
    for b in blobs {
        on.write(&Digest::of_bytes(b), b.clone()).await?;
    }
    let m = http_get(&metrics_addr, "/metrics")?;
    let batch_z = wire(&m, "batch", "write", "zstd");
    let stream_z = wire(&m, "bytestream", "write", "zstd");
    assert!(batch_z > 0 && batch_z < small.len() as u64 / 2, "batch upload sent {batch_z} zstd bytes:\n{m}");
    assert!(stream_z > 0 && stream_z < large.len() as u64 / 2, "stream upload sent {stream_z} zstd bytes:\n{m}");
    assert!(wire(&m, "batch", "write", "identity") >= random.len() as u64, "random blob not sent plain:\n{m}");

    // A fresh client reads everything back, compressed where it gains, verified.
    let reader = client(&server.url, Some(4 << 10))?;
    for b in blobs {
        assert!(reader.read(&Digest::of_bytes(b)).await? == *b, "wrong bytes read back");
    }
    let file = tmp.path().join("large.out");
    reader.read_to_file(&Digest::of_bytes(&large), &file).await?;
    assert!(std::fs::read(&file)? == large[..], "read_to_file gave wrong bytes");
    let m = http_get(&metrics_addr, "/metrics")?;
    assert!(wire(&m, "batch", "read", "zstd") > 0, "no compressed batch answer:\n{m}");
    let read_z = wire(&m, "bytestream", "read", "zstd");
    assert!(read_z > 0 && read_z < large.len() as u64, "stream reads sent {read_z} zstd bytes:\n{m}");

    // Compression off (an old client, as far as the wire shows): plain names and entries.
    let before = (wire(&m, "bytestream", "read", "zstd"), wire(&m, "batch", "read", "zstd"));
    let off = client(&server.url, None)?;
    let fresh = Bytes::from(text(4, 6 << 20));
    off.write(&Digest::of_bytes(&fresh), fresh.clone()).await?;
    for b in [&small, &large, &random, &fresh] {
        assert!(off.read(&Digest::of_bytes(b)).await? == *b, "wrong bytes read back uncompressed");
    }
    let m = http_get(&metrics_addr, "/metrics")?;
    assert_eq!((wire(&m, "bytestream", "read", "zstd"), wire(&m, "batch", "read", "zstd")), before);
    assert!(wire(&m, "bytestream", "write", "identity") >= fresh.len() as u64, "{m}");
    assert_eq!(wire(&m, "bytestream", "write", "zstd"), stream_z, "an uncompressed client sent zstd:\n{m}");
    drop(server);
    Ok(())
}

/// Writes a compressible tree: text files of many sizes, one of them large.
fn text_tree(root: &Path) -> TestResult {
    for d in 0..6 {
        let dir = root.join(format!("pkg{d}")).join("src");
        std::fs::create_dir_all(&dir)?;
        for f in 0..40 {
            let len = [0, 300, 5000, 20_000, 70_000][(f + d) % 5];
            std::fs::write(dir.join(format!("m{f}.rs")), text((d * 100 + f) as u64, len))?;
        }
    }
    std::fs::write(root.join("big.log"), text(999, 20 << 20))?;
    Ok(())
}

#[test]
fn cli_upload_download_and_mount_with_and_without_compression() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    text_tree(&src)?;
    let src_s = src.to_str().ok_or("path")?;
    let mut sent = Vec::new();
    let mut roots = Vec::new();
    for (i, threshold) in ["off", "4K"].into_iter().enumerate() {
        let (server, addr) = serve_with_metrics(&tmp.path().join(format!("storage{i}")))?;
        let (code, out, err) = casfs(&["upload", src_s, "--remote", &server.url, "--compress-threshold", threshold])?;
        assert_eq!(code, 0, "upload with --compress-threshold {threshold}: {err}");
        roots.push(out.trim().to_string());
        let m = http_get(&addr, "/metrics")?;
        let all: u64 = ["batch", "bytestream"]
            .iter()
            .flat_map(|rpc| ["identity", "zstd"].map(|c| wire(&m, rpc, "write", c)))
            .sum();
        sent.push(all);
        let dest = tmp.path().join(format!("dest{i}"));
        let (code, _, err) = casfs(&[
            "download",
            &roots[i],
            dest.to_str().ok_or("path")?,
            "--remote",
            &server.url,
            "--compress-threshold",
            threshold,
        ])?;
        assert_eq!(code, 0, "download: {err}");
        diff_r(&src, &dest)?;
        if threshold != "off" {
            assert!(wire(&http_get(&addr, "/metrics")?, "bytestream", "read", "zstd") > 0, "download not compressed");
            mount_and_compare(tmp.path(), &src, &roots[i], &server.url, &addr)?;
        }
    }
    assert_eq!(roots[0], roots[1]);
    assert!(sent[1] * 2 < sent[0], "compressed upload sent {} bytes, uncompressed {}", sent[1], sent[0]);
    Ok(())
}

fn mount_and_compare(tmp: &Path, src: &Path, root: &str, url: &str, metrics_addr: &str) -> TestResult {
    if let Some(why) = fuse_unavailable() {
        skip("cli_upload_download_and_mount_with_and_without_compression (mount part)", &why);
        return Ok(());
    }
    let before = http_get(metrics_addr, "/metrics")?;
    let mnt = tmp.join("mnt");
    let m = MountProcess::start(root, &mnt, url, &tmp.join("cache"), &["--compress-threshold", "4K"])?;
    let compared = diff_r(src, &mnt);
    drop(m);
    compared?;
    let after = http_get(metrics_addr, "/metrics")?;
    let z = |t: &str| wire(t, "bytestream", "read", "zstd") + wire(t, "batch", "read", "zstd");
    assert!(z(&after) > z(&before), "the mount read nothing compressed:\n{after}");
    Ok(())
}

async fn raw(url: &str) -> TestResult<(ContentAddressableStorageClient<Channel>, ByteStreamClient<Channel>)> {
    let ch = Channel::from_shared(url.replace("grpc://", "http://"))?.connect().await?;
    Ok((ContentAddressableStorageClient::new(ch.clone()), ByteStreamClient::new(ch)))
}

/// zstd of `len` zeros, compressed as a stream (the zeros are never all in memory).
fn zeros_compressed(len: u64) -> TestResult<Vec<u8>> {
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 19)?;
    let block = vec![0u8; 1 << 20];
    for _ in 0..len / block.len() as u64 {
        enc.write_all(&block)?;
    }
    Ok(enc.finish()?)
}

/// A hand-made frame whose header claims 1 TiB of content (single segment, so a decoder
/// that believed it would allocate a 1 TiB window), holding `data` in one raw block.
fn lying_header_frame(data: &[u8]) -> Vec<u8> {
    let mut f = vec![0x28, 0xB5, 0x2F, 0xFD, 0xE0];
    f.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let header = 1 | ((data.len() as u32) << 3);
    f.extend_from_slice(&header.to_le_bytes()[..3]);
    f.extend_from_slice(data);
    f
}

fn peak_rss_kib(pid: u32) -> TestResult<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).ok_or("no VmHWM")?;
    Ok(line.split_whitespace().nth(1).ok_or("VmHWM")?.parse()?)
}

fn write_req(name: String, data: Vec<u8>) -> WriteRequest {
    WriteRequest { resource_name: name, write_offset: 0, finish_write: true, data: data.into() }
}

fn compressed_name(d: &Digest) -> String {
    format!("uploads/{}/compressed-blobs/zstd/{}/{}", uuid::Uuid::new_v4(), d.hash_hex(), d.size())
}

async fn batch_one(
    cas: &mut ContentAddressableStorageClient<Channel>,
    d: &Digest,
    data: Vec<u8>,
) -> TestResult<(i32, String)> {
    let resp = cas
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(d.to_proto()),
                data: data.into(),
                compressor: ZSTD,
            }],
            ..Default::default()
        })
        .await?
        .into_inner();
    let s = resp.responses.first().and_then(|r| r.status.clone()).ok_or("no status")?;
    Ok((s.code, s.message))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_bombs_and_lying_sizes_are_refused_cheaply() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let (mut cas, mut bs) = raw(&server.url).await?;
    let bomb = zeros_compressed(BOMB_BYTES)?;
    assert!(bomb.len() < 64 << 10, "the bomb is {} bytes", bomb.len());
    // The digest of 1 MiB of zeros: the bomb's first MiB is right, then it keeps going.
    let mib = Digest::of_bytes(&vec![0u8; 1 << 20]);

    let err = bs.write(futures::stream::iter(vec![write_req(compressed_name(&mib), bomb.clone())])).await;
    let err = err.expect_err("a bomb was accepted by ByteStream");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("more than"), "{err:?}");
    let (code, msg) = batch_one(&mut cas, &mib, bomb.clone()).await?;
    assert_eq!(code, tonic::Code::InvalidArgument as i32, "batch bomb: {msg}");
    assert!(msg.contains("more than"), "{msg}");
    // A header claiming a huge content size (and window) is refused, not believed.
    let hello = Digest::of_bytes(b"hello");
    let liar = lying_header_frame(b"hello");
    let err = bs.write(futures::stream::iter(vec![write_req(compressed_name(&hello), liar.clone())])).await;
    assert_eq!(err.expect_err("a lying header was accepted").code(), tonic::Code::InvalidArgument);
    let (code, msg) = batch_one(&mut cas, &hello, liar).await?;
    assert_eq!(code, tonic::Code::InvalidArgument as i32, "batch liar: {msg}");

    // A resource name whose uncompressed size is smaller than the data, and one whose hash
    // is not the data's: refused like any wrong upload.
    let data = text(7, 200 << 10);
    let z = zstd::bulk::compress(&data, 3)?;
    let real = Digest::of_bytes(&data);
    let short = Digest::from_parts(&real.hash_hex(), (data.len() / 2) as i64)?;
    let err = bs.write(futures::stream::iter(vec![write_req(compressed_name(&short), z.clone())])).await;
    assert_eq!(err.expect_err("a lying size was accepted").code(), tonic::Code::InvalidArgument);
    let (code, msg) = batch_one(&mut cas, &short, z.clone()).await?;
    assert_eq!(code, tonic::Code::InvalidArgument as i32, "batch short: {msg}");
    let other = Digest::of_bytes(&text(8, data.len()));
    let err = bs.write(futures::stream::iter(vec![write_req(compressed_name(&other), z.clone())])).await;
    assert_eq!(err.expect_err("a wrong hash was accepted").code(), tonic::Code::InvalidArgument);
    let missing = cas
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            blob_digests: vec![mib.to_proto(), hello.to_proto(), short.to_proto(), other.to_proto()],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(missing.missing_blob_digests.len(), 4, "a refused upload was stored");

    // The honest upload goes through and commits the compressed bytes sent.
    let ok = bs.write(futures::stream::iter(vec![write_req(compressed_name(&real), z.clone())])).await?;
    assert_eq!(ok.into_inner().committed_size, z.len() as i64);
    let again = bs.write(futures::stream::iter(vec![write_req(compressed_name(&real), z)])).await?;
    assert_eq!(again.into_inner().committed_size, -1, "an existing blob answers -1 to a compressed upload");

    let peak = peak_rss_kib(server.child.id())?;
    assert!(peak < RSS_CEILING_KIB, "the server peaked at {peak} KiB resident for a {BOMB_BYTES}-byte bomb");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_reads_follow_the_spec_and_plain_clients_are_unchanged() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let (mut cas, mut bs) = raw(&server.url).await?;
    let data = text(11, 3 << 20);
    let d = Digest::of_bytes(&data);
    // An old client: plain ByteStream write and read.
    let name = format!("uploads/{}/blobs/{}/{}", uuid::Uuid::new_v4(), d.hash_hex(), d.size());
    let resp = bs.write(futures::stream::iter(vec![write_req(name, data.clone())])).await?.into_inner();
    assert_eq!(resp.committed_size, d.size() as i64);
    let read = |name: String, offset: i64, limit: i64| ReadRequest {
        resource_name: name,
        read_offset: offset,
        read_limit: limit,
    };
    let mut plain = Vec::new();
    let mut s = bs.read(read(format!("blobs/{}/{}", d.hash_hex(), d.size()), 0, 0)).await?.into_inner();
    while let Some(m) = s.message().await? {
        plain.extend_from_slice(&m.data);
    }
    assert!(plain == data, "plain read differs");

    // Compressed, from an uncompressed offset: a zstd stream of the rest of the blob.
    let zname = format!("compressed-blobs/zstd/{}/{}", d.hash_hex(), d.size());
    let mut z = Vec::new();
    let mut s = bs.read(read(zname.clone(), 1000, 0)).await?.into_inner();
    while let Some(m) = s.message().await? {
        z.extend_from_slice(&m.data);
    }
    assert!(z.len() < data.len() / 2, "{} compressed bytes for {}", z.len(), data.len());
    assert!(zstd::stream::decode_all(&z[..])? == data[1000..], "compressed read from 1000 differs");
    let err = bs.read(read(zname, 0, 10)).await;
    let code = match err {
        Err(e) => e.code(),
        Ok(r) => r.into_inner().message().await.err().map(|e| e.code()).unwrap_or(tonic::Code::Ok),
    };
    assert_eq!(code, tonic::Code::InvalidArgument, "read_limit on a compressed read");
    let err = bs.read(read(format!("compressed-blobs/lz4/{}/{}", d.hash_hex(), d.size()), 0, 0)).await;
    assert!(err.is_err(), "an unknown compressor was served");

    // Batch reads answer zstd only to clients that accept it, and say so.
    let small = text(12, 50 << 10);
    let sd = Digest::of_bytes(&small);
    let up = reapi::BatchUpdateBlobsRequest {
        requests: vec![batch_update_blobs_request::Request {
            digest: Some(sd.to_proto()),
            data: small.clone().into(),
            compressor: 0,
        }],
        ..Default::default()
    };
    assert_eq!(cas.batch_update_blobs(up).await?.into_inner().responses[0].status.as_ref().map(|s| s.code), Some(0));
    for (acceptable, want) in [(vec![], 0), (vec![ZSTD], ZSTD)] {
        let req = reapi::BatchReadBlobsRequest {
            digests: vec![sd.to_proto()],
            acceptable_compressors: acceptable,
            ..Default::default()
        };
        let r = cas.batch_read_blobs(req).await?.into_inner().responses.remove(0);
        assert_eq!(r.compressor, want);
        let got = if want == ZSTD { zstd::stream::decode_all(&r.data[..])? } else { r.data.to_vec() };
        assert!(got == small, "batch answer differs (compressor {want})");
    }
    let caps = GrpcStore::new(&RemoteConfig::new(&server.url))?.capabilities().await?;
    let cache = caps.cache_capabilities.ok_or("no cache capabilities")?;
    assert_eq!((cache.supported_compressors, cache.supported_batch_update_compressors), (vec![ZSTD], vec![ZSTD]));
    Ok(())
}

#[test]
fn a_compressed_download_resumes_at_its_uncompressed_offset_after_a_server_restart() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let storage = tmp.path().join("storage");
    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut server = ServeProcess::start_on(&storage, &listen)?;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src)?;
    let size = 48usize << 20;
    let big = text(21, size);
    std::fs::write(src.join("big.txt"), &big)?;
    // What the whole file costs on the wire compressed as the server does it (a frame a MiB).
    let mut wire_len = 0u64;
    for c in big.chunks(1 << 20) {
        wire_len += casfs::cas::compress::compress_all(c)?.len() as u64;
    }
    let (code, out, err) = casfs(&["upload", src.to_str().ok_or("path")?, "--remote", &server.url])?;
    assert_eq!(code, 0, "{err}");
    let root = out.trim().to_string();
    let upstream = server.url.strip_prefix("grpc://").ok_or("server url")?.parse()?;
    // 5 MB/s from server to client: the download takes seconds, so it is cut mid-stream.
    let proxy = crate::slow_links::Proxy::start(upstream, 5_000_000, std::time::Duration::ZERO)?;
    let dest = tmp.path().join("dest");
    let mut child = std::process::Command::new(casfs_bin())
        .args(["download", &root])
        .arg(&dest)
        .args(["--remote", &proxy.url(), "--rpc-timeout", "2s", "--compress-threshold", "4K"])
        .env("CASFS_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // The download's bounded resumes end it (bytes or an error), so this loop ends too.
    while proxy.down_bytes() < wire_len / 2 {
        assert!(child.try_wait()?.is_none(), "the download ended before the server was killed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    server.kill();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _server = ServeProcess::start_on(&storage, &listen)?;
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(std::fs::read(dest.join("big.txt"))? == big, "wrong bytes after the restart");
    assert!(stderr.contains("resuming a download"), "the download was not cut: {stderr}");
    // Compressed both before and after the cut, and not read again from byte 0 (that would
    // take half as much again).
    let total = proxy.down_bytes();
    assert!(total < wire_len * 5 / 4, "{total} bytes came through for {wire_len} compressed bytes\n{stderr}");
    Ok(())
}
