//! The executor: runs a REAPI Action inside its (lazily mounted) input root and reports an
//! ActionResult. `spec` validates what a client asked for.

pub mod spec;

pub use spec::{ActionSpec, Limits, OutputKind, OutputSpec};
