//! Client side of the Execution service: submit an Action and follow its Operation to the
//! end, reattaching with WaitExecution when the stream breaks (as Bazel does).

use std::time::Duration;

use prost::Message;

use super::GrpcStore;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::proto::longrunning::{self, operation};
use crate::proto::reapi::{self, execution_client::ExecutionClient, execution_stage::Value as Stage};

/// How many broken streams a wait survives before giving up.
const REATTACH_LIMIT: u32 = 10;

/// Executes `action` on the server behind `store` and returns its ExecuteResponse.
/// `on_stage` sees every stage the server reports (for progress output).
pub async fn execute(
    store: &GrpcStore,
    action: Digest,
    skip_cache_lookup: bool,
    mut on_stage: impl FnMut(&str, Stage),
) -> Result<reapi::ExecuteResponse> {
    let mut client = ExecutionClient::new(store.conn()).max_decoding_message_size(64 << 20);
    let req = reapi::ExecuteRequest {
        instance_name: store.instance().to_string(),
        skip_cache_lookup,
        action_digest: Some(action.to_proto()),
        digest_function: action.function().proto_value(),
        ..Default::default()
    };
    let stream = client.execute(req).await.map_err(|s| Error::remote("Execute", s))?.into_inner();
    let mut name = String::new();
    let mut stream = Some(stream);
    let mut broken = 0;
    loop {
        let mut s = match stream.take() {
            Some(s) => s,
            None => {
                let req = reapi::WaitExecutionRequest { name: name.clone() };
                match client.wait_execution(req).await {
                    Ok(r) => r.into_inner(),
                    Err(st) if st.code() == tonic::Code::Unavailable && broken < REATTACH_LIMIT => {
                        broken += 1;
                        tokio::time::sleep(Duration::from_millis(200 << broken.min(5))).await;
                        continue;
                    }
                    Err(st) => return Err(Error::remote("WaitExecution", st)),
                }
            }
        };
        loop {
            match s.message().await {
                Ok(Some(op)) => {
                    name.clone_from(&op.name);
                    if let Some(stage) = stage_of(&op) {
                        on_stage(&op.name, stage);
                    }
                    if op.done {
                        return finished(op);
                    }
                }
                // The stream ended or broke before the operation was done: reattach.
                Ok(None) | Err(_) if !name.is_empty() && broken < REATTACH_LIMIT => {
                    broken += 1;
                    break;
                }
                Ok(None) => return Err(Error::Unavailable("the Execute stream ended before the operation".into())),
                Err(st) => return Err(Error::remote("Execute stream", st)),
            }
        }
    }
}

fn stage_of(op: &longrunning::Operation) -> Option<Stage> {
    let m = reapi::ExecuteOperationMetadata::decode(op.metadata.as_ref()?.value.as_slice()).ok()?;
    Stage::try_from(m.stage).ok()
}

fn finished(op: longrunning::Operation) -> Result<reapi::ExecuteResponse> {
    match op.result {
        Some(operation::Result::Response(any)) => reapi::ExecuteResponse::decode(any.value.as_slice())
            .map_err(|e| Error::Internal(format!("operation {}: undecodable ExecuteResponse: {e}", op.name))),
        Some(operation::Result::Error(st)) => {
            Err(Error::Internal(format!("operation {} failed with status {}: {}", op.name, st.code, st.message)))
        }
        None => Err(Error::Internal(format!("operation {} is done but has no result", op.name))),
    }
}

/// The spec's name of a stage, as the CLI prints it.
pub fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Unknown => "UNKNOWN",
        Stage::CacheCheck => "CACHE_CHECK",
        Stage::Queued => "QUEUED",
        Stage::Executing => "EXECUTING",
        Stage::Completed => "COMPLETED",
    }
}
