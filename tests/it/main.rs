//! Integration tests: one binary, real servers on loopback, real processes.

#[macro_use]
mod common;
mod browse;
mod chunking;
mod cli_status;
mod compression;
mod conformance;
mod digest_cli;
mod digest_functions;
mod exec;
mod exec_limits;
mod exec_views;
mod execution;
mod fs_core;
mod golden;
mod hostile_clients;
mod hostile_exec;
mod instances;
mod lifetimes;
mod mount;
mod mount_life;
mod mount_memory;
mod mount_modes;
mod profiles;
mod remote;
mod remote_asset;
mod roundtrip;
mod sandbox;
mod sandbox_limits;
mod slow_links;
mod storage_faults;
mod tree_reads;
mod worker;
