//! The bot loop: opens a session, long-polls for leases, runs them, reports them, keeps the
//! session alive, reconnects after failures and drains on shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::lease::{self, Runner};
use super::ledger::{Decisions, Ledger};
use super::session::{heartbeat, Answer, Backoff, BotsClient, CallError};
use super::WorkerConfig;
use crate::cas::SharedCas;
use crate::digest::Digest;
use crate::error::{rpc_status, Error, Result};
use crate::exec::Executor;
use crate::proto::google::devtools::remoteworkers::v1test2::{self as rwapi, BotStatus, Lease};

/// How long a call in flight may still take once a lease has finished, before it is
/// dropped so that the result can be reported.
const REPORT_GRACE: Duration = Duration::from_millis(250);

/// How far a worker is asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StopLevel {
    /// Work normally.
    Run,
    /// Take no new leases, finish and report the running ones, then return.
    Drain,
    /// Stop the running actions now, hand their leases back, return.
    Abandon,
}

/// The receiving end of the stop requests (the CLI maps signals onto it).
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<StopLevel>);

impl Shutdown {
    /// A sender to raise the level and the matching receiver for [`Bot::run`].
    pub fn channel() -> (watch::Sender<StopLevel>, Shutdown) {
        let (tx, rx) = watch::channel(StopLevel::Run);
        (tx, Shutdown(rx))
    }

    fn level(&self) -> StopLevel {
        *self.0.borrow()
    }

    /// Resolves when the level changes; never when the sender is gone.
    async fn changed(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The scheduler's session as last seen.
struct Session {
    name: String,
    version: String,
    expires: Option<SystemTime>,
    /// The scheduler was told this bot is terminating.
    told_terminating: bool,
}

/// A worker attached to one scheduler.
pub struct Bot {
    cfg: WorkerConfig,
    bots: BotsClient,
    runner: Arc<Runner>,
    ledger: Ledger,
    tasks: HashMap<String, JoinHandle<()>>,
    done_tx: mpsc::UnboundedSender<Lease>,
    done_rx: mpsc::UnboundedReceiver<Lease>,
}

impl Bot {
    /// A bot running leases with `exec`, whose CAS (the scheduler's) is `cas`.
    pub fn new(cfg: WorkerConfig, bots: BotsClient, exec: Arc<Executor>, cas: SharedCas) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let runner = Arc::new(Runner::new(exec, cas));
        Bot { cfg, bots, runner, ledger: Ledger::new(), tasks: HashMap::new(), done_tx, done_rx }
    }

    fn gauge(&self, name: &str, v: u64) {
        self.runner.metrics().counter(name).store(v, std::sync::atomic::Ordering::Relaxed);
    }

    /// Works until `shutdown` says stop. Returns an error only when the scheduler refuses
    /// the very first session for good (wrong address, instance, platform or credentials);
    /// every later failure is retried with backoff.
    pub async fn run(mut self, mut shutdown: Shutdown) -> Result<()> {
        let mut session: Option<Session> = None;
        let mut ever_connected = false;
        let mut backoff = Backoff::new(self.cfg.max_backoff);
        loop {
            self.collect_finished();
            let stop = shutdown.level();
            if stop == StopLevel::Abandon {
                self.abandon(session.as_ref()).await;
                return Ok(());
            }
            if stop == StopLevel::Drain && self.ledger.is_empty() && session.as_ref().is_none_or(|s| s.told_terminating)
            {
                tracing::info!("drained: no lease left");
                return Ok(());
            }
            let Some(s) = session.as_mut() else {
                if stop != StopLevel::Run {
                    return Ok(());
                }
                let r = tokio::select! {
                    r = self.bots.create(&self.cfg.instance_name, self.message("", "", BotStatus::Ok, vec![]), self.cfg.long_poll) => r,
                    _ = shutdown.changed() => continue,
                };
                match r {
                    Ok(a) => {
                        tracing::info!(session = %a.session.name, bot_id = %self.cfg.bot_id, "bot session created");
                        self.runner.metrics().add("casfs_worker_sessions_created_total", 1);
                        self.gauge("casfs_worker_connected", 1);
                        ever_connected = true;
                        backoff.reset();
                        session = Some(Session {
                            name: a.session.name.clone(),
                            version: a.session.version.clone(),
                            expires: expiry(&a.session),
                            told_terminating: false,
                        });
                        let (_, sent) = self.ledger.report();
                        self.take(&sent, a, stop);
                    }
                    Err(CallError::Fatal(st)) if !ever_connected => {
                        return Err(Error::remote(format!("CreateBotSession for bot {:?}", self.cfg.bot_id), st));
                    }
                    Err(e) => {
                        let wait = backoff.next();
                        tracing::warn!(error = %e, retry_in = ?wait, "cannot open a bot session");
                        self.pause(wait, &mut shutdown).await;
                    }
                }
                continue;
            };

            let status = if stop == StopLevel::Run { BotStatus::Ok } else { BotStatus::BotTerminating };
            let (leases, sent) = self.ledger.report();
            let msg = self.message(&s.name, &s.version, status, leases);
            let started = Instant::now();
            let Some(r) = self.call(msg, &mut shutdown).await else { continue };
            match r {
                Ok(a) => {
                    backoff.reset();
                    self.gauge("casfs_worker_connected", 1);
                    s.version = a.session.version.clone();
                    s.expires = expiry(&a.session);
                    s.told_terminating = status == BotStatus::BotTerminating;
                    let started_any = self.take(&sent, a, stop);
                    let keepalive = heartbeat(s.expires, self.cfg.heartbeat);
                    let wait = self.next_call_in(stop, started.elapsed(), started_any, keepalive);
                    if !wait.is_zero() {
                        self.pause(wait, &mut shutdown).await;
                    }
                }
                Err(CallError::Transient(st)) => {
                    self.runner.metrics().add("casfs_worker_update_errors_total", 1);
                    self.gauge("casfs_worker_connected", 0);
                    if stop != StopLevel::Run && self.ledger.is_empty() {
                        tracing::info!(code = ?st.code(), "scheduler unreachable while draining; nothing left to report");
                        return Ok(());
                    }
                    let wait = backoff.next();
                    tracing::warn!(code = ?st.code(), message = st.message(), retry_in = ?wait, "UpdateBotSession failed; keeping the session");
                    self.pause(wait, &mut shutdown).await;
                }
                Err(e) => {
                    self.runner.metrics().add("casfs_worker_sessions_lost_total", 1);
                    self.gauge("casfs_worker_connected", 0);
                    let lost = self.ledger.clear();
                    tracing::warn!(error = %e, stopped = lost.len(), "bot session gone; its leases were re-queued by the scheduler");
                    for id in lost {
                        self.stop_task(&id);
                    }
                    session = None;
                    if matches!(e, CallError::Fatal(_)) {
                        let wait = backoff.next();
                        self.pause(wait, &mut shutdown).await;
                    }
                }
            }
        }
    }

    /// One UpdateBotSession. A lease finishing meanwhile is recorded at once; the call is
    /// then given a moment to return (a plain heartbeat does) before it is dropped as a long
    /// poll, so the result goes out without waiting for work to arrive. `None` when the call
    /// was dropped for that or for a change of the stop level.
    async fn call(
        &mut self,
        msg: rwapi::BotSession,
        shutdown: &mut Shutdown,
    ) -> Option<std::result::Result<Answer, CallError>> {
        let bots = self.bots.clone();
        let call = bots.update(msg, self.cfg.long_poll);
        tokio::pin!(call);
        let mut give_up: Option<tokio::time::Instant> = None;
        loop {
            let grace = async move {
                match give_up {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = &mut call => return Some(r),
                Some(l) = self.done_rx.recv() => {
                    self.finished(l);
                    give_up.get_or_insert_with(|| tokio::time::Instant::now() + REPORT_GRACE);
                }
                _ = grace => return None,
                _ = shutdown.changed() => return None,
            }
        }
    }

    /// The BotSession to send: identity, platform, capacity, status and leases.
    fn message(&self, name: &str, version: &str, status: BotStatus, leases: Vec<Lease>) -> rwapi::BotSession {
        let device = rwapi::Device {
            handle: self.cfg.bot_id.clone(),
            properties: self
                .cfg
                .platform
                .iter()
                .map(|(k, v)| rwapi::device::Property { key: k.clone(), value: v.clone() })
                .collect(),
        };
        rwapi::BotSession {
            name: name.to_string(),
            bot_id: self.cfg.bot_id.clone(),
            status: status as i32,
            worker: Some(rwapi::Worker {
                devices: vec![device],
                properties: vec![],
                configs: vec![rwapi::worker::Config {
                    key: "capacity".into(),
                    value: self.cfg.concurrency.to_string(),
                }],
            }),
            leases,
            expire_time: None,
            version: version.to_string(),
        }
    }

    /// Acts on an answer: stops leases taken away, starts (or refuses) new ones. Returns
    /// whether anything new started.
    fn take(&mut self, sent: &super::ledger::Sent, a: Answer, stop: StopLevel) -> bool {
        let Decisions { start, cancel, confirmed } = self.ledger.reconcile(sent, &a.session.leases);
        for id in confirmed {
            tracing::debug!(lease = %id, "report confirmed");
        }
        for id in cancel {
            tracing::info!(lease = %id, "lease cancelled by the scheduler; stopping its action");
            self.runner.metrics().add("casfs_worker_leases_cancelled_total", 1);
            self.stop_task(&id);
        }
        let queued: HashMap<Digest, Option<SystemTime>> = a.queued.into_iter().collect();
        let mut started = false;
        for l in start {
            let refuse = |why: &str| rpc_status(tonic::Code::Unavailable, why);
            let status = if stop != StopLevel::Run {
                Err(refuse("the worker is shutting down"))
            } else if self.ledger.running() >= self.cfg.concurrency {
                Err(refuse("the worker is at capacity"))
            } else {
                lease::decode(&l)
            };
            match status {
                Ok(job) => {
                    self.ledger.start(&job.id);
                    let (runner, tx, id) = (self.runner.clone(), self.done_tx.clone(), job.id.clone());
                    let q = queued.get(&job.action).copied().flatten();
                    self.tasks.insert(id, tokio::spawn(async move { drop(tx.send(runner.run(job, q).await)) }));
                    started = true;
                }
                Err(st) => {
                    tracing::warn!(lease = %l.id, code = st.code, message = %st.message, "lease refused");
                    self.runner.metrics().add("casfs_worker_leases_refused_total", 1);
                    self.ledger.refuse(lease::completed(&l.id, st, None));
                }
            }
        }
        self.gauge("casfs_worker_leases_running", self.ledger.running() as u64);
        started
    }

    /// How long to wait before the next call.
    fn next_call_in(&self, stop: StopLevel, took: Duration, started_any: bool, keepalive: Duration) -> Duration {
        if self.ledger.unreported() > 0 {
            return Duration::ZERO;
        }
        let running = self.ledger.running();
        if running == 0 && stop == StopLevel::Run {
            // Idle: long-poll again at once, unless the scheduler did not hold the call
            // (then do not spin).
            return if took < self.cfg.poll_interval && !started_any { self.cfg.poll_interval } else { Duration::ZERO };
        }
        if running == 0 {
            return Duration::ZERO;
        }
        let mut wait = keepalive;
        if stop == StopLevel::Run && running < self.cfg.concurrency {
            wait = wait.min(self.cfg.poll_interval);
        }
        wait.saturating_sub(took.min(wait))
    }

    /// Sleeps up to `d`, waking early when a lease finishes or the stop level changes.
    async fn pause(&mut self, d: Duration, shutdown: &mut Shutdown) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            Some(l) = self.done_rx.recv() => self.finished(l),
            _ = shutdown.changed() => {}
        }
    }

    fn collect_finished(&mut self) {
        while let Ok(l) = self.done_rx.try_recv() {
            self.finished(l);
        }
    }

    fn finished(&mut self, l: Lease) {
        self.tasks.remove(&l.id);
        if !self.ledger.complete(l) {
            tracing::debug!("result of a lease taken away meanwhile dropped");
        }
        self.gauge("casfs_worker_leases_running", self.ledger.running() as u64);
    }

    fn stop_task(&mut self, id: &str) {
        if let Some(h) = self.tasks.remove(id) {
            // Dropping the execution kills its processes and undoes its mounts.
            h.abort();
        }
    }

    /// Second signal: stop every action, wait for their cleanup, and hand the leases back
    /// (UNAVAILABLE, which BuildGrid re-queues at once) in one last short call.
    async fn abandon(&mut self, session: Option<&Session>) {
        let ids = self.ledger.running_ids();
        tracing::warn!(leases = ids.len(), "abandoning running leases");
        for (_, h) in self.tasks.drain() {
            h.abort();
            let _ = h.await;
        }
        self.collect_finished();
        for id in ids {
            if self.ledger.running_ids().contains(&id) {
                let st = rpc_status(tonic::Code::Unavailable, "the worker was stopped during the action");
                self.ledger.refuse(lease::completed(&id, st, None));
            }
        }
        let Some(s) = session else { return };
        if self.ledger.is_empty() {
            return;
        }
        let (leases, _) = self.ledger.report();
        let msg = self.message(&s.name, &s.version, BotStatus::BotTerminating, leases);
        if let Err(e) = self.bots.update(msg, Duration::from_secs(5)).await {
            tracing::warn!(error = %e, "could not hand the leases back; the scheduler re-queues them when the session expires");
        }
    }
}

fn expiry(s: &rwapi::BotSession) -> Option<SystemTime> {
    s.expire_time.and_then(|t| SystemTime::try_from(t).ok())
}
