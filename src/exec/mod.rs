//! The executor: runs a REAPI Action inside its lazily mounted input root (overlayfs on top
//! for writes), sandboxed, and reports an ActionResult. `spec` validates the request,
//! `sandbox` confines the command, `capture` collects outputs, `run` ties them together.

pub mod capture;
pub mod client;
pub mod materialize;
pub mod run;
pub mod sandbox;
pub mod spec;

pub use run::{ExecConfig, Executor, Materialize, Outcome, RunOptions};
pub use sandbox::SandboxConfig;
pub use spec::{ActionSpec, Limits, OutputKind, OutputSpec};

/// Runs `f`, which makes system calls that may land in an action's own FUSE mount, without
/// holding up the async runtime: the FUSE replies need the runtime's other tasks to run
/// (fetches, the gRPC connection), and a worker thread stuck in such a call would starve
/// them (a task parked in that thread's LIFO slot is never stolen). On a multi-threaded
/// runtime the thread hands its queue to another one for the duration; elsewhere `f` just runs.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
