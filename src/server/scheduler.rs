//! The in-process scheduler behind the Execution service: operations, in-flight
//! deduplication, a bounded number of concurrent actions and a queue in front of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{watch, Semaphore};

use crate::digest::Digest;
use crate::error::{rpc_ok, rpc_status, Error, Result};
use crate::exec::{load_action, CachedExecutor};
use crate::metrics::Metrics;
use crate::proto::reapi::{self, execution_stage::Value as Stage};
use crate::proto::rpc;

/// Largest Action message Execute reads: an Action is a few hundred bytes (two digests, a
/// timeout, a salt, platform properties); a bigger "action" is a client making the server
/// read a large blob into memory.
pub const MAX_ACTION_BYTES: u64 = 1 << 20;
/// Finished operations kept for WaitExecution at most; past it the oldest go before their
/// retention period ends (each costs memory, and a client can finish one per request).
const MAX_RETAINED: usize = 100_000;

/// Scheduler settings.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Actions executing at once; further ones wait in the queue.
    pub max_concurrent: usize,
    /// Actions allowed to wait; beyond that Execute answers RESOURCE_EXHAUSTED.
    pub max_queued: usize,
    /// How long a finished operation stays available to WaitExecution.
    pub retention: Duration,
    /// Cancel a queued or running action after nobody has watched its operation this long
    /// (`None`: always run to the end).
    pub abandon_after: Option<Duration>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        SchedulerConfig {
            max_concurrent: cores,
            max_queued: 10_000,
            retention: Duration::from_secs(600),
            abandon_after: Some(Duration::from_secs(30)),
        }
    }
}

/// What a watcher of an operation sees.
#[derive(Clone, Debug)]
pub struct OpState {
    /// The operation's current stage.
    pub stage: Stage,
    /// Set exactly when the stage is `Completed`.
    pub response: Option<reapi::ExecuteResponse>,
}

/// One operation: its name, its action and a channel carrying its state.
pub struct Operation {
    /// Unique name (`operations/<uuid>`).
    pub name: String,
    /// The action it executes.
    pub action: Digest,
    state: watch::Sender<OpState>,
    finished: Mutex<Option<Instant>>,
}

impl Operation {
    /// A receiver that sees the current state and every later change.
    pub fn watch(&self) -> watch::Receiver<OpState> {
        self.state.subscribe()
    }

    fn set(&self, stage: Stage, response: Option<reapi::ExecuteResponse>) {
        if stage == Stage::Completed {
            *self.finished.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
        self.state.send_replace(OpState { stage, response });
    }
}

#[derive(Default)]
struct Table {
    ops: HashMap<String, Arc<Operation>>,
    in_flight: HashMap<Digest, Arc<Operation>>,
    queued: usize,
}

/// Accepts actions, runs them on the executor, tracks their operations.
pub struct Scheduler {
    exec: Arc<CachedExecutor>,
    cfg: SchedulerConfig,
    permits: Arc<Semaphore>,
    table: Mutex<Table>,
    metrics: Arc<Metrics>,
}

/// What Execute asked for.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    /// The Action to run.
    pub action: Digest,
    /// Run even if the action cache has a result.
    pub skip_cache_lookup: bool,
}

impl Scheduler {
    /// A scheduler running actions on `exec` (which looks results up and writes them); its
    /// counters go to the executor's registry.
    pub fn new(exec: Arc<CachedExecutor>, cfg: SchedulerConfig) -> Arc<Self> {
        let permits = Arc::new(Semaphore::new(cfg.max_concurrent.max(1)));
        let metrics = exec.metrics().clone();
        Arc::new(Scheduler { exec, cfg, permits, table: Mutex::new(Table::default()), metrics })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The operation named `name`, if it is running or finished recently.
    pub fn find(&self, name: &str) -> Option<Arc<Operation>> {
        self.table().ops.get(name).cloned()
    }

    /// Number of operations held (running, queued and retained).
    pub fn operations(&self) -> usize {
        self.table().ops.len()
    }

    /// Starts (or joins) the execution of `req`. Identical cacheable actions in flight share
    /// one operation; `do_not_cache` ones never do (rule 12).
    pub async fn submit(self: &Arc<Self>, req: Request) -> Result<Arc<Operation>> {
        if req.action.size() > MAX_ACTION_BYTES {
            return Err(Error::InvalidArgument(format!(
                "action {} is {} bytes; an Action message is at most {MAX_ACTION_BYTES} bytes here",
                req.action,
                req.action.size()
            )));
        }
        // The Action is read first, once: do_not_cache decides whether it may join another
        // run. A missing or undecodable Action is reported in the operation's response, not
        // as an RPC error.
        let action = match load_action(self.exec.executor().cas(), req.action).await {
            Ok(a) => Ok(a),
            Err(e @ (Error::MissingInputs(_) | Error::InvalidArgument(_))) => Err(e),
            Err(e) => return Err(e),
        };
        let do_not_cache = action.as_ref().map(|a| a.do_not_cache).unwrap_or(true);
        let op = {
            let mut t = self.table();
            self.reap(&mut t);
            if !do_not_cache {
                if let Some(op) = t.in_flight.get(&req.action) {
                    self.metrics.add("casfs_exec_merged_total", 1);
                    return Ok(op.clone());
                }
            }
            if t.queued >= self.cfg.max_queued {
                return Err(Error::ResourceExhausted(format!("{} actions are already queued", t.queued)));
            }
            let (state, _) = watch::channel(OpState { stage: Stage::CacheCheck, response: None });
            let op = Arc::new(Operation {
                name: format!("operations/{}", uuid::Uuid::new_v4()),
                action: req.action,
                state,
                finished: Mutex::new(None),
            });
            t.ops.insert(op.name.clone(), op.clone());
            if !do_not_cache {
                t.in_flight.insert(req.action, op.clone());
            }
            t.queued += 1;
            op
        };
        let me = self.clone();
        let op2 = op.clone();
        tokio::spawn(async move {
            let response = me.run(&op2, req, action).await;
            {
                let mut t = me.table();
                if t.in_flight.get(&req.action).is_some_and(|o| Arc::ptr_eq(o, &op2)) {
                    t.in_flight.remove(&req.action);
                }
            }
            op2.set(Stage::Completed, Some(response));
        });
        Ok(op)
    }

    async fn run(&self, op: &Operation, req: Request, action: Result<reapi::Action>) -> reapi::ExecuteResponse {
        let queued_at = SystemTime::now();
        let dequeue = |me: &Self| me.table().queued -= 1;
        let action = match action {
            Ok(a) => a,
            Err(e) => {
                dequeue(self);
                tracing::info!(action = %req.action, error = %e, "action not executed");
                return response(None, false, e.to_rpc_status());
            }
        };
        if !req.skip_cache_lookup {
            match self.exec.lookup(req.action, &action).await {
                Ok(Some(result)) => {
                    dequeue(self);
                    return response(Some(result), true, rpc_ok());
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(action = %req.action, error = %e, "action cache lookup failed; executing"),
            }
        }
        op.set(Stage::Queued, None);
        let permit = tokio::select! {
            p = self.permits.clone().acquire_owned() => p,
            _ = self.abandoned(op) => {
                dequeue(self);
                return self.cancelled(req.action, "while queued");
            }
        };
        dequeue(self);
        let Ok(_permit) = permit else {
            return response(None, false, Error::Unavailable("the scheduler is shutting down".into()).to_rpc_status());
        };
        op.set(Stage::Executing, None);
        let started = Instant::now();
        // Dropping the execution kills its processes and undoes its mounts.
        let run = tokio::select! {
            r = self.exec.executor().execute(req.action, &action, queued_at) => r,
            _ = self.abandoned(op) => return self.cancelled(req.action, "while executing"),
        };
        let out = match run {
            Ok(done) => {
                self.exec.record(req.action, &action, &done).await;
                response(Some(done.result), false, done.status)
            }
            Err(e) => {
                tracing::info!(action = %req.action, error = %e, "action not executed");
                response(None, false, e.to_rpc_status())
            }
        };
        self.metrics.histogram("casfs_exec_duration_seconds").observe(started.elapsed());
        out
    }

    /// Resolves once nobody has watched `op` (no Execute or WaitExecution stream) for the
    /// configured grace period: the client went away (Pants drops the Execute of an action
    /// its own cache read already answered; an interrupted build drops them all). Clients
    /// that reattach within the grace period keep the operation alive.
    async fn abandoned(&self, op: &Operation) {
        let Some(grace) = self.cfg.abandon_after else { return std::future::pending().await };
        let tick = Duration::from_millis(200).min(grace);
        let mut alone_since: Option<Instant> = None;
        loop {
            tokio::time::sleep(tick).await;
            if op.state.receiver_count() > 0 {
                alone_since = None;
            } else if alone_since.get_or_insert_with(Instant::now).elapsed() >= grace {
                return;
            }
        }
    }

    fn cancelled(&self, action: Digest, when: &str) -> reapi::ExecuteResponse {
        tracing::info!(%action, "no client waits for this action any more; cancelled {when}");
        self.metrics.add("casfs_exec_abandoned_total", 1);
        let st = rpc_status(tonic::Code::Cancelled, format!("cancelled {when}: no client was waiting for the result"));
        response(None, false, st)
    }

    /// Drops finished operations older than the retention period, and the oldest finished
    /// ones beyond [`MAX_RETAINED`] (down to 90% of it, so the sort is rare).
    fn reap(&self, t: &mut Table) {
        let keep = self.cfg.retention;
        let finished_at = |op: &Operation| *op.finished.lock().unwrap_or_else(|e| e.into_inner());
        t.ops.retain(|_, op| finished_at(op).is_none_or(|at| at.elapsed() < keep));
        if t.ops.len() <= MAX_RETAINED {
            return;
        }
        let mut done: Vec<(Instant, String)> =
            t.ops.iter().filter_map(|(name, op)| finished_at(op).map(|at| (at, name.clone()))).collect();
        done.sort();
        let excess = t.ops.len() - MAX_RETAINED * 9 / 10;
        for (_, name) in done.into_iter().take(excess) {
            t.ops.remove(&name);
        }
    }
}

fn response(result: Option<reapi::ActionResult>, cached: bool, status: rpc::Status) -> reapi::ExecuteResponse {
    reapi::ExecuteResponse {
        result,
        cached_result: cached,
        status: Some(status),
        server_logs: HashMap::new(),
        message: String::new(),
    }
}
