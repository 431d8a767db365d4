//! Worker mode: the casfs executor attached to an external scheduler through the Remote Workers API.
//!
//! A worker opens a bot session with the scheduler's Bots service (`CreateBotSession`), then
//! keeps it alive with `UpdateBotSession`: an idle worker long-polls for work, a busy one
//! sends a heartbeat within the session's keepalive and reports each lease as soon as its
//! action is done. Leases carry the Action (BuildGrid packs the whole message, older
//! schedulers its digest); the executor runs it with its input root mounted lazily from the
//! scheduler's CAS, uploads the outputs there, and the lease is completed with the
//! `ActionResult` and a status. The scheduler (not the worker) writes the action cache.
//!
//! The pieces:
//! - [`session`]: the Bots client, deadlines, and which errors mean "retry", "the session is
//!   gone" or "stop";
//! - [`ledger`]: the leases this worker holds and what it still has to tell the scheduler,
//!   reconciled with each answer (no I/O, unit-tested);
//! - [`lease`]: one lease's payload decoded and run, its outcome turned into a completed
//!   lease (infrastructure failures become statuses the scheduler retries, never exit codes);
//! - [`bot`]: the loop that ties them together (reconnects with backoff, keepalive,
//!   cancellation, draining on SIGTERM).
//!
//! ```no_run
//! # async fn demo(exec: std::sync::Arc<casfs::exec::Executor>, cas: casfs::cas::SharedCas) -> casfs::Result<()> {
//! use casfs::cas::RemoteConfig;
//! use casfs::worker::{Bot, Shutdown, WorkerConfig};
//! let bots = casfs::worker::BotsClient::new(&RemoteConfig::new("grpc://127.0.0.1:50051"))?;
//! let cfg = WorkerConfig::new("bot-1", 4);
//! let (_stop, shutdown) = Shutdown::channel();
//! Bot::new(cfg, bots, exec, cas).run(shutdown).await?;
//! # Ok(()) }
//! ```

pub(crate) mod bot;
pub(crate) mod lease;
pub(crate) mod ledger;
pub(crate) mod session;

use std::time::Duration;

pub use bot::{Bot, Shutdown, StopLevel};
pub use session::BotsClient;

/// How a worker presents itself to the scheduler and paces its calls.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Stable identity of this worker: a restarted worker with the same id replaces its old
    /// session at once (the scheduler re-queues what the old one held).
    pub bot_id: String,
    /// Scheduler instance (`CreateBotSessionRequest.parent`); also the CAS instance.
    pub instance_name: String,
    /// Platform properties offered, as `key=value` pairs on the primary device.
    pub platform: Vec<(String, String)>,
    /// Leases run at once (sent as the worker config `capacity`).
    pub concurrency: usize,
    /// Deadline of a long-polling call (the scheduler answers earlier when work arrives).
    pub long_poll: Duration,
    /// Longest time between two calls while leases run; shortened to a third of the
    /// session's remaining lifetime when the scheduler's keepalive is shorter.
    pub heartbeat: Duration,
    /// While some leases run and capacity is left, how often to ask for more work.
    pub poll_interval: Duration,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
}

impl WorkerConfig {
    /// Defaults for a worker called `bot_id` running `concurrency` leases at once.
    pub fn new(bot_id: impl Into<String>, concurrency: usize) -> Self {
        WorkerConfig {
            bot_id: bot_id.into(),
            instance_name: String::new(),
            platform: default_platform(),
            concurrency: concurrency.max(1),
            long_poll: Duration::from_secs(60),
            heartbeat: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// The platform the executor supports here: `OSFamily=linux` and this machine's `ISA`.
pub fn default_platform() -> Vec<(String, String)> {
    let mut p = vec![("OSFamily".to_string(), "linux".to_string())];
    if cfg!(target_arch = "x86_64") {
        p.push(("ISA".into(), "x86-64".into()));
    } else if cfg!(target_arch = "aarch64") {
        p.push(("ISA".into(), "arm-a64".into()));
    }
    p
}
