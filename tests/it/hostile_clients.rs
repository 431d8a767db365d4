//! Hostile clients against a real `casfs serve`: requests built to make the server read or
//! hold unbounded memory, starve its blocking threads, or plant results, each answered with
//! a clear refusal while the server keeps serving everyone else.

use std::time::Duration;

use bytes::Bytes;
use tonic::transport::Channel;

use casfs::cas::{Cas, GrpcStore, RemoteConfig};
use casfs::digest::{Digest, MAX_SIZE};
use casfs::proto::bytestream::{byte_stream_client::ByteStreamClient, ReadRequest, WriteRequest};
use casfs::proto::reapi::{self, content_addressable_storage_client::ContentAddressableStorageClient};

use crate::common::*;

/// Peak resident memory of a process so far (VmHWM), in MiB.
pub(crate) fn peak_rss_mib(pid: u32) -> TestResult<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).ok_or("no VmHWM")?;
    let kib: u64 = line.split_whitespace().nth(1).ok_or("bad VmHWM")?.parse()?;
    Ok(kib / 1024)
}

/// A plain channel to `url` (`grpc://…`), as a hostile client would open it.
pub(crate) async fn channel(url: &str) -> TestResult<Channel> {
    let http = url.replacen("grpc://", "http://", 1);
    Ok(Channel::from_shared(http)?.connect().await?)
}

fn cas_client(ch: &Channel) -> ContentAddressableStorageClient<Channel> {
    ContentAddressableStorageClient::new(ch.clone()).max_decoding_message_size(64 << 20)
}

fn proto(hash: &str, size: i64) -> reapi::Digest {
    reapi::Digest { hash: hash.to_string(), size_bytes: size }
}

/// Files left in the server's temporary folder (uploads in progress or abandoned).
fn temp_files(storage: &std::path::Path) -> TestResult<usize> {
    Ok(std::fs::read_dir(storage.join("tmp"))?.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_read_whose_sizes_wrap_past_2_64_is_refused_before_reading() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start_with(&tmp.path().join("storage"), "127.0.0.1:0", &["--no-execution"])?;
    let store = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    let blob = Bytes::from(pseudo_random(7, 1 << 20));
    let d = Digest::of_bytes(&blob);
    store.write(&d, blob).await?;
    // 1000 copies of a real 1 MiB blob (1000 MiB to read) plus made-up digests, each within
    // the largest size a digest carries (2^56 - 1), whose sizes bring the sum to exactly
    // 2^64: a wrapping sum sees 0 bytes, under the limit.
    let real = 1000u64 << 20;
    let mut rest = u64::MAX - real + 1;
    let fake = |i: u64| Digest::of_bytes(format!("never stored {i}").as_bytes()).hash_hex();
    let mut digests = vec![d.to_proto(); 1000];
    while rest > 0 {
        let size = rest.min(MAX_SIZE);
        digests.push(proto(&fake(rest), size as i64));
        rest -= size;
    }
    let req = reapi::BatchReadBlobsRequest { digests, ..Default::default() };
    assert!(prost::Message::encoded_len(&req) < 100_000, "the attack is a small request");
    let ch = channel(&server.url).await?;
    let got = cas_client(&ch).batch_read_blobs(req).await;
    let peak = peak_rss_mib(server.child.id())?;
    eprintln!("server peak RSS after the wrap-around batch: {peak} MiB");
    let st = got.err().ok_or("a batch whose sizes add past 2^64 was answered")?;
    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("advertised limit"), "{}", st.message());
    assert!(peak < 256, "the server's peak RSS reached {peak} MiB: it read what it should have refused");
    // Sizes whose sum does not fit 64 bits at all are named as such.
    let mut digests: Vec<_> = (0..300).map(|i| proto(&fake(i), MAX_SIZE as i64)).collect();
    digests.push(d.to_proto());
    let req = reapi::BatchReadBlobsRequest { digests, ..Default::default() };
    let st = cas_client(&ch).batch_read_blobs(req).await.err().ok_or("a sum past 2^64 was answered")?;
    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("2^64"), "{}", st.message());
    // A single size past what any digest carries is refused by name.
    let req = reapi::BatchReadBlobsRequest { digests: vec![proto(&fake(0), i64::MAX)], ..Default::default() };
    let st = cas_client(&ch).batch_read_blobs(req).await.err().ok_or("a size of 2^63 - 1 was answered")?;
    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("largest blob size"), "{}", st.message());
    // Still serving.
    assert_eq!(store.read(&d).await?.len(), 1 << 20);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_digests_in_a_batch_read_are_read_and_answered_once() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let log = tmp.path().join("access.log");
    let log_arg = log.to_string_lossy().into_owned();
    let server = ServeProcess::start_with(
        &tmp.path().join("storage"),
        "127.0.0.1:0",
        &["--no-execution", "--access-log", &log_arg],
    )?;
    let store = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    let (x, y) = (Bytes::from(pseudo_random(1, 1 << 20)), Bytes::from_static(b"small"));
    let (dx, dy) = (Digest::of_bytes(&x), Digest::of_bytes(&y));
    store.write(&dx, x.clone()).await?;
    store.write(&dy, y.clone()).await?;
    std::fs::write(&log, "")?;
    // 3 x 1 MiB + 5 bytes: under the limit only once the duplicates are merged.
    let req = reapi::BatchReadBlobsRequest {
        digests: vec![dx.to_proto(), dy.to_proto(), dx.to_proto(), dx.to_proto(), dx.to_proto()],
        ..Default::default()
    };
    let resp = cas_client(&channel(&server.url).await?).batch_read_blobs(req).await?.into_inner();
    let mut answered: Vec<(Digest, usize)> = resp
        .responses
        .iter()
        .map(|r| Ok((Digest::try_from(r.digest.as_ref().ok_or("no digest")?)?, r.data.len())))
        .collect::<TestResult<_>>()?;
    answered.sort();
    let mut want = vec![(dx, x.len()), (dy, y.len())];
    want.sort();
    assert_eq!(answered, want, "one answer per distinct digest");
    let reads = std::fs::read_to_string(&log)?;
    assert_eq!(reads.lines().filter(|l| l.contains(&dx.hash_hex())).count(), 1, "access log:\n{reads}");
    Ok(())
}

/// Opens an upload of `size` bytes under a made-up digest, sends `first` bytes, and keeps
/// the stream open without sending more; returns the call's result once the server ends it.
fn stalled_upload(
    ch: Channel,
    n: usize,
    size: usize,
    first: usize,
) -> (tokio::sync::mpsc::Sender<WriteRequest>, tokio::task::JoinHandle<Result<i64, tonic::Status>>) {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let hash = Digest::of_bytes(format!("stalled upload {n}").as_bytes()).hash_hex();
    let first = WriteRequest {
        resource_name: format!("uploads/{}/blobs/{hash}/{size}", uuid::Uuid::new_v4()),
        write_offset: 0,
        finish_write: false,
        data: Bytes::from(vec![b'x'; first]),
    };
    let task = tokio::spawn(async move {
        let stream = futures::stream::once(async { first }).chain(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut client = ByteStreamClient::new(ch);
        client.write(stream).await.map(|r| r.into_inner().committed_size)
    });
    (tx, task)
}

use futures::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_hold_no_threads_and_time_out() -> TestResult {
    const STALLED: usize = 300;
    const IDLE: u64 = 20;
    let tmp = tempfile::tempdir()?;
    let storage = tmp.path().join("storage");
    let idle = format!("{IDLE}s");
    let server =
        ServeProcess::start_with(&storage, "127.0.0.1:0", &["--no-execution", "--upload-idle-timeout", &idle])?;
    let store = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    let small = Bytes::from_static(b"a small blob");
    let large = Bytes::from(pseudo_random(3, 3 << 20));
    let (ds, dl) = (Digest::of_bytes(&small), Digest::of_bytes(&large));
    store.write(&ds, small.clone()).await?;
    store.write(&dl, large.clone()).await?;

    // 300 uploads of an 8 MiB blob that send 64 KiB and go quiet, over 10 connections.
    let mut channels = Vec::new();
    for _ in 0..10 {
        channels.push(channel(&server.url).await?);
    }
    let mut senders = Vec::new();
    let mut uploads = Vec::new();
    for n in 0..STALLED {
        let (tx, task) = stalled_upload(channels[n % channels.len()].clone(), n, 8 << 20, 64 << 10);
        senders.push(tx);
        uploads.push(task);
    }
    // Each has reached the store once its temporary file exists.
    let ready = tokio::time::Instant::now() + Duration::from_secs(60);
    while temp_files(&storage)? < STALLED {
        assert!(tokio::time::Instant::now() < ready, "only {} of {STALLED} uploads began", temp_files(&storage)?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Readers on a fresh connection, with a generous functional deadline.
    let ch = channel(&server.url).await?;
    let batch = async {
        let req = reapi::BatchReadBlobsRequest { digests: vec![ds.to_proto()], ..Default::default() };
        cas_client(&ch).batch_read_blobs(req).await
    };
    let stream = async {
        let req = ReadRequest {
            resource_name: format!("blobs/{}/{}", dl.hash_hex(), dl.size()),
            read_offset: 0,
            read_limit: 0,
        };
        let mut s = ByteStreamClient::new(ch.clone()).read(req).await?.into_inner();
        let mut n = 0;
        while let Some(m) = s.message().await? {
            n += m.data.len();
        }
        Ok::<usize, tonic::Status>(n)
    };
    let (b, s) = tokio::time::timeout(Duration::from_secs(30), futures::future::join(batch, stream))
        .await
        .map_err(|_| "BatchReadBlobs and ByteStream.Read were not served while 300 uploads stalled")?;
    let b = b?.into_inner();
    assert_eq!(b.responses.len(), 1);
    assert_eq!(b.responses[0].data, small);
    assert_eq!(s?, large.len());
    let ended = uploads.iter().filter(|u| u.is_finished()).count();
    assert_eq!(ended, 0, "{ended} stalled uploads ended before the reads were done; the reads proved nothing");

    // The idle timeout ends every one of them with a clear status and removes its file.
    for u in uploads {
        let res = tokio::time::timeout(Duration::from_secs(IDLE + 60), u).await.map_err(|_| "upload never ended")??;
        let st = res.err().ok_or("a stalled upload was accepted")?;
        assert_eq!(st.code(), tonic::Code::DeadlineExceeded, "{st:?}");
        assert!(st.message().contains("--upload-idle-timeout"), "{}", st.message());
    }
    drop(senders);
    assert_eq!(temp_files(&storage)?, 0, "aborted uploads left temporary files");
    assert_eq!(store.read(&dl).await?, large);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_stop_reading_hold_no_threads() -> TestResult {
    const STALLED: usize = 600;
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start_with(&tmp.path().join("storage"), "127.0.0.1:0", &["--no-execution"])?;
    let store = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    let big = Bytes::from(pseudo_random(5, 16 << 20));
    let db = Digest::of_bytes(&big);
    store.write(&db, big).await?;
    let small = Bytes::from_static(b"still served");
    let ds = Digest::of_bytes(&small);
    store.write(&ds, small.clone()).await?;
    // 600 reads of a 16 MiB blob whose responses are never consumed (over 4 connections).
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(channel(&server.url).await?);
    }
    let mut held = Vec::new();
    for n in 0..STALLED {
        let req = ReadRequest { resource_name: format!("blobs/{}/{}", db.hash_hex(), db.size()), ..Default::default() };
        let mut c = ByteStreamClient::new(channels[n % channels.len()].clone());
        held.push(c.read(req).await?.into_inner());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ch = channel(&server.url).await?;
    let served = tokio::time::timeout(Duration::from_secs(30), async {
        let req = reapi::BatchReadBlobsRequest { digests: vec![ds.to_proto()], ..Default::default() };
        let b = cas_client(&ch).batch_read_blobs(req).await?.into_inner();
        let req = ReadRequest { resource_name: format!("blobs/{}/{}", ds.hash_hex(), ds.size()), ..Default::default() };
        let mut s = ByteStreamClient::new(ch.clone()).read(req).await?.into_inner();
        let first = s.message().await?.map(|m| m.data);
        Ok::<_, tonic::Status>((b, first))
    })
    .await
    .map_err(|_| "reads were not served while 600 readers held their streams")?;
    let (b, first) = served?;
    assert_eq!(b.responses[0].data, small);
    assert_eq!(first, Some(small));
    drop(held);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upper_case_hex_is_refused_everywhere() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start_with(&tmp.path().join("storage"), "127.0.0.1:0", &["--no-execution"])?;
    let store = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    let data = Bytes::from_static(b"hello\n");
    let d = Digest::of_bytes(&data);
    store.write(&d, data).await?;
    let upper = d.hash_hex().to_uppercase();
    let ch = channel(&server.url).await?;
    let refused = |r: Result<(), tonic::Status>, what: &str| -> TestResult {
        let st = r.err().ok_or_else(|| format!("{what} with an upper-case hash was answered"))?;
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{what}: {st:?}");
        assert!(st.message().contains("lower-case"), "{what}: {}", st.message());
        Ok(())
    };
    let req = reapi::FindMissingBlobsRequest { blob_digests: vec![proto(&upper, 6)], ..Default::default() };
    refused(cas_client(&ch).find_missing_blobs(req).await.map(|_| ()), "FindMissingBlobs")?;
    let req = reapi::BatchReadBlobsRequest { digests: vec![proto(&upper, 6)], ..Default::default() };
    refused(cas_client(&ch).batch_read_blobs(req).await.map(|_| ()), "BatchReadBlobs")?;
    let req = ReadRequest { resource_name: format!("blobs/{upper}/6"), ..Default::default() };
    refused(ByteStreamClient::new(ch.clone()).read(req).await.map(|_| ()), "ByteStream.Read")?;
    // The command line says why too, and the lower-case form still works.
    let (code, _, err) = casfs(&["cat", "--remote", &server.url, &format!("{upper}/6")])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("lower-case"), "{err}");
    let (code, out, err) = casfs(&["cat", "--remote", &server.url, &d.to_string()])?;
    assert_eq!((code, out.as_str()), (0, "hello\n"), "{err}");
    Ok(())
}

/// A Directory with `files` file entries (names padded to `name_len`), distinct by `tag`.
fn directory(tag: usize, files: usize, name_len: usize) -> reapi::Directory {
    let content = Digest::of_bytes(b"");
    reapi::Directory {
        files: (0..files)
            .map(|i| reapi::FileNode {
                name: format!("{tag:06}-{i:06}-{}", "n".repeat(name_len)),
                digest: Some(content.to_proto()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_tree_pages_stay_bounded_whatever_the_client_asks() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start_with(&tmp.path().join("storage"), "127.0.0.1:0", &["--no-execution"])?;
    let store = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    // A wide tree: 2,500 small Directories and 30 of ~150 KB (4.5 MB in all) under one root.
    let mut children = Vec::new();
    let mut blobs = Vec::new();
    for i in 0..2530 {
        let dir = if i < 2500 { directory(i, 1, 0) } else { directory(i, 1000, 130) };
        let (d, bytes) = Digest::of_message(&dir);
        children.push(reapi::DirectoryNode { name: format!("d{i:05}"), digest: Some(d.to_proto()) });
        blobs.push((d, Bytes::from(bytes)));
    }
    let (root, root_bytes) = Digest::of_message(&reapi::Directory { directories: children, ..Default::default() });
    blobs.push((root, Bytes::from(root_bytes)));
    for (d, r) in store.write_many(blobs).await? {
        r.map_err(|e| format!("{d}: {e}"))?;
    }
    // A client with the default 4 MiB message limit asks for 2^31 - 1 Directories a page.
    let ch = channel(&server.url).await?;
    let mut client = ContentAddressableStorageClient::new(ch.clone());
    let ask = |token: &str| reapi::GetTreeRequest {
        root_digest: Some(root.to_proto()),
        page_size: i32::MAX,
        page_token: token.to_string(),
        ..Default::default()
    };
    let mut s = client.get_tree(ask("")).await?.into_inner();
    let (mut total, mut pages, mut tokens) = (0, 0, Vec::new());
    while let Some(page) = s.message().await? {
        assert!(page.directories.len() <= 1000, "a page of {} Directories", page.directories.len());
        assert!(prost::Message::encoded_len(&page) <= 4 << 20);
        total += page.directories.len();
        pages += 1;
        tokens.push(page.next_page_token);
    }
    assert_eq!(total, 2531, "every Directory once");
    assert!(pages >= 4, "{pages} pages");
    assert_eq!(tokens.last().map(String::as_str), Some(""), "the last page says it is the last");
    // Resuming from a token gives the rest; absurd tokens are answered, not fatal.
    let mut rest = 0;
    let mut s = client.get_tree(ask(&tokens[0])).await?.into_inner();
    while let Some(page) = s.message().await? {
        rest += page.directories.len();
    }
    assert_eq!(rest, 2531 - tokens[0].parse::<usize>()?);
    let mut s = client.get_tree(ask(&u64::MAX.to_string())).await?.into_inner();
    let page = s.message().await?.ok_or("no page")?;
    assert!(page.directories.is_empty() && page.next_page_token.is_empty(), "{page:?}");
    let st = client.get_tree(ask("99999999999999999999999")).await.err().ok_or("a bad token was accepted")?;
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    // The casfs client still gets the whole tree through it.
    assert_eq!(store.get_tree(&root).await?.len(), 2531);
    Ok(())
}

/// One Write call carrying `msgs`; the stream then ends.
async fn write_all(ch: &Channel, msgs: Vec<WriteRequest>) -> Result<i64, tonic::Status> {
    let mut c = ByteStreamClient::new(ch.clone());
    c.write(futures::stream::iter(msgs)).await.map(|r| r.into_inner().committed_size)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytestream_lies_are_refused_and_leave_nothing_behind() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let storage = tmp.path().join("storage");
    let server = ServeProcess::start_with(&storage, "127.0.0.1:0", &["--no-execution"])?;
    let ch = channel(&server.url).await?;
    let data = Bytes::from(pseudo_random(9, 6 << 20));
    let d = Digest::of_bytes(&data);
    let name = |size: u64| format!("uploads/{}/blobs/{}/{size}", uuid::Uuid::new_v4(), d.hash_hex());
    let msg = |name: String, off: u64, data: Bytes, finish: bool| WriteRequest {
        resource_name: name,
        write_offset: off as i64,
        finish_write: finish,
        data,
    };
    let half = data.len() as u64 / 2;
    let cases: Vec<(&str, Vec<WriteRequest>)> = vec![
        (
            "an offset that skips bytes",
            vec![msg(name(d.size()), 0, data.slice(..1000), false), msg(String::new(), 2000, data.slice(2000..), true)],
        ),
        ("a first offset past 0", vec![msg(name(d.size()), 5, data.slice(5..), true)]),
        (
            "more bytes than the digest says",
            vec![
                msg(name(d.size()), 0, data.clone(), false),
                msg(String::new(), d.size(), Bytes::from_static(b"extra"), true),
            ],
        ),
        ("a size of 2^62 and a few bytes", vec![msg(name(1 << 62), 0, data.slice(..half as usize), true)]),
        ("a size smaller than the bytes", vec![msg(name(half), 0, data.clone(), true)]),
        ("finish before the end", vec![msg(name(d.size()), 0, data.slice(..half as usize), true)]),
        (
            "a resource name that changes",
            vec![
                msg(name(d.size()), 0, data.slice(..half as usize), false),
                msg(name(d.size()), half, data.slice(half as usize..), true),
            ],
        ),
    ];
    for (what, msgs) in cases {
        let st = write_all(&ch, msgs).await.err().ok_or_else(|| format!("{what}: accepted"))?;
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{what}: {st:?}");
        assert_eq!(temp_files(&storage)?, 0, "{what}: left a temporary file");
    }
    // Nothing was stored; the honest upload then works, and a read asking for 2^63 - 1
    // bytes from an offset gets exactly the rest of the blob.
    let store = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    assert_eq!(store.find_missing(&[d]).await?, vec![d]);
    store.write(&d, data.clone()).await?;
    let req = ReadRequest {
        resource_name: format!("blobs/{}/{}", d.hash_hex(), d.size()),
        read_offset: 5,
        read_limit: i64::MAX,
    };
    let mut s = ByteStreamClient::new(ch.clone()).read(req).await?.into_inner();
    let mut got = Vec::new();
    while let Some(m) = s.message().await? {
        got.extend_from_slice(&m.data);
    }
    assert_eq!(got, data.slice(5..));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_missing_with_a_huge_list_is_answered_within_the_message_limit() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start_with(&tmp.path().join("storage"), "127.0.0.1:0", &["--no-execution"])?;
    let ch = channel(&server.url).await?;
    let made_up = |n: usize| Digest::of_bytes(format!("absent {n}").as_bytes()).to_proto();
    // 90,000 digests (under the 8 MiB message limit), each absent one named twice: each is
    // reported once.
    let mut list: Vec<reapi::Digest> = (0..45_000).map(made_up).collect();
    list.extend((0..45_000).map(made_up));
    let req = reapi::FindMissingBlobsRequest { blob_digests: list, ..Default::default() };
    let missing = cas_client(&ch).find_missing_blobs(req).await?.into_inner().missing_blob_digests;
    assert_eq!(missing.len(), 45_000);
    // Past the message limit: refused as a whole, and the server goes on.
    let req =
        reapi::FindMissingBlobsRequest { blob_digests: (0..200_000).map(made_up).collect(), ..Default::default() };
    let st = cas_client(&ch).find_missing_blobs(req).await.err().ok_or("a 15 MB request was decoded")?;
    assert!(matches!(st.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted), "{st:?}");
    let req = reapi::FindMissingBlobsRequest { blob_digests: vec![made_up(1)], ..Default::default() };
    assert_eq!(
        cas_client(&channel(&server.url).await?).find_missing_blobs(req).await?.into_inner().missing_blob_digests.len(),
        1
    );
    assert!(peak_rss_mib(server.child.id())? < 256);
    Ok(())
}
