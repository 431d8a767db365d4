//! The `ActionCache` contract over a remote server's ActionCache service.

use super::GrpcStore;
use crate::cas::ActionCache;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::proto::reapi::{self, action_cache_client::ActionCacheClient};

#[async_trait::async_trait]
impl ActionCache for GrpcStore {
    async fn get_action_result(&self, action: &Digest) -> Result<Option<reapi::ActionResult>> {
        let req = reapi::GetActionResultRequest {
            instance_name: self.instance.clone(),
            action_digest: Some(action.to_proto()),
            inline_stdout: false,
            inline_stderr: false,
            inline_output_files: vec![],
            digest_function: action.function().proto_value(),
        };
        match self
            .retry
            .unary("GetActionResult", &ActionCacheClient::new(self.conn.clone()), &req, |mut c, r| async move {
                c.get_action_result(r).await
            })
            .await
        {
            Ok(r) => Ok(Some(r)),
            Err(Error::Remote { code: tonic::Code::NotFound, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn update_action_result(&self, action: &Digest, result: &reapi::ActionResult) -> Result<()> {
        let req = reapi::UpdateActionResultRequest {
            instance_name: self.instance.clone(),
            action_digest: Some(action.to_proto()),
            action_result: Some(result.clone()),
            results_cache_policy: None,
            digest_function: action.function().proto_value(),
        };
        let client = ActionCacheClient::new(self.conn.clone());
        self.retry
            .unary("UpdateActionResult", &client, &req, |mut c, r| async move { c.update_action_result(r).await })
            .await?;
        Ok(())
    }
}
