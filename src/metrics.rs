//! Counters and latency histograms, rendered in the Prometheus text format and served on an
//! optional `/metrics` listener.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

/// A latency histogram with fixed buckets.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS.iter().position(|b| s <= *b).unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// A registry of named counters and histograms (names may carry Prometheus labels).
#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    histograms: Mutex<BTreeMap<String, Arc<Histogram>>>,
}

impl Metrics {
    /// A shared, empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Metrics::default())
    }

    /// The counter called `name` (e.g. `casfs_fetch_blobs_total`), created at zero.
    pub fn counter(&self, name: &str) -> Arc<AtomicU64> {
        self.counters.lock().unwrap().entry(name.to_string()).or_default().clone()
    }

    /// Adds `n` to a counter.
    pub fn add(&self, name: &str, n: u64) {
        self.counter(name).fetch_add(n, Ordering::Relaxed);
    }

    /// Current value of a counter (0 if never touched).
    pub fn get(&self, name: &str) -> u64 {
        self.counters.lock().unwrap().get(name).map(|c| c.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// The histogram called `name`.
    pub fn histogram(&self, name: &str) -> Arc<Histogram> {
        self.histograms.lock().unwrap().entry(name.to_string()).or_default().clone()
    }

    /// Everything in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        self.render_labelled("")
    }

    /// Like [`Metrics::render`], with `label` (e.g. `instance="a"`; empty for none) added to
    /// every series: one registry per REAPI instance, all served on one page.
    pub fn render_labelled(&self, label: &str) -> String {
        let mut out = String::new();
        for (name, c) in self.counters.lock().unwrap().iter() {
            let name = with_label(name, label);
            let _ = writeln!(out, "{name} {}", c.load(Ordering::Relaxed));
        }
        for (name, h) in self.histograms.lock().unwrap().iter() {
            let name = with_label(name, label);
            let (base, labels) = match name.split_once('{') {
                Some((b, l)) => (b, l.trim_end_matches('}').to_string()),
                None => (name.as_str(), String::new()),
            };
            let sep = if labels.is_empty() { "" } else { "," };
            let mut cumulative = 0;
            for (i, b) in BUCKETS.iter().enumerate() {
                cumulative += h.counts[i].load(Ordering::Relaxed);
                let _ = writeln!(out, "{base}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
            }
            cumulative += h.counts[BUCKETS.len()].load(Ordering::Relaxed);
            let _ = writeln!(out, "{base}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}");
            let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
            let lbl = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
            let _ = writeln!(out, "{base}_sum{lbl} {sum}");
            let _ = writeln!(out, "{base}_count{lbl} {cumulative}");
        }
        out
    }
}

/// `name` (which may carry labels already) with `label` added first.
fn with_label(name: &str, label: &str) -> String {
    if label.is_empty() {
        return name.to_string();
    }
    match name.split_once('{') {
        Some((base, rest)) => format!("{base}{{{label},{rest}"),
        None => format!("{name}{{{label}}}"),
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped (HTTP/1.0, one response
/// per connection: enough for Prometheus and curl).
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    serve_page(listener, Arc::new(move || metrics.render())).await
}

/// Like [`serve`], with the page made by `render` (several registries on one page).
pub async fn serve_page(listener: tokio::net::TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let metrics = render.clone();
        tokio::spawn(async move {
            // Read at least the request line (it may arrive in pieces).
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 8192 {
                match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => break,
                }
            }
            let req = String::from_utf8_lossy(&buf);
            let (status, body) = if req.starts_with("GET /metrics") {
                ("200 OK", metrics())
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let head = format!(
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::new();
        m.add("casfs_x_total", 2);
        m.histogram("casfs_op_seconds{op=\"read\"}").observe(Duration::from_micros(70));
        let text = m.render();
        assert!(text.contains("casfs_x_total 2"), "{text}");
        assert!(text.contains("casfs_op_seconds_bucket{op=\"read\",le=\"0.0001\"} 1"), "{text}");
        assert!(text.contains("casfs_op_seconds_count{op=\"read\"} 1"), "{text}");
        let text = m.render_labelled("instance=\"a\"");
        assert!(text.contains("casfs_x_total{instance=\"a\"} 2"), "{text}");
        assert!(text.contains("casfs_op_seconds_count{instance=\"a\",op=\"read\"} 1"), "{text}");
        assert!(text.contains("casfs_op_seconds_bucket{instance=\"a\",op=\"read\",le=\"0.0001\"} 1"), "{text}");
    }
}
