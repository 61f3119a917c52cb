//! Router configuration.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// HTTP listen address; port 0 picks a free port.
    #[serde(default = "default_http_addr")]
    pub http_addr: SocketAddr,
    /// gRPC endpoint of the storage node, e.g. `http://127.0.0.1:7410`.
    pub storage_node: String,
    /// The access token clients present (Basic `x-token-auth:<token>` or
    /// Bearer). Every request except `/healthz` must carry it.
    pub token: String,
    /// Base URL clients reach the router at, for clone links; derived from
    /// the request's `Host` header when absent.
    #[serde(default)]
    pub public_url: Option<String>,
    /// Largest upload-pack request body (wants and haves), in bytes.
    #[serde(default = "default_max_negotiation_bytes")]
    pub max_negotiation_bytes: u64,
    /// Largest receive-pack request body (commands and pack), in bytes.
    #[serde(default = "default_max_push_bytes")]
    pub max_push_bytes: u64,
}

fn default_http_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_max_negotiation_bytes() -> u64 {
    64 << 20
}

fn default_max_push_bytes() -> u64 {
    2 << 30
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("storage-node must be an http:// URL, got {0:?}")]
    BadStorageNode(String),
    #[error("token must be at least 16 characters")]
    WeakToken,
}

impl Config {
    pub fn new(storage_node: String, token: String) -> Self {
        Config {
            http_addr: default_http_addr(),
            storage_node,
            token,
            public_url: None,
            max_negotiation_bytes: default_max_negotiation_bytes(),
            max_push_bytes: default_max_push_bytes(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.storage_node.starts_with("http://") && !self.storage_node.starts_with("https://") {
            return Err(ConfigError::BadStorageNode(self.storage_node.clone()));
        }
        if self.token.len() < 16 {
            return Err(ConfigError::WeakToken);
        }
        Ok(())
    }
}
