//! Client connection options against real servers: unix sockets, TLS with a CA file, extra
//! headers, retries while the server is down, and a clear failure when it stays down.

use std::time::{Duration, Instant};

use bytes::Bytes;

use casfs::cas::{Cas, GrpcStore, RemoteConfig};
use casfs::digest::Digest;
use casfs::proto::reapi;
use casfs::proto::reapi::capabilities_server::{Capabilities, CapabilitiesServer};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_endpoint() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let sock = tmp.path().join("casfs.sock");
    let server = ServeProcess::start_on(&tmp.path().join("storage"), &format!("unix:{}", sock.display()))?;
    assert!(server.url.starts_with("unix:"), "{}", server.url);
    let client = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    let data = Bytes::from_static(b"over a unix socket");
    let d = Digest::of_bytes(&data);
    client.write(&d, data.clone()).await?;
    assert_eq!(client.read(&d).await?, data);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_ca_file() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let (cert, key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem())?;
    std::fs::write(&key, ck.signing_key.serialize_pem())?;
    let mut child = std::process::Command::new(casfs_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--storage"])
        .arg(tmp.path().join("storage"))
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().ok_or("stdout")?), &mut line)?;
    let url = line.trim().strip_prefix("casfs: serving on ").ok_or("no url")?.replace("127.0.0.1", "localhost");
    assert!(url.starts_with("grpcs://"), "{url}");

    let mut cfg = RemoteConfig::new(&url);
    cfg.tls_ca_file = Some(cert.clone());
    let client = GrpcStore::new(&cfg)?;
    let data = Bytes::from_static(b"over TLS");
    let d = Digest::of_bytes(&data);
    let res = async {
        client.write(&d, data.clone()).await?;
        client.read(&d).await
    }
    .await;

    // Without the CA the handshake fails: system roots do not trust a self-signed cert.
    let mut untrusted = RemoteConfig::new(&url);
    untrusted.retries = 0;
    let refused = GrpcStore::new(&untrusted)?.read(&d).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(res?, data);
    assert!(refused.is_err(), "an untrusted certificate was accepted");
    Ok(())
}

/// Answers Capabilities only when the expected token came with the call.
struct Guarded;

#[tonic::async_trait]
impl Capabilities for Guarded {
    async fn get_capabilities(
        &self,
        _req: tonic::Request<reapi::GetCapabilitiesRequest>,
    ) -> Result<tonic::Response<reapi::ServerCapabilities>, tonic::Status> {
        Ok(tonic::Response::new(reapi::ServerCapabilities::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_headers_reach_the_server() -> TestResult {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let check = |req: tonic::Request<()>| match req.metadata().get("authorization").and_then(|v| v.to_str().ok()) {
        Some("Bearer s3cret") => Ok(req),
        _ => Err(tonic::Status::unauthenticated("missing token")),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CapabilitiesServer::with_interceptor(Guarded, check))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let url = format!("grpc://{addr}");
    let without = GrpcStore::new(&RemoteConfig::new(&url))?.capabilities().await;
    assert!(matches!(&without, Err(e) if e.code() == tonic::Code::Unauthenticated), "{without:?}");
    let mut cfg = RemoteConfig::new(&url);
    cfg.headers.push(casfs::cas::parse_header("Authorization=Bearer s3cret")?);
    GrpcStore::new(&cfg)?.capabilities().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_until_the_server_comes_up() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let port = free_port()?;
    let client = GrpcStore::new(&RemoteConfig::new(format!("grpc://127.0.0.1:{port}")))?;
    let d = Digest::of_bytes(b"later");
    let call = tokio::spawn(async move { client.find_missing(&[d]).await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let _server = ServeProcess::start_on(&tmp.path().join("storage"), &format!("127.0.0.1:{port}"))?;
    let missing = tokio::time::timeout(Duration::from_secs(30), call).await???;
    assert_eq!(missing, vec![d]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_is_a_clear_unavailable_error_not_a_hang() -> TestResult {
    let port = free_port()?;
    let mut cfg = RemoteConfig::new(format!("grpc://127.0.0.1:{port}"));
    cfg.retries = 2;
    let client = GrpcStore::new(&cfg)?;
    let started = Instant::now();
    let err = client.read(&Digest::of_bytes(b"x")).await.expect_err("no server");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    eprintln!("dead server reported after {:?}: {err}", started.elapsed());
    Ok(())
}

/// Starts `casfs serve` with `extra` arguments; returns the child and its URL.
fn serve_with(storage: &std::path::Path, extra: &[&std::ffi::OsStr]) -> TestResult<(std::process::Child, String)> {
    let mut child = std::process::Command::new(casfs_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--no-execution", "--storage"])
        .arg(storage)
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().ok_or("stdout")?), &mut line)?;
    let url = line.trim().strip_prefix("casfs: serving on ").ok_or("no url")?.replace("127.0.0.1", "localhost");
    Ok((child, url))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_or_a_client_certificate_is_required_when_configured() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let data = Bytes::from_static(b"guarded");
    let d = Digest::of_bytes(&data);

    // Bearer token.
    std::fs::write(tmp.path().join("token"), "s3cret\n")?;
    let (mut child, url) =
        serve_with(&tmp.path().join("a"), &["--auth-token-file".as_ref(), tmp.path().join("token").as_os_str()])?;
    let mut anonymous = RemoteConfig::new(&url);
    anonymous.retries = 0;
    let refused = GrpcStore::new(&anonymous)?.write(&d, data.clone()).await;
    let mut wrong = anonymous.clone();
    wrong.headers.push(("authorization".into(), "Bearer guess".into()));
    let wrong_refused = GrpcStore::new(&wrong)?.read(&d).await;
    let mut good = anonymous.clone();
    good.headers.push(("authorization".into(), "Bearer s3cret".into()));
    let client = GrpcStore::new(&good)?;
    let ok = async {
        client.write(&d, data.clone()).await?;
        client.read(&d).await
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(refused.err().ok_or("accepted without a token")?.code(), tonic::Code::Unauthenticated);
    assert_eq!(wrong_refused.err().ok_or("accepted a wrong token")?.code(), tonic::Code::Unauthenticated);
    assert_eq!(ok?, data);

    // TLS client certificates signed by a CA the server trusts.
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate()?)?;
    let client_key = rcgen::KeyPair::generate()?;
    let client_cert = rcgen::CertificateParams::new(vec!["client".to_string()])?.signed_by(&client_key, &ca)?;
    let server = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let p = |n: &str| tmp.path().join(n);
    std::fs::write(p("ca.pem"), ca.pem())?;
    std::fs::write(p("client.pem"), client_cert.pem())?;
    std::fs::write(p("client.key"), client_key.serialize_pem())?;
    std::fs::write(p("server.pem"), server.cert.pem())?;
    std::fs::write(p("server.key"), server.signing_key.serialize_pem())?;
    let args: Vec<std::ffi::OsString> = vec![
        "--tls-cert".into(),
        p("server.pem").into(),
        "--tls-key".into(),
        p("server.key").into(),
        "--tls-client-ca".into(),
        p("ca.pem").into(),
    ];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let (mut child, url) = serve_with(&p("b"), &args)?;
    let mut no_cert = RemoteConfig::new(&url);
    no_cert.retries = 0;
    no_cert.tls_ca_file = Some(p("server.pem"));
    let refused = GrpcStore::new(&no_cert)?.read(&d).await;
    let mut with_cert = no_cert.clone();
    with_cert.tls_client_identity = Some((p("client.pem"), p("client.key")));
    let client = GrpcStore::new(&with_cert)?;
    let ok = async {
        client.write(&d, data.clone()).await?;
        client.read(&d).await
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(refused.is_err(), "a client without a certificate was served");
    assert_eq!(ok?, data);
    Ok(())
}
