//! The ActionCache service; a hit is served only while every blob it references exists.

use tonic::{Request, Response, Status};

use super::{status, Backend};
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

/// Every blob digest an ActionResult points at (outputs, trees, stdout/stderr).
pub fn referenced_blobs(r: &ActionResult) -> Result<Vec<Digest>> {
    let mut out = Vec::new();
    for f in &r.output_files {
        if let Some(d) = &f.digest {
            out.push(Digest::try_from(d)?);
        }
    }
    for d in &r.output_directories {
        for x in [&d.tree_digest, &d.root_directory_digest].into_iter().flatten() {
            out.push(Digest::try_from(x)?);
        }
    }
    for x in [&r.stdout_digest, &r.stderr_digest].into_iter().flatten() {
        out.push(Digest::try_from(x)?);
    }
    Ok(out)
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
        let Some(result) = self.backend.ac.get_action_result(&action).await.map_err(status)? else {
            return Err(Status::not_found(format!("no action result for {action}")));
        };
        let refs = referenced_blobs(&result).map_err(status)?;
        let missing = self.backend.cas.find_missing(&refs).await.map_err(status)?;
        if let Some(m) = missing.first() {
            tracing::info!(action = %action, missing = %m, "action result refers to an evicted blob; treating as a miss");
            return Err(Status::not_found(format!("action result for {action} refers to missing blob {m}")));
        }
        Ok(Response::new(result))
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
