//! The Capabilities service: what the embedded server supports.

use tonic::{Request, Response, Status};

use super::MAX_BATCH_BYTES;
use crate::digest::DigestFunction;
use crate::proto::reapi::capabilities_server::Capabilities;
use crate::proto::reapi::{self, symlink_absolute_path_strategy};
use crate::proto::semver::SemVer;

pub(super) struct CapabilitiesService {
    pub(super) instances: std::sync::Arc<super::Instances>,
}

fn version(major: i32, minor: i32) -> Option<SemVer> {
    Some(SemVer { major, minor, patch: 0, prerelease: String::new() })
}

/// The capabilities the embedded server advertises (`exec_enabled` when it executes actions,
/// `ac_update_enabled` when clients may write the action cache).
pub fn server_capabilities(exec_enabled: bool, ac_update_enabled: bool) -> reapi::ServerCapabilities {
    let functions: Vec<i32> = DigestFunction::ALL.iter().map(|f| f.proto_value()).collect();
    reapi::ServerCapabilities {
        cache_capabilities: Some(reapi::CacheCapabilities {
            digest_functions: functions.clone(),
            action_cache_update_capabilities: Some(reapi::ActionCacheUpdateCapabilities {
                update_enabled: ac_update_enabled,
            }),
            cache_priority_capabilities: None,
            max_batch_total_size_bytes: MAX_BATCH_BYTES as i64,
            symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Allowed as i32,
            supported_compressors: vec![crate::cas::compress::ZSTD],
            supported_batch_update_compressors: vec![crate::cas::compress::ZSTD],
            max_cas_blob_size_bytes: 0,
            split_blob_support: true,
            splice_blob_support: true,
            fast_cdc_2020_params: Some(super::split::PARAMS.to_proto()),
            rep_max_cdc_params: None,
        }),
        execution_capabilities: Some(reapi::ExecutionCapabilities {
            digest_function: DigestFunction::Sha256.proto_value(),
            exec_enabled,
            execution_priority_capabilities: None,
            supported_node_properties: vec![],
            digest_functions: functions,
        }),
        deprecated_api_version: None,
        low_api_version: version(2, 0),
        high_api_version: version(2, 3),
    }
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        req: Request<reapi::GetCapabilitiesRequest>,
    ) -> Result<Response<reapi::ServerCapabilities>, Status> {
        // Each instance advertises what it does itself.
        let b = self.instances.get(&req.get_ref().instance_name)?;
        let ac_update_enabled = b.ac_writes == super::AcWrites::All;
        Ok(Response::new(server_capabilities(b.execution.is_some(), ac_update_enabled)))
    }
}
