//! Integration tests: one binary, real servers on loopback, real processes.

#[macro_use]
mod common;
mod browse;
mod conformance;
mod exec;
mod execution;
mod fs_core;
mod golden;
mod mount;
mod mount_modes;
mod remote;
mod roundtrip;
mod sandbox;
mod sandbox_limits;
mod worker;
