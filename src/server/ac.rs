//! The ActionCache service; a hit is served only while every blob it references exists.

use tonic::{Request, Response, Status};

use crate::error::Error;

use super::{status, Instances};
use crate::cas::{referenced_blobs, verified_action_result};
use crate::digest::Digest;
use crate::error::Result;
use crate::proto::reapi::action_cache_server::ActionCache;
use crate::proto::reapi::{self, ActionResult};

/// Who may write the action cache through UpdateActionResult.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AcWrites {
    /// Any client (Bazel's `--remote_upload_local_results`, Pants' remote cache writes).
    #[default]
    All,
    /// No client: only the server's own executor records results, so every cached result
    /// was produced here (a client cannot plant a forged result for an action that others
    /// will take from the cache). Advertised as `update_enabled: false`.
    None,
}

impl std::str::FromStr for AcWrites {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(AcWrites::All),
            "none" => Ok(AcWrites::None),
            _ => Err(Error::InvalidArgument(format!("{s:?} is not all or none"))),
        }
    }
}

pub(super) struct AcService {
    instances: std::sync::Arc<Instances>,
}

impl AcService {
    pub(super) fn new(instances: std::sync::Arc<Instances>) -> Self {
        AcService { instances }
    }
}

fn action_digest(d: &Option<reapi::Digest>, function: i32) -> Result<Digest, Status> {
    let d = d.as_ref().ok_or_else(|| Status::invalid_argument("action_digest is required"))?;
    Digest::from_request(function, d).map_err(|e| status(e.into()))
}

#[tonic::async_trait]
impl ActionCache for AcService {
    async fn get_action_result(
        &self,
        req: Request<reapi::GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let req = req.into_inner();
        let backend = self.instances.get(&req.instance_name)?;
        let action = action_digest(&req.action_digest, req.digest_function)?;
        let found = verified_action_result(backend.cas.as_ref(), backend.ac.as_ref(), &action).await;
        match found.map_err(status)? {
            Some(result) => Ok(Response::new(result)),
            None => Err(Status::not_found(format!("no action result for {action}"))),
        }
    }

    async fn update_action_result(
        &self,
        req: Request<reapi::UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let backend = self.instances.get(&req.get_ref().instance_name)?;
        if backend.ac_writes == AcWrites::None {
            return Err(Status::permission_denied(
                "this server takes action results only from its own executor (casfs serve --ac-writes none): \
                 run the action with Execute, or stop uploading local results (Bazel: \
                 --remote_upload_local_results=false); the operator can allow client writes with \
                 --ac-writes all",
            ));
        }
        let req = req.into_inner();
        let action = action_digest(&req.action_digest, req.digest_function)?;
        let result = req.action_result.ok_or_else(|| Status::invalid_argument("action_result is required"))?;
        referenced_blobs(action.function(), &result).map_err(status)?;
        backend.ac.update_action_result(&action, &result).await.map_err(status)?;
        Ok(Response::new(result))
    }
}
