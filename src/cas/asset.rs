//! Client side of the Remote Asset API: ask a server for the content a URI names, or tell it.

use crate::cas::GrpcStore;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::proto::asset::{self, fetch_client::FetchClient, push_client::PushClient, Qualifier};

/// Whether a name stands for one blob or a Directory tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AssetKind {
    /// FetchBlob / PushBlob.
    Blob,
    /// FetchDirectory / PushDirectory.
    Directory,
}

fn qualifiers(q: &[(String, String)]) -> Vec<Qualifier> {
    q.iter().map(|(name, value)| Qualifier { name: name.clone(), value: value.clone() }).collect()
}

fn digest_of(d: Option<crate::proto::reapi::Digest>, what: &str) -> Result<Digest> {
    let d = d.ok_or_else(|| Error::Internal(format!("the server's {what} response has no digest")))?;
    Ok(Digest::try_from(&d)?)
}

/// The digest the server behind `store` has for `uris` with `qualifiers` (fetching it, if the
/// server may). A failure in the response's status is an error too.
pub async fn fetch(store: &GrpcStore, kind: AssetKind, uris: &[String], q: &[(String, String)]) -> Result<Digest> {
    let check = |st: Option<crate::proto::rpc::Status>| match st {
        Some(s) if s.code != 0 => {
            Err(Error::Remote { context: "Fetch".into(), code: tonic::Code::from_i32(s.code), message: s.message })
        }
        _ => Ok(()),
    };
    let mut client = FetchClient::new(store.conn());
    match kind {
        AssetKind::Blob => {
            let req = asset::FetchBlobRequest {
                instance_name: store.instance().to_string(),
                uris: uris.to_vec(),
                qualifiers: qualifiers(q),
                ..Default::default()
            };
            let r = client.fetch_blob(req).await.map_err(|s| Error::remote("FetchBlob", s))?.into_inner();
            check(r.status)?;
            digest_of(r.blob_digest, "FetchBlob")
        }
        AssetKind::Directory => {
            let req = asset::FetchDirectoryRequest {
                instance_name: store.instance().to_string(),
                uris: uris.to_vec(),
                qualifiers: qualifiers(q),
                ..Default::default()
            };
            let r = client.fetch_directory(req).await.map_err(|s| Error::remote("FetchDirectory", s))?.into_inner();
            check(r.status)?;
            digest_of(r.root_directory_digest, "FetchDirectory")
        }
    }
}

/// Records on the server behind `store` that `uris` with `qualifiers` name `digest`.
pub async fn push(
    store: &GrpcStore,
    kind: AssetKind,
    uris: &[String],
    q: &[(String, String)],
    digest: &Digest,
) -> Result<()> {
    let mut client = PushClient::new(store.conn());
    let instance_name = store.instance().to_string();
    match kind {
        AssetKind::Blob => {
            let req = asset::PushBlobRequest {
                instance_name,
                uris: uris.to_vec(),
                qualifiers: qualifiers(q),
                blob_digest: Some(digest.to_proto()),
                ..Default::default()
            };
            client.push_blob(req).await.map_err(|s| Error::remote("PushBlob", s))?;
        }
        AssetKind::Directory => {
            let req = asset::PushDirectoryRequest {
                instance_name,
                uris: uris.to_vec(),
                qualifiers: qualifiers(q),
                root_directory_digest: Some(digest.to_proto()),
                ..Default::default()
            };
            client.push_directory(req).await.map_err(|s| Error::remote("PushDirectory", s))?;
        }
    }
    Ok(())
}
