//! SIGINT/SIGTERM as a value a subcommand waits on.

/// SIGINT and SIGTERM handlers, installed when created: a signal that arrives before
/// anyone waits (right after a readiness report, say) is kept, not fatal.
pub struct Shutdown {
    signals: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Shutdown {
    /// Installs the handlers (needs a running tokio runtime).
    pub fn install() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let signals = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(t), Ok(i)) => Some((t, i)),
            _ => {
                tracing::warn!("could not install SIGINT/SIGTERM handlers");
                None
            }
        };
        Shutdown { signals }
    }

    /// Resolves on SIGINT or SIGTERM (the caller logs its shutdown under its own name).
    pub async fn wait(self) {
        let Some((mut term, mut int)) = self.signals else { return std::future::pending().await };
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    }
}
