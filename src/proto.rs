//! Generated protobuf messages and gRPC stubs, in modules that mirror the proto packages.
#![allow(clippy::all, missing_docs, rustdoc::all)]

/// `build.bazel.*`: REAPI v2, Remote Asset v1 and semver.
pub mod build {
    pub mod bazel {
        pub mod semver {
            tonic::include_proto!("build.bazel.semver");
        }
        pub mod remote {
            pub mod asset {
                pub mod v1 {
                    tonic::include_proto!("build.bazel.remote.asset.v1");
                }
            }
            pub mod execution {
                pub mod v2 {
                    tonic::include_proto!("build.bazel.remote.execution.v2");
                }
            }
        }
    }
}

/// `google.*`: ByteStream, longrunning, rpc, remote workers.
pub mod google {
    pub mod bytestream {
        tonic::include_proto!("google.bytestream");
    }
    pub mod longrunning {
        tonic::include_proto!("google.longrunning");
    }
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
    pub mod devtools {
        pub mod remoteworkers {
            pub mod v1test2 {
                tonic::include_proto!("google.devtools.remoteworkers.v1test2");
            }
        }
    }
}

/// `casfs.v1`: casfs's own messages (resource usage of an action).
pub mod casfs {
    tonic::include_proto!("casfs.v1");

    /// The full name of [`ResourceUsage`], for `Any.type_url`.
    pub const RESOURCE_USAGE: &str = "casfs.v1.ResourceUsage";
}

pub use build::bazel::remote::asset::v1 as asset;
pub use build::bazel::remote::execution::v2 as reapi;
pub use build::bazel::semver;
pub use google::bytestream;
pub use google::longrunning;
pub use google::rpc;
