//! Downloads for the Remote Asset Fetch service: only URLs under an allowed prefix (redirects
//! included), size-bounded, streamed to a temporary file while hashed, checked against
//! `checksum.sri` when the client names one.

use std::io::Write;
use std::time::Duration;

use base64::Engine;
use futures::StreamExt;
use sha2::Digest as _;

use crate::digest::{Digest, Hasher};
use crate::error::{Error, IoContext, Result};

/// What the server may download by itself.
#[derive(Clone, Debug)]
pub struct AssetFetch {
    /// URL prefixes the server may fetch (`https://mirror.example/`); empty = none, the
    /// default: Fetch then answers only from pushed or earlier fetched records.
    pub allow: Vec<String>,
    /// Largest download accepted.
    pub max_bytes: u64,
    /// Longest download when the request sets no timeout (and the most a request may ask).
    pub timeout: Duration,
    /// Downloads running at once; more wait.
    pub concurrency: usize,
}

impl Default for AssetFetch {
    fn default() -> Self {
        AssetFetch { allow: Vec::new(), max_bytes: 4 << 30, timeout: Duration::from_secs(300), concurrency: 8 }
    }
}

impl AssetFetch {
    /// Whether `url` is http(s) and under an allowed prefix.
    pub fn allows(&self, url: &str) -> bool {
        (url.starts_with("http://") || url.starts_with("https://")) && self.allow.iter().any(|p| url.starts_with(p))
    }
}

/// A `checksum.sri` value: one or more `ALGO-BASE64` options; content matching any passes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sri(Vec<(Algo, Vec<u8>)>);

/// Hash functions of Subresource Integrity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    /// sha256
    Sha256,
    /// sha384
    Sha384,
    /// sha512
    Sha512,
}

impl std::str::FromStr for Sri {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let mut out = Vec::new();
        for option in s.split_whitespace() {
            // Options may carry `?ext` after the hash; it changes nothing here.
            let option = option.split('?').next().unwrap_or(option);
            let Some((algo, b64)) = option.split_once('-') else {
                return Err(Error::InvalidArgument(format!("checksum.sri {s:?} is not ALGO-BASE64")));
            };
            let (algo, len) = match algo {
                "sha256" => (Algo::Sha256, 32),
                "sha384" => (Algo::Sha384, 48),
                "sha512" => (Algo::Sha512, 64),
                other => return Err(Error::InvalidArgument(format!("checksum.sri: hash {other:?} is not supported"))),
            };
            let hash = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| Error::InvalidArgument(format!("checksum.sri {s:?}: {e}")))?;
            if hash.len() != len {
                return Err(Error::InvalidArgument(format!("checksum.sri {s:?}: wrong hash length")));
            }
            out.push((algo, hash));
        }
        if out.is_empty() {
            return Err(Error::InvalidArgument("checksum.sri is empty".into()));
        }
        Ok(Sri(out))
    }
}

/// Hashes content for every algorithm an [`Sri`] names.
#[derive(Default)]
pub struct SriHasher {
    sha256: Option<sha2::Sha256>,
    sha384: Option<sha2::Sha384>,
    sha512: Option<sha2::Sha512>,
}

impl SriHasher {
    /// A hasher for what `sri` can check.
    pub fn new(sri: &Sri) -> Self {
        let mut h = SriHasher::default();
        for (algo, _) in &sri.0 {
            match algo {
                Algo::Sha256 => h.sha256 = Some(sha2::Sha256::new()),
                Algo::Sha384 => h.sha384 = Some(sha2::Sha384::new()),
                Algo::Sha512 => h.sha512 = Some(sha2::Sha512::new()),
            }
        }
        h
    }

    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        if let Some(h) = &mut self.sha256 {
            h.update(data);
        }
        if let Some(h) = &mut self.sha384 {
            h.update(data);
        }
        if let Some(h) = &mut self.sha512 {
            h.update(data);
        }
    }

    /// Ok when the content matches one of `sri`'s options; else an error naming what it is.
    pub fn check(self, sri: &Sri, what: &str) -> Result<()> {
        let got: Vec<(Algo, Vec<u8>)> = [
            self.sha256.map(|h| (Algo::Sha256, h.finalize().to_vec())),
            self.sha384.map(|h| (Algo::Sha384, h.finalize().to_vec())),
            self.sha512.map(|h| (Algo::Sha512, h.finalize().to_vec())),
        ]
        .into_iter()
        .flatten()
        .collect();
        if sri.0.iter().any(|want| got.contains(want)) {
            return Ok(());
        }
        let b64 = |(a, h): &(Algo, Vec<u8>)| {
            format!("{}-{}", format!("{a:?}").to_lowercase(), base64::engine::general_purpose::STANDARD.encode(h))
        };
        let got = got.iter().map(b64).collect::<Vec<_>>().join(" ");
        let want = sri.0.iter().map(b64).collect::<Vec<_>>().join(" ");
        Err(Error::InvalidArgument(format!("checksum mismatch for {what}: it is {got}, checksum.sri asks for {want}")))
    }
}

/// The HTTP client of one server: built once (system roots loaded once, connections
/// reused), following redirects only to allowed URLs.
pub struct Downloader {
    cfg: AssetFetch,
    client: reqwest::Client,
}

impl Downloader {
    /// A client for what `cfg` allows.
    pub fn new(cfg: AssetFetch) -> Result<Self> {
        let allow = cfg.clone();
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 10 {
                attempt.error("too many redirects")
            } else if allow.allows(attempt.url().as_str()) {
                attempt.follow()
            } else {
                let to = attempt.url().to_string();
                attempt.error(format!("redirected to {to}, which --asset-fetch does not allow"))
            }
        });
        let client = reqwest::Client::builder()
            .redirect(policy)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(30)))
            .build()
            .map_err(|e| Error::Internal(format!("HTTP client: {e}")))?;
        Ok(Downloader { cfg, client })
    }

    /// What this client may fetch.
    pub fn config(&self) -> &AssetFetch {
        &self.cfg
    }

    /// Downloads `url` (headers from `http_header:NAME` qualifiers) into a temporary file
    /// under `dir`, hashing it; returns the file and its digest.
    pub async fn download(
        &self,
        url: &str,
        headers: &[(String, String)],
        sri: Option<&Sri>,
        timeout: Duration,
        dir: &std::path::Path,
    ) -> Result<(tempfile::NamedTempFile, Digest)> {
        download(&self.cfg, &self.client, url, headers, sri, timeout, dir).await
    }
}

async fn download(
    cfg: &AssetFetch,
    client: &reqwest::Client,
    url: &str,
    headers: &[(String, String)],
    sri: Option<&Sri>,
    timeout: Duration,
    dir: &std::path::Path,
) -> Result<(tempfile::NamedTempFile, Digest)> {
    let mut req = client.get(url).timeout(timeout);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let unavailable = |e: reqwest::Error| {
        // reqwest's own message leaves out the cause (the redirect policy's refusal, the
        // connection error): name the whole chain.
        let mut why = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            why = format!("{why}: {s}");
            source = s.source();
        }
        if e.is_timeout() {
            Error::DeadlineExceeded(format!("downloading {url}: {why}"))
        } else if e.is_redirect() {
            Error::FailedPrecondition(format!("downloading {url}: {why}"))
        } else {
            Error::Unavailable(format!("downloading {url}: {why}"))
        }
    };
    let resp = req.send().await.map_err(unavailable)?;
    let code = resp.status();
    if code == reqwest::StatusCode::NOT_FOUND {
        return Err(Error::NotFound(format!("{url} (HTTP 404)")));
    }
    if !code.is_success() {
        return Err(Error::Unavailable(format!("downloading {url}: HTTP {code}")));
    }
    if resp.content_length().is_some_and(|n| n > cfg.max_bytes) {
        return Err(too_big(url, cfg.max_bytes));
    }
    let mut file = tempfile::NamedTempFile::new_in(dir).ctx(|| format!("temporary file in {}", dir.display()))?;
    let mut hasher = Hasher::new();
    let mut sri_hasher = sri.map(SriHasher::new);
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(unavailable)?;
        if hasher.len() + chunk.len() as u64 > cfg.max_bytes {
            return Err(too_big(url, cfg.max_bytes));
        }
        hasher.update(&chunk);
        if let Some(h) = &mut sri_hasher {
            h.update(&chunk);
        }
        // Small writes to a local file; the download's own pace dominates.
        file.write_all(&chunk).ctx(|| "writing a download".into())?;
    }
    file.flush().ctx(|| "writing a download".into())?;
    if let (Some(h), Some(sri)) = (sri_hasher, sri) {
        h.check(sri, url)?;
    }
    Ok((file, hasher.finish()))
}

fn too_big(url: &str, max: u64) -> Error {
    Error::ResourceExhausted(format!("{url} is larger than this server's --asset-max-size of {max} bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sri_parses_and_checks() {
        // sha256 of "hello\n".
        let sri: Sri = "sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM=".parse().unwrap();
        let mut h = SriHasher::new(&sri);
        h.update(b"hello\n");
        h.check(&sri, "x").unwrap();
        let mut h = SriHasher::new(&sri);
        h.update(b"hullo\n");
        let err = h.check(&sri, "x").unwrap_err().to_string();
        assert!(err.contains("checksum mismatch for x"), "{err}");
        for bad in ["", "md5-abc", "sha256-!!", "sha256-AAAA", "sha256"] {
            assert!(bad.parse::<Sri>().is_err(), "{bad}");
        }
    }

    #[test]
    fn only_allowed_prefixes_of_http_urls() {
        let cfg = AssetFetch { allow: vec!["http://127.0.0.1:8000/".into()], ..AssetFetch::default() };
        assert!(cfg.allows("http://127.0.0.1:8000/a.tar.gz"));
        assert!(!cfg.allows("http://127.0.0.1:8001/a.tar.gz"));
        assert!(!cfg.allows("file:///etc/passwd"));
        let all = AssetFetch { allow: vec!["".into()], ..AssetFetch::default() };
        assert!(!all.allows("file:///etc/passwd"), "only http(s), whatever the prefixes");
    }
}
