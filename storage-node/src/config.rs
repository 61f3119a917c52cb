//! Storage node configuration.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::host::{ShardConfigError, ShardHostConfig};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// Where RocksDB, packs and staging live.
    pub data_dir: PathBuf,
    /// gRPC listen address; port 0 picks a free port.
    #[serde(default = "default_grpc_addr")]
    pub grpc_addr: SocketAddr,
    /// Largest pack a single push may send, in bytes.
    #[serde(default = "default_max_pack_bytes")]
    pub max_pack_bytes: u64,
    /// Replicated shards hosted by this node. Absent (the default): the
    /// node serves from its single-node store only.
    #[serde(default)]
    pub shards: Option<ShardHostConfig>,
    /// Lets the `Admin.SetFaults` RPC cut this node's raft traffic, for
    /// partition tests. Never set it in production.
    #[serde(default)]
    pub fault_injection: bool,
}

fn default_grpc_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7410))
}

fn default_max_pack_bytes() -> u64 {
    2 << 30
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("data-dir must not be empty")]
    EmptyDataDir,
    #[error("max-pack-bytes must be greater than zero")]
    ZeroPackLimit,
    #[error(transparent)]
    Shards(#[from] ShardConfigError),
}

impl Config {
    pub fn new(data_dir: PathBuf) -> Self {
        Config {
            data_dir,
            grpc_addr: default_grpc_addr(),
            max_pack_bytes: default_max_pack_bytes(),
            shards: None,
            fault_injection: false,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::EmptyDataDir);
        }
        if self.max_pack_bytes == 0 {
            return Err(ConfigError::ZeroPackLimit);
        }
        if let Some(shards) = &self.shards {
            shards.validate()?;
        }
        Ok(())
    }
}
