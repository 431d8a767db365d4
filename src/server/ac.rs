//! The ActionCache service; a hit is served only while every blob it references exists.

use tonic::{Request, Response, Status};

use super::{status, Backend};
use crate::cas::{referenced_blobs, verified_action_result};
use crate::digest::{Digest, DigestFunction};
use crate::error::Result;
use crate::proto::reapi::action_cache_server::ActionCache;
use crate::proto::reapi::{self, ActionResult};

pub(super) struct AcService {
    backend: Backend,
}

impl AcService {
    pub(super) fn new(backend: Backend) -> Self {
        AcService { backend }
    }
}

fn action_digest(d: &Option<reapi::Digest>, function: i32) -> Result<Digest, Status> {
    DigestFunction::from_proto(function).map_err(|e| status(e.into()))?;
    let d = d.as_ref().ok_or_else(|| Status::invalid_argument("action_digest is required"))?;
    Digest::try_from(d).map_err(|e| status(e.into()))
}

#[tonic::async_trait]
impl ActionCache for AcService {
    async fn get_action_result(
        &self,
        req: Request<reapi::GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let req = req.into_inner();
        let action = action_digest(&req.action_digest, req.digest_function)?;
        let found = verified_action_result(self.backend.cas.as_ref(), self.backend.ac.as_ref(), &action).await;
        match found.map_err(status)? {
            Some(result) => Ok(Response::new(result)),
            None => Err(Status::not_found(format!("no action result for {action}"))),
        }
    }

    async fn update_action_result(
        &self,
        req: Request<reapi::UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let req = req.into_inner();
        let action = action_digest(&req.action_digest, req.digest_function)?;
        let result = req.action_result.ok_or_else(|| Status::invalid_argument("action_result is required"))?;
        referenced_blobs(&result).map_err(status)?;
        self.backend.ac.update_action_result(&action, &result).await.map_err(status)?;
        Ok(Response::new(result))
    }
}
