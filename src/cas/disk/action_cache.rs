//! A disk store's action cache: one encoded ActionResult per file under `ac/`, written by
//! rename so a reader sees a whole entry or none.

use std::io::Write;

use prost::Message;

use super::DiskStore;
use crate::cas::ActionCache;
use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::proto::reapi;

#[async_trait::async_trait]
impl ActionCache for DiskStore {
    async fn get_action_result(&self, action: &Digest) -> Result<Option<reapi::ActionResult>> {
        match std::fs::read(self.ac_path(action)) {
            Ok(bytes) => match reapi::ActionResult::decode(bytes.as_slice()) {
                Ok(r) => Ok(Some(r)),
                Err(e) => {
                    tracing::warn!(action = %action, error = %e, "dropping undecodable action cache entry");
                    let _ = std::fs::remove_file(self.ac_path(action));
                    Ok(None)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading action result {action}"), e)),
        }
    }

    async fn update_action_result(&self, action: &Digest, result: &reapi::ActionResult) -> Result<()> {
        let dest = self.ac_path(action);
        let shard = dest.parent().expect("ac path has a shard");
        std::fs::create_dir_all(shard).ctx(|| format!("creating {}", shard.display()))?;
        let (mut file, tmp) = self.temp()?;
        file.write_all(&result.encode_to_vec()).ctx(|| format!("writing action result {action}"))?;
        drop(file);
        tmp.persist(&dest).map_err(|e| Error::io(format!("storing action result {action}"), e.error))?;
        Ok(())
    }
}
