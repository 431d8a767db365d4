//! Compiles our `proto/` files with the vendored protoc into prost messages and tonic stubs.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    // prost-build finds protoc through this variable; the build needs no system protoc.
    std::env::set_var("PROTOC", protoc);
    let files: Vec<PathBuf> = [
        "build/bazel/semver/semver.proto",
        "build/bazel/remote/execution/v2/remote_execution.proto",
        "build/bazel/remote/asset/v1/remote_asset.proto",
        "google/bytestream/bytestream.proto",
        "google/longrunning/operations.proto",
        "google/rpc/code.proto",
        "google/rpc/error_details.proto",
        "google/rpc/status.proto",
        "google/devtools/remoteworkers/v1test2/bots.proto",
        "google/devtools/remoteworkers/v1test2/command.proto",
        "google/devtools/remoteworkers/v1test2/worker.proto",
        "casfs/v1/resource_usage.proto",
    ]
    .iter()
    .map(|f| PathBuf::from("proto").join(f))
    .collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".")
        .compile_protos(&files, &[PathBuf::from("proto"), well_known])?;
    Ok(())
}
