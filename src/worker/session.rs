//! The Bots service client: CreateBotSession and UpdateBotSession with deadlines, the
//! classification of their failures into "retry", "session gone" and "give up", and the
//! pacing of calls (heartbeats within the session's keepalive, backoff after failures).

use std::time::{Duration, SystemTime};

use prost::Message;

use crate::cas::channel::{connect, Conn, RemoteConfig};
use crate::digest::Digest;
use crate::error::Result;
use crate::proto::google::devtools::remoteworkers::v1test2 as rwapi;
use crate::proto::reapi;
use rwapi::bots_client::BotsClient as RawClient;

/// Trailing metadata key under which BuildGrid describes each lease's job.
const OPERATION_METADATA_KEY: &str = "executeoperationmetadata-bin";

/// Extra time allowed beyond the deadline sent to the server before the call is dropped.
const GRACE: Duration = Duration::from_secs(5);

/// Why a Bots call failed, and so what to do next.
#[derive(Debug)]
pub enum CallError {
    /// Network trouble or an overloaded or restarting scheduler: retry the same session
    /// after a backoff.
    Transient(tonic::Status),
    /// The scheduler no longer knows the session (reaped, closed, replaced): its leases
    /// were re-queued; open a new session.
    SessionGone(tonic::Status),
    /// The request can never succeed as configured (no Bots service here, unknown instance,
    /// platform the scheduler refuses, authentication).
    Fatal(tonic::Status),
}

impl CallError {
    fn classify(status: tonic::Status, creating: bool) -> Self {
        use tonic::Code::*;
        match status.code() {
            Unavailable | DeadlineExceeded | ResourceExhausted | Cancelled | Internal | Unknown | Aborted => {
                CallError::Transient(status)
            }
            // BuildGrid: DATA_LOSS = session closed, INVALID_ARGUMENT = unknown bot or name
            // mismatch, NOT_FOUND = unknown session.
            DataLoss | InvalidArgument | NotFound if !creating => CallError::SessionGone(status),
            _ => CallError::Fatal(status),
        }
    }

    /// The status behind the failure.
    pub fn status(&self) -> &tonic::Status {
        match self {
            CallError::Transient(s) | CallError::SessionGone(s) | CallError::Fatal(s) => s,
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.status();
        write!(f, "{:?}: {}", s.code(), s.message())
    }
}

/// What the scheduler answered: the session and, per job it mentions, the action digest and
/// when it was queued (BuildGrid's trailing `ExecuteOperationMetadata`).
#[derive(Debug)]
pub struct Answer {
    /// The session as the scheduler now sees it (leases, version, expiry).
    pub session: rwapi::BotSession,
    /// Action digest to queued time, for the jobs of the returned leases.
    pub queued: Vec<(Digest, Option<std::time::SystemTime>)>,
}

/// A client of one scheduler's Bots service.
#[derive(Clone)]
pub struct BotsClient {
    conn: Conn,
}

impl BotsClient {
    /// Prepares a client for the scheduler at `cfg.url` (headers and TLS as for a CAS);
    /// nothing is sent until the first call.
    pub fn new(cfg: &RemoteConfig) -> Result<Self> {
        Ok(BotsClient { conn: connect(cfg)? })
    }

    fn raw(&self) -> RawClient<Conn> {
        RawClient::new(self.conn.clone()).max_decoding_message_size(64 << 20)
    }

    /// Opens a session under `parent` (the instance name). The scheduler may hold the call
    /// up to `deadline` waiting for work to hand out.
    pub async fn create(
        &self,
        parent: &str,
        session: rwapi::BotSession,
        deadline: Duration,
    ) -> std::result::Result<Answer, CallError> {
        let mut req = tonic::Request::new(rwapi::CreateBotSessionRequest {
            parent: parent.to_string(),
            bot_session: Some(session),
        });
        req.set_timeout(deadline);
        let mut c = self.raw();
        let call = c.create_bot_session(req);
        let r = match tokio::time::timeout(deadline + GRACE, call).await {
            Ok(r) => r.map_err(|s| CallError::classify(s, true))?,
            Err(_) => return Err(CallError::Transient(tonic::Status::deadline_exceeded("no answer in time"))),
        };
        Ok(answer(r))
    }

    /// Reports the session's state (lease states, completed results, bot status) and gets
    /// the scheduler's view back. The scheduler may hold the call up to `deadline`.
    pub async fn update(
        &self,
        session: rwapi::BotSession,
        deadline: Duration,
    ) -> std::result::Result<Answer, CallError> {
        let mut req = tonic::Request::new(rwapi::UpdateBotSessionRequest {
            name: session.name.clone(),
            bot_session: Some(session),
            update_mask: None,
        });
        req.set_timeout(deadline);
        let mut c = self.raw();
        let call = c.update_bot_session(req);
        let r = match tokio::time::timeout(deadline + GRACE, call).await {
            Ok(r) => r.map_err(|s| CallError::classify(s, false))?,
            Err(_) => return Err(CallError::Transient(tonic::Status::deadline_exceeded("no answer in time"))),
        };
        Ok(answer(r))
    }
}

fn answer(r: tonic::Response<rwapi::BotSession>) -> Answer {
    let mut queued = Vec::new();
    // tonic merges trailers into the response metadata.
    for v in r.metadata().get_all_bin(OPERATION_METADATA_KEY).iter() {
        let Ok(bytes) = v.to_bytes() else { continue };
        let Ok(m) = reapi::ExecuteOperationMetadata::decode(bytes.as_ref()) else { continue };
        let Some(d) = m.action_digest.as_ref().and_then(|d| Digest::try_from(d).ok()) else { continue };
        let at =
            m.partial_execution_metadata.and_then(|p| p.queued_timestamp).and_then(|t| SystemTime::try_from(t).ok());
        queued.push((d, at));
    }
    Answer { session: r.into_inner(), queued }
}

/// A third of the session's remaining lifetime, at most `max`, at least half a second.
pub(super) fn heartbeat(expires: Option<SystemTime>, max: Duration) -> Duration {
    let left = match expires {
        Some(e) => e.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO),
        None => max * 3,
    };
    (left / 3).clamp(Duration::from_millis(500), max.max(Duration::from_millis(500)))
}

/// Exponential backoff with jitter: 200 ms doubling up to a maximum.
pub(super) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(super) fn new(max: Duration) -> Self {
        Backoff { next: Duration::from_millis(200), max }
    }

    pub(super) fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = Duration::from_millis(rand::random::<u64>() % (d.as_millis() as u64 / 4 + 1));
        d + jitter
    }

    pub(super) fn reset(&mut self) {
        self.next = Duration::from_millis(200);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_failures() {
        let t = |c, creating| CallError::classify(tonic::Status::new(c, "x"), creating);
        assert!(matches!(t(tonic::Code::Unavailable, false), CallError::Transient(_)));
        assert!(matches!(t(tonic::Code::DeadlineExceeded, true), CallError::Transient(_)));
        assert!(matches!(t(tonic::Code::DataLoss, false), CallError::SessionGone(_)));
        assert!(matches!(t(tonic::Code::InvalidArgument, false), CallError::SessionGone(_)));
        assert!(matches!(t(tonic::Code::InvalidArgument, true), CallError::Fatal(_)));
        assert!(matches!(t(tonic::Code::Unimplemented, false), CallError::Fatal(_)));
        assert!(matches!(t(tonic::Code::FailedPrecondition, true), CallError::Fatal(_)));
    }

    #[test]
    fn heartbeat_stays_within_the_keepalive() {
        let in_ = |s| Some(SystemTime::now() + Duration::from_secs(s));
        assert!(heartbeat(in_(9), Duration::from_secs(30)) <= Duration::from_secs(3));
        assert_eq!(heartbeat(in_(600), Duration::from_secs(30)), Duration::from_secs(30));
        assert_eq!(heartbeat(Some(SystemTime::UNIX_EPOCH), Duration::from_secs(30)), Duration::from_millis(500));
        assert_eq!(heartbeat(None, Duration::from_secs(30)), Duration::from_secs(30));
    }

    #[test]
    fn backoff_grows_to_its_bound_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(2));
        let waits: Vec<Duration> = (0..6).map(|_| b.next()).collect();
        assert!(waits[0] < Duration::from_millis(300));
        assert!(waits[5] >= Duration::from_secs(2) && waits[5] <= Duration::from_millis(2501));
        b.reset();
        assert!(b.next() < Duration::from_millis(300));
    }
}
