//! A TCP proxy on 127.0.0.1 that adds a fixed delay to each direction, for benchmarks.
//!
//! This kernel has no netem qdisc, so `scripts/lib/delay-proxy.sh` puts this between a
//! client and a server to make round trips cost what they cost on a real network. Every chunk
//! read on one side is written to the other side `DELAY_MS` later, in order; chunks in flight
//! queue up behind each other rather than behind the delay, so throughput is not limited.
//! Plain threads (two per direction) rather than an async timer: `thread::sleep` keeps the
//! added delay within tens of microseconds, where a millisecond timer wheel would round it up.
//!
//! ```text
//! delay_proxy TARGET_HOST:PORT DELAY_MS
//! ```
//! It listens on a free port of 127.0.0.1, prints `listening on 127.0.0.1:PORT` and runs until
//! killed.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Largest chunk moved at once.
const CHUNK: usize = 256 << 10;
/// Chunks queued per direction before the reader waits (bounds the proxy's memory).
const QUEUED: usize = 1024;

/// Copies `from` to `to`, each chunk `delay` after it arrived.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(QUEUED);
    thread::spawn(move || loop {
        let mut buf = vec![0u8; CHUNK];
        let n = from.read(&mut buf).unwrap_or(0);
        buf.truncate(n);
        if tx.send((Instant::now() + delay, buf)).is_err() || n == 0 {
            return;
        }
    });
    thread::spawn(move || {
        while let Ok((due, data)) = rx.recv() {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if data.is_empty() || to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: delay_proxy TARGET_HOST:PORT DELAY_MS");
        std::process::exit(2);
    }
    let delay = match args[2].parse::<f64>() {
        Ok(ms) if ms >= 0.0 => Duration::from_secs_f64(ms / 1000.0),
        _ => {
            eprintln!("delay_proxy: DELAY_MS must be a number of milliseconds, got {:?}", args[2]);
            std::process::exit(2);
        }
    };
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("listening on {}", listener.local_addr()?);
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let Ok(server) = TcpStream::connect(&args[1]) else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        pipe(client, s2, delay);
        pipe(server, c2, delay);
    }
    Ok(())
}
