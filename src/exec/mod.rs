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
