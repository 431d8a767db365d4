//! The executor: runs a REAPI Action inside its lazily mounted input root (overlayfs on top
//! for writes), sandboxed, and reports an ActionResult. `spec` validates the request,
//! `workspace` makes the input root, `sandbox` confines the command, `capture` collects
//! outputs, `run` ties them together; `cached` puts the action cache around it.

pub(crate) mod cached;
pub(crate) mod capture;
pub(crate) mod materialize;
pub mod profile;
pub(crate) mod profiling;
pub(crate) mod run;
pub mod sandbox;
pub mod spec;
pub(crate) mod workspace;

pub use cached::{CachedExecutor, Outcome};
pub use profile::ProfileConfig;
pub use run::{load_action, ExecConfig, Executed, Executor};
pub use sandbox::SandboxConfig;
pub use spec::{ActionSpec, Limits, OutputKind, OutputSpec};
pub use workspace::Materialize;

/// Runs `f`, which makes system calls that may land in an action's own FUSE mount, without
/// holding up the async runtime: the FUSE replies need the runtime's other tasks to run
/// (fetches, the gRPC connection), and a worker thread stuck in such a call would starve
/// them (a task parked in that thread's LIFO slot is never stolen). On a multi-threaded
/// runtime the thread hands its queue to another one for the duration; elsewhere `f` just runs.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
