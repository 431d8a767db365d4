//! The Remote Asset API of `casfs serve`: push and fetch records, downloads from allowed URLs
//! only (redirects included), checksums checked, size bounded, and records that outlive the
//! origin server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine;
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use casfs::cas::asset::{fetch, push, AssetKind};
use casfs::cas::{Cas, GrpcStore, RemoteConfig};
use casfs::digest::Digest;
use casfs::proto::asset::{fetch_client::FetchClient, push_client::PushClient, FetchBlobRequest, PushBlobRequest};

use crate::common::*;

fn sri(data: &[u8]) -> String {
    format!("sha256-{}", base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(data)))
}

fn code(e: &casfs::error::Error) -> tonic::Code {
    e.code()
}

/// A tiny HTTP/1.1 origin on 127.0.0.1: `/file` is `body`, `/redirect` points at `to`,
/// anything else 404. Counts the requests it answers; stops when dropped.
struct Origin {
    url: String,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn origin(body: Vec<u8>, redirect_to: String) -> TestResult<Origin> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let hits = Arc::new(AtomicUsize::new(0));
    let (h, body) = (hits.clone(), Arc::new(body));
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (h, body, to) = (h.clone(), body.clone(), redirect_to.clone());
            tokio::spawn(async move {
                let mut req = vec![0u8; 4096];
                let n = s.read(&mut req).await.unwrap_or(0);
                let line = String::from_utf8_lossy(&req[..n]).lines().next().unwrap_or("").to_string();
                h.fetch_add(1, Ordering::SeqCst);
                let head = if line.starts_with("GET /file ") {
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
                } else if line.starts_with("GET /redirect ") {
                    format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
                };
                let _ = s.write_all(head.as_bytes()).await;
                if line.starts_with("GET /file ") {
                    let _ = s.write_all(&body).await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(Origin { url, hits, task })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_fetch_records_and_refuse_what_is_wrong() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let store = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    let data = pseudo_random(7, 100_000);
    let d = Digest::of_bytes(&data);
    store.write(&d, data.clone().into()).await?;
    let uri = vec!["https://example.invalid/pkg-1.0.tar.gz".to_string()];
    let good = vec![("checksum.sri".to_string(), sri(&data))];

    // BuildStream's start-up probe: empty requests are INVALID_ARGUMENT.
    let mut f = FetchClient::new(store.conn());
    let e = f.fetch_blob(FetchBlobRequest::default()).await.expect_err("empty fetch");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let mut p = PushClient::new(store.conn());
    let e = p.push_blob(PushBlobRequest::default()).await.expect_err("empty push");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // Nothing recorded and no downloads allowed: NOT_FOUND, an RPC error.
    let e = fetch(&store, AssetKind::Blob, &uri, &good).await.expect_err("no record");
    assert_eq!(code(&e), tonic::Code::NotFound, "{e}");

    push(&store, AssetKind::Blob, &uri, &good, &d).await?;
    assert_eq!(fetch(&store, AssetKind::Blob, &uri, &good).await?, d);
    // Qualifiers are part of the name.
    let e = fetch(&store, AssetKind::Blob, &uri, &[]).await.expect_err("other qualifiers");
    assert_eq!(code(&e), tonic::Code::NotFound, "{e}");

    // A record must not lie about its checksum, nor name what the CAS lacks.
    let bad = vec![("checksum.sri".to_string(), sri(b"something else"))];
    let e = push(&store, AssetKind::Blob, &uri, &bad, &d).await.expect_err("wrong checksum");
    assert_eq!(code(&e), tonic::Code::InvalidArgument, "{e}");
    assert!(e.to_string().contains("checksum mismatch"), "{e}");
    let absent = Digest::of_bytes(b"never uploaded");
    let e = push(&store, AssetKind::Blob, &uri, &[], &absent).await.expect_err("absent blob");
    assert_eq!(code(&e), tonic::Code::FailedPrecondition, "{e}");

    // Directory records: the whole tree must be there.
    let dir = tmp.path().join("tree");
    std::fs::create_dir_all(dir.join("sub"))?;
    std::fs::write(dir.join("sub/f"), b"x")?;
    let root = casfs::transfer::upload_dir(&store, &dir, false).await?.root;
    push(&store, AssetKind::Directory, &uri, &[], &root).await?;
    assert_eq!(fetch(&store, AssetKind::Directory, &uri, &[]).await?, root);

    // A server that takes no client records refuses pushes.
    let locked = ServeProcess::start_with(&tmp.path().join("locked"), "127.0.0.1:0", &["--ac-writes", "none"])?;
    let store = GrpcStore::new(&RemoteConfig::new(&locked.url))?;
    store.write(&d, data.into()).await?;
    let e = push(&store, AssetKind::Blob, &uri, &[], &d).await.expect_err("--ac-writes none");
    assert_eq!(code(&e), tonic::Code::PermissionDenied, "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_only_what_is_allowed_and_remembers_it() -> TestResult {
    let data = pseudo_random(8, 300_000);
    let elsewhere = origin(b"not allowed".to_vec(), String::new()).await?;
    let o = origin(data.clone(), format!("{}/file", elsewhere.url)).await?;
    let tmp = tempfile::tempdir()?;
    let allow = format!("{}/", o.url);
    let server = ServeProcess::start_with(
        &tmp.path().join("storage"),
        "127.0.0.1:0",
        &["--asset-fetch", &allow, "--asset-max-size", "200000"],
    )?;
    let store = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    let file = vec![format!("{}/file", o.url)];
    let good = vec![("checksum.sri".to_string(), sri(&data))];

    // Larger than --asset-max-size.
    let e = fetch(&store, AssetKind::Blob, &file, &good).await.expect_err("too big");
    assert_eq!(code(&e), tonic::Code::ResourceExhausted, "{e}");
    drop(server);
    let server = ServeProcess::start_with(&tmp.path().join("storage"), "127.0.0.1:0", &["--asset-fetch", &allow])?;
    let store = GrpcStore::new(&RemoteConfig::new(&server.url))?;

    // A wrong checksum fails clearly and records nothing.
    let bad = vec![("checksum.sri".to_string(), sri(b"other"))];
    let e = fetch(&store, AssetKind::Blob, &file, &bad).await.expect_err("wrong checksum");
    assert_eq!(code(&e), tonic::Code::InvalidArgument, "{e}");
    assert!(e.to_string().contains("checksum mismatch"), "{e}");

    // Downloaded, verified, stored, recorded.
    let d = fetch(&store, AssetKind::Blob, &file, &good).await?;
    assert_eq!(d, Digest::of_bytes(&data));
    assert_eq!(&store.read(&d).await?[..], &data[..]);

    // Not allowed: other prefixes, and a redirect that leaves the allowed prefix.
    let e = fetch(&store, AssetKind::Blob, &[format!("{}/file", elsewhere.url)], &[]).await.expect_err("not allowed");
    assert_eq!(code(&e), tonic::Code::NotFound, "{e}");
    let e = fetch(&store, AssetKind::Blob, &[format!("{}/redirect", o.url)], &[]).await.expect_err("redirect out");
    assert!(e.to_string().contains("does not allow"), "{e}");
    assert_eq!(elsewhere.hits.load(Ordering::SeqCst), 0, "the disallowed origin was contacted");
    let e = fetch(&store, AssetKind::Blob, &[format!("{}/missing", o.url)], &[]).await.expect_err("404");
    assert_eq!(code(&e), tonic::Code::NotFound, "{e}");

    // The origin gone: the record answers.
    let before = o.hits.load(Ordering::SeqCst);
    drop(o);
    assert_eq!(fetch(&store, AssetKind::Blob, &file, &good).await?, d);
    assert!(before > 0);
    Ok(())
}
