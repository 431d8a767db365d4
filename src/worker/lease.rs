//! One lease: its payload decoded into an action, run with the executor, and the outcome
//! turned into a completed lease (status + `ActionResult`) as the scheduler expects it.
//!
//! Failures before or around the command (CAS unreachable, blob missing, a bad Action) are
//! the lease's status, never an exit code: BuildGrid retries UNAVAILABLE and INTERNAL on
//! another bot, and passes FAILED_PRECONDITION with its MISSING violations to the client,
//! which uploads the blobs and tries again.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use prost::Message;

use crate::cas::SharedCas;
use crate::digest::Digest;
use crate::error::{rpc_status, Error};
use crate::exec::{load_action, Executed, Executor};
use crate::metrics::Metrics;
use crate::proto::google::devtools::remoteworkers::v1test2::{Lease, LeaseState};
use crate::proto::{reapi, rpc};

const ACTION_TYPE: &str = "build.bazel.remote.execution.v2.Action";
const DIGEST_TYPE: &str = "build.bazel.remote.execution.v2.Digest";
const RESULT_TYPE_URL: &str = "type.googleapis.com/build.bazel.remote.execution.v2.ActionResult";

/// The work a lease asks for.
#[derive(Clone, Debug)]
pub struct Job {
    /// The lease id (BuildGrid: `instance/job-name`).
    pub id: String,
    /// Digest of the Action to run.
    pub action: Digest,
    /// The serialized Action when the payload carried it whole (then it is run from these
    /// bytes: a scheduler may re-encode the client's Action, so the CAS need not hold them).
    pub action_bytes: Option<Bytes>,
}

/// Reads a lease's payload: a whole `Action` (BuildGrid) or an Action `Digest`.
pub fn decode(lease: &Lease) -> Result<Job, rpc::Status> {
    let bad = |why: String| rpc_status(tonic::Code::InvalidArgument, why);
    let p = lease.payload.as_ref().ok_or_else(|| bad(format!("lease {} has no payload", lease.id)))?;
    let type_name = p.type_url.rsplit('/').next().unwrap_or("");
    let (action, action_bytes) = match type_name {
        ACTION_TYPE => {
            reapi::Action::decode(p.value.as_slice())
                .map_err(|e| bad(format!("lease {}: payload is not an Action: {e}", lease.id)))?;
            (Digest::of_bytes(&p.value), Some(Bytes::from(p.value.clone())))
        }
        DIGEST_TYPE => {
            let d = reapi::Digest::decode(p.value.as_slice())
                .map_err(|e| bad(format!("lease {}: payload is not a Digest: {e}", lease.id)))?;
            (Digest::try_from(&d).map_err(|e| bad(format!("lease {}: {e}", lease.id)))?, None)
        }
        other => return Err(bad(format!("lease {}: unsupported payload type {other:?}", lease.id))),
    };
    Ok(Job { id: lease.id.clone(), action, action_bytes })
}

/// A completed lease with `status` and, when there is one, the ActionResult.
pub fn completed(id: &str, status: rpc::Status, result: Option<&reapi::ActionResult>) -> Lease {
    Lease {
        id: id.to_string(),
        state: LeaseState::Completed as i32,
        status: Some(status),
        result: result.map(|r| prost_types::Any { type_url: RESULT_TYPE_URL.into(), value: r.encode_to_vec() }),
        ..Default::default()
    }
}

/// Runs leases with one executor against the scheduler's CAS, counting what happens.
pub struct Runner {
    exec: Arc<Executor>,
    cas: SharedCas,
    metrics: Arc<Metrics>,
}

impl Runner {
    /// A runner over `exec`, whose CAS is `cas`; counters go to the executor's registry.
    pub fn new(exec: Arc<Executor>, cas: SharedCas) -> Self {
        let metrics = exec.metrics().clone();
        Runner { exec, cas, metrics }
    }

    /// The metrics registry (the executor's).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Runs `job` and returns its completed lease. Never fails: every error is a status.
    pub async fn run(&self, job: Job, queued: Option<SystemTime>) -> Lease {
        let started = Instant::now();
        self.metrics.add("casfs_worker_leases_taken_total", 1);
        if let Some(q) = queued.and_then(|q| SystemTime::now().duration_since(q).ok()) {
            self.metrics.histogram("casfs_worker_queue_wait_seconds").observe(q);
        }
        tracing::info!(lease = %job.id, action = %job.action, "lease started");
        // The scheduler looked in the action cache before queueing (and writes the result
        // there itself), so the bare executor runs it: neither reads nor writes the cache.
        let action = match &job.action_bytes {
            Some(bytes) => reapi::Action::decode(bytes.as_ref())
                .map_err(|e| Error::InvalidArgument(format!("the lease's Action does not decode: {e}"))),
            None => load_action(&self.cas, job.action).await,
        };
        let queued = queued.unwrap_or_else(SystemTime::now);
        let r = match action {
            Ok(action) => self.exec.execute(job.action, &action, queued).await,
            Err(e) => Err(e),
        };
        self.metrics.histogram("casfs_worker_lease_seconds").observe(started.elapsed());
        match r {
            Ok(o) => self.finish(&job, o),
            Err(e) => {
                self.metrics.add("casfs_worker_leases_failed_total", 1);
                tracing::warn!(lease = %job.id, action = %job.action, error = %e, "lease failed before or around the command");
                completed(&job.id, e.to_rpc_status(), None)
            }
        }
    }

    fn finish(&self, job: &Job, o: Executed) -> Lease {
        if let Some(m) = &o.result.execution_metadata {
            let phase = |name: &str, a: &Option<prost_types::Timestamp>, b: &Option<prost_types::Timestamp>| {
                let t = |x: &Option<prost_types::Timestamp>| x.and_then(|x| SystemTime::try_from(x).ok());
                if let (Some(a), Some(b)) = (t(a), t(b)) {
                    if let Ok(d) = b.duration_since(a) {
                        self.metrics.histogram(&format!("casfs_worker_phase_seconds{{phase=\"{name}\"}}")).observe(d);
                    }
                }
            };
            phase("fetch", &m.input_fetch_start_timestamp, &m.input_fetch_completed_timestamp);
            phase("execute", &m.execution_start_timestamp, &m.execution_completed_timestamp);
            phase("upload", &m.output_upload_start_timestamp, &m.output_upload_completed_timestamp);
        }
        if o.status.code == 0 {
            self.metrics.add("casfs_worker_leases_completed_total", 1);
        } else {
            self.metrics.add("casfs_worker_leases_failed_total", 1);
        }
        tracing::info!(lease = %job.id, action = %job.action, exit_code = o.result.exit_code, status = o.status.code, "lease completed");
        completed(&job.id, o.status, Some(&o.result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_payload(type_url: &str, value: Vec<u8>) -> Lease {
        Lease {
            id: "i/job".into(),
            payload: Some(prost_types::Any { type_url: type_url.into(), value }),
            ..Default::default()
        }
    }

    #[test]
    fn decodes_an_action_or_a_digest() {
        let action = reapi::Action { do_not_cache: true, ..Default::default() }.encode_to_vec();
        let j = decode(&with_payload("type.googleapis.com/build.bazel.remote.execution.v2.Action", action.clone()))
            .expect("action payload");
        assert_eq!(j.action, Digest::of_bytes(&action));
        assert_eq!(j.action_bytes.as_deref(), Some(action.as_slice()));

        let d = Digest::of_bytes(b"x");
        let j = decode(&with_payload(
            "type.googleapis.com/build.bazel.remote.execution.v2.Digest",
            d.to_proto().encode_to_vec(),
        ))
        .expect("digest payload");
        assert_eq!((j.action, j.action_bytes), (d, None));
    }

    #[test]
    fn refuses_bad_payloads_with_invalid_argument() {
        let bad = [
            Lease { id: "x".into(), ..Default::default() },
            with_payload("type.googleapis.com/google.devtools.remoteworkers.v1test2.CommandTask", vec![]),
            with_payload("type.googleapis.com/build.bazel.remote.execution.v2.Action", vec![0xff, 0xff]),
            with_payload("type.googleapis.com/build.bazel.remote.execution.v2.Digest", {
                reapi::Digest { hash: "nothex".into(), size_bytes: 1 }.encode_to_vec()
            }),
        ];
        for l in bad {
            let e = decode(&l).expect_err("refused");
            assert_eq!(e.code, tonic::Code::InvalidArgument as i32, "{}", e.message);
        }
    }

    #[test]
    fn completed_leases_carry_status_and_result() {
        let r = reapi::ActionResult { exit_code: 3, ..Default::default() };
        let l = completed("a", rpc::Status::default(), Some(&r));
        assert_eq!(l.state, LeaseState::Completed as i32);
        let any = l.result.expect("result");
        assert_eq!(any.type_url, RESULT_TYPE_URL);
        assert_eq!(reapi::ActionResult::decode(any.value.as_slice()).expect("decodes").exit_code, 3);
    }
}
