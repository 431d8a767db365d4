//! End to end through a real `casfs serve` process: CLI round trip of a large varied tree,
//! and bad input (mismatched writes, missing blobs, malformed names and digests, a server
//! killed mid-upload).

use std::time::Duration;

use bytes::Bytes;
use tonic::transport::Channel;

use casfs::cas::{Cas, GrpcStore, RemoteConfig};
use casfs::digest::Digest;
use casfs::proto::bytestream::byte_stream_client::ByteStreamClient;
use casfs::proto::bytestream::{ReadRequest, WriteRequest};
use casfs::proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use casfs::proto::reapi::{self, batch_update_blobs_request};

use crate::common::*;

#[test]
fn cli_round_trip_of_a_large_varied_tree() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    let spec = TreeSpec { files: 10_000, dirs: 300, large: vec![50 << 20, 12 << 20, (3 << 20) + 1, 1 << 20] };
    generate_tree(&src, &spec)?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;

    let (code, out, err) = casfs(&["upload", src.to_str().ok_or("path")?, "--remote", &server.url])?;
    assert_eq!(code, 0, "upload failed: {err}");
    let root = out.trim().to_string();
    Digest::parse(&root)?;

    // A second upload finds nothing missing and sends nothing.
    let (code, out2, err2) = casfs(&["upload", src.to_str().ok_or("path")?, "--remote", &server.url])?;
    assert_eq!(code, 0, "{err2}");
    assert_eq!(out2.trim(), root);
    assert!(err2.contains("uploaded 0 of"), "second upload sent blobs: {err2}");

    let dest = tmp.path().join("dest");
    let (code, _, err) = casfs(&["download", &root, dest.to_str().ok_or("path")?, "--remote", &server.url])?;
    assert_eq!(code, 0, "download failed: {err}");
    diff_r(&src, &dest)?;
    assert_eq!(reapi_modes(listing(&src)?), listing(&dest)?);

    // ls shows the root entries; cat of a file gives its bytes.
    let (code, ls, _) = casfs(&["ls", &root, "--remote", &server.url])?;
    assert_eq!(code, 0);
    assert!(ls.contains("self-link -> ."), "{ls}");
    Ok(())
}

#[test]
fn malformed_digest_on_the_cli_is_one_line_and_exit_2() -> TestResult {
    for bad in ["nothex/12", "abc/1", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/-4", "x"] {
        for cmd in [vec!["cat", bad], vec!["ls", bad], vec!["download", bad, "/tmp/never-created-by-casfs"]] {
            let (code, out, err) = casfs(&cmd)?;
            assert_eq!(code, 2, "{cmd:?}: {err}");
            assert!(out.is_empty());
            assert_eq!(err.trim_end().lines().count(), 1, "{cmd:?} printed {err:?}");
            assert!(err.contains("invalid digest"), "{err}");
        }
    }
    Ok(())
}

async fn raw(url: &str) -> TestResult<(ContentAddressableStorageClient<Channel>, ByteStreamClient<Channel>)> {
    let ch = Channel::from_shared(url.replace("grpc://", "http://"))?.connect().await?;
    Ok((ContentAddressableStorageClient::new(ch.clone()), ByteStreamClient::new(ch)))
}

fn blob_files(storage: &std::path::Path) -> usize {
    walk_count(&storage.join("cas"))
}

fn walk_count(p: &std::path::Path) -> usize {
    std::fs::read_dir(p)
        .map(|rd| rd.flatten().map(|e| if e.path().is_dir() { walk_count(&e.path()) } else { 1 }).sum())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_bad_input_and_stores_nothing() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let storage = tmp.path().join("storage");
    let server = ServeProcess::start(&storage)?;
    let (mut cas, mut bs) = raw(&server.url).await?;
    let real = Digest::of_bytes(b"real content");

    // BatchUpdateBlobs with bytes that do not match: per-blob INVALID_ARGUMENT.
    let resp = cas
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(real.to_proto()),
                data: Bytes::from_static(b"fake content"),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(resp.responses[0].status.as_ref().map(|s| s.code), Some(tonic::Code::InvalidArgument as i32));

    // ByteStream Write with bytes that do not match: INVALID_ARGUMENT.
    let name = format!("uploads/{}/blobs/{}/{}", uuid::Uuid::new_v4(), real.hash_hex(), real.size());
    let req = WriteRequest {
        resource_name: name,
        write_offset: 0,
        finish_write: true,
        data: Bytes::from_static(b"fake content"),
    };
    let err = bs.write(futures::stream::iter(vec![req])).await.expect_err("mismatch accepted");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // Nothing of it was stored.
    let missing = cas
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            blob_digests: vec![real.to_proto()],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(missing.missing_blob_digests.len(), 1);
    assert_eq!(blob_files(&storage), 0);

    // Reading a missing blob: NOT_FOUND (ByteStream and batch).
    let read = ReadRequest {
        resource_name: format!("blobs/{}/{}", real.hash_hex(), real.size()),
        read_offset: 0,
        read_limit: 0,
    };
    let mut stream = bs.read(read).await.map(|r| r.into_inner());
    let code = match &mut stream {
        Err(e) => e.code(),
        Ok(s) => s.message().await.expect_err("missing blob read").code(),
    };
    assert_eq!(code, tonic::Code::NotFound);

    // Malformed resource names and digests: INVALID_ARGUMENT.
    for name in ["", "blobs/xyz/3", "blobs/abc", "nope/123", &format!("blobs/{}/-1", real.hash_hex())] {
        let read = ReadRequest { resource_name: name.to_string(), read_offset: 0, read_limit: 0 };
        let code = match bs.read(read).await {
            Err(e) => e.code(),
            Ok(s) => s.into_inner().message().await.expect_err("bad name read").code(),
        };
        assert_eq!(code, tonic::Code::InvalidArgument, "read {name:?}");
        let w =
            WriteRequest { resource_name: name.to_string(), write_offset: 0, finish_write: true, data: Bytes::new() };
        let err = bs.write(futures::stream::iter(vec![w])).await.expect_err("bad name write");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "write {name:?}");
    }
    let bad = reapi::Digest { hash: "zz".into(), size_bytes: 1 };
    let err = cas
        .find_missing_blobs(reapi::FindMissingBlobsRequest { blob_digests: vec![bad], ..Default::default() })
        .await
        .expect_err("bad digest");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // A batch over the advertised limit: INVALID_ARGUMENT.
    let chunk = Bytes::from(pseudo_random(1, 1 << 20));
    let d = Digest::of_bytes(&chunk);
    let requests = (0..5)
        .map(|_| batch_update_blobs_request::Request { digest: Some(d.to_proto()), data: chunk.clone(), compressor: 0 })
        .collect();
    let err = cas
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest { requests, ..Default::default() })
        .await
        .expect_err("oversized batch");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_upload_leaves_no_partial_blob() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let storage = tmp.path().join("storage");
    let mut server = ServeProcess::start(&storage)?;
    let data = Bytes::from(pseudo_random(5, 16 << 20));
    let digest = Digest::of_bytes(&data);
    let (_, mut bs) = raw(&server.url).await?;

    // Send 4 MiB of 16, then hold the stream open while the server is killed.
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(8);
    let name = format!("uploads/{}/blobs/{}/{}", uuid::Uuid::new_v4(), digest.hash_hex(), digest.size());
    let upload = tokio::spawn(async move { bs.write(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    for i in 0..4usize {
        let piece = data.slice(i << 20..(i + 1) << 20);
        tx.send(WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: (i << 20) as i64,
            finish_write: false,
            data: piece,
        })
        .await?;
    }
    // Wait until the partial bytes reached the server's temporary file.
    let tmpdir = storage.join("tmp");
    let mut partial = false;
    for _ in 0..200 {
        partial = std::fs::read_dir(&tmpdir)?.flatten().any(|e| e.metadata().map(|m| m.len() > 0).unwrap_or(false));
        if partial {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(partial, "the server never started writing the upload");
    server.kill();
    let res = tokio::time::timeout(Duration::from_secs(20), upload).await?;
    assert!(res?.is_err(), "upload to a killed server reported success");
    assert_eq!(blob_files(&storage), 0, "a partial blob became visible");

    // Restarted on the same storage: the blob is missing, the leftovers are gone, and a
    // complete upload through the client works.
    let server = ServeProcess::start(&storage)?;
    assert_eq!(std::fs::read_dir(&tmpdir)?.count(), 0, "temporary files survived a restart");
    let client = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    assert_eq!(client.find_missing(&[digest]).await?, vec![digest]);
    client.write(&digest, data.clone()).await?;
    assert_eq!(client.read(&digest).await?, data);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_tree_pages_through_large_trees() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    generate_tree(&src, &TreeSpec { files: 3_000, dirs: 1_500, large: vec![] })?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let client = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    let report = casfs::transfer::upload_dir(&client, &src, false).await?;
    let local = casfs::tree::build_local_tree(&src, &|_| {})?;

    // Raw pages of 100: every Directory arrives once, across many pages.
    let (mut cas, _) = raw(&server.url).await?;
    let mut token = String::new();
    let mut seen = std::collections::HashSet::new();
    let mut pages = 0;
    loop {
        let req = reapi::GetTreeRequest {
            root_digest: Some(report.root.to_proto()),
            page_size: 100,
            page_token: token.clone(),
            ..Default::default()
        };
        let mut stream = cas.get_tree(req).await?.into_inner();
        let mut next = String::new();
        // The server streams every page in one call; a client that stops early resumes
        // with the last token it got.
        while let Some(page) = stream.message().await? {
            for d in page.directories {
                seen.insert(Digest::of_message(&d).0);
            }
            next = page.next_page_token;
            pages += 1;
        }
        if next.is_empty() {
            break;
        }
        token = next;
    }
    let want: std::collections::HashSet<Digest> = local.directories.keys().copied().collect();
    assert_eq!(seen, want);
    assert!(want.len() > 1000, "only {} distinct Directories", want.len());
    assert_eq!(pages, want.len().div_ceil(100));
    // The client's get_tree follows the server's default paging and validates everything.
    assert_eq!(client.get_tree(&report.root).await?.len(), want.len());
    Ok(())
}
