//! The Execution service: Execute and WaitExecution as streams of long-running Operations
//! over the in-process scheduler.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message;
use tonic::{Request, Response, Status};

use super::scheduler::{OpState, Operation, Request as Job};
use super::{status, Instances};
use crate::digest::Digest;
use crate::proto::longrunning;
use crate::proto::reapi::execution_server::Execution;
use crate::proto::reapi::{self, execution_stage::Value as Stage};

const METADATA_TYPE: &str = "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteOperationMetadata";
const RESPONSE_TYPE: &str = "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse";

/// Operation stream returned by Execute and WaitExecution.
pub type OperationStream = Pin<Box<dyn Stream<Item = Result<longrunning::Operation, Status>> + Send>>;

pub(super) struct ExecutionService {
    instances: Arc<Instances>,
}

impl ExecutionService {
    pub(super) fn new(instances: Arc<Instances>) -> Self {
        ExecutionService { instances }
    }
}

/// The Operation message for one state of `op`.
pub fn operation(op: &Operation, state: &OpState) -> longrunning::Operation {
    let meta = reapi::ExecuteOperationMetadata {
        stage: state.stage as i32,
        action_digest: Some(op.action.to_proto()),
        digest_function: op.action.function().proto_value(),
        ..Default::default()
    };
    let result = state.response.as_ref().map(|r| {
        longrunning::operation::Result::Response(prost_types::Any {
            type_url: RESPONSE_TYPE.into(),
            value: r.encode_to_vec(),
        })
    });
    longrunning::Operation {
        name: op.name.clone(),
        metadata: Some(prost_types::Any { type_url: METADATA_TYPE.into(), value: meta.encode_to_vec() }),
        done: state.stage == Stage::Completed,
        result,
    }
}

/// Streams the current state of `op`, then every change, ending after COMPLETED.
fn follow(op: Arc<Operation>) -> OperationStream {
    let rx = op.watch();
    let s = futures::stream::unfold((op, rx, false, None::<Stage>), |(op, mut rx, ended, last)| async move {
        if ended {
            return None;
        }
        loop {
            let state = rx.borrow_and_update().clone();
            // Only stage changes are worth a message; a closed channel cannot happen while
            // `op` holds the sender, but ends the stream cleanly if it ever does.
            if Some(state.stage) != last {
                let done = state.stage == Stage::Completed;
                return Some((Ok(operation(&op, &state)), (op, rx, done, Some(state.stage))));
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    });
    Box::pin(s)
}

fn action_digest(req: &reapi::ExecuteRequest) -> Result<Digest, Status> {
    let d = req.action_digest.as_ref().ok_or_else(|| Status::invalid_argument("action_digest is required"))?;
    Digest::from_request(req.digest_function, d).map_err(|e| status(e.into()))
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OperationStream;
    type WaitExecutionStream = OperationStream;

    async fn execute(&self, req: Request<reapi::ExecuteRequest>) -> Result<Response<OperationStream>, Status> {
        let req = req.into_inner();
        let scheduler = self.instances.get(&req.instance_name)?.execution.as_ref().ok_or_else(|| {
            let shown: String = req.instance_name.chars().take(100).collect();
            Status::unimplemented(format!("instance {shown:?} serves storage only: it executes nothing"))
        })?;
        let action = action_digest(&req)?;
        let job = Job { action, skip_cache_lookup: req.skip_cache_lookup };
        let op = scheduler.submit(job).await.map_err(status)?;
        tracing::debug!(operation = %op.name, %action, "execute");
        Ok(Response::new(follow(op)))
    }

    async fn wait_execution(
        &self,
        req: Request<reapi::WaitExecutionRequest>,
    ) -> Result<Response<OperationStream>, Status> {
        let name = req.into_inner().name;
        // Operation names are unique across instances (a uuid each): the instance whose
        // scheduler holds the name is the one the operation was started on.
        let found = self.instances.iter().find_map(|(_, b)| b.execution.as_ref().and_then(|s| s.find(&name)));
        match found {
            Some(op) => Ok(Response::new(follow(op))),
            None => Err(Status::not_found(format!("no operation named {name:?}"))),
        }
    }
}
