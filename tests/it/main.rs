//! Integration tests: one binary, real servers on loopback, real processes.

mod browse;
mod common;
mod conformance;
mod exec;
mod fs_core;
mod golden;
mod mount;
mod remote;
mod roundtrip;
