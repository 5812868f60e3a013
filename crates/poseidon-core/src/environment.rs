//! Execution environments: what a runner looks like (image, limits, network).

use serde::{Deserialize, Serialize};

use crate::ids::EnvironmentId;

/// An execution environment as CodeOcean defines it; also its persisted form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentConfig {
    pub id: EnvironmentId,
    pub prewarming_pool_size: u32,
    /// CPU share in MHz; 0 means unlimited.
    pub cpu_limit: u32,
    /// Hard memory limit in MB (swap included); 0 means the backend's default.
    pub memory_limit: u32,
    pub image: String,
    pub network_access: bool,
    pub exposed_ports: Vec<u16>,
}
