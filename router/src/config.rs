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
    /// May be empty when `storage-nodes` names the cluster instead.
    #[serde(default)]
    pub storage_node: String,
    /// gRPC endpoints of the storage nodes of a replicated cluster: the
    /// seeds the router asks where each workspace's shard lives (its
    /// replicas need not be among them), and the nodes it uses itself when
    /// the nodes predate that directory. Combined with `storage-node` when
    /// both are given.
    #[serde(default)]
    pub storage_nodes: Vec<String>,
    /// An operator token: whoever presents it (Basic
    /// `x-token-auth:<token>` or Bearer) administers every repository. A
    /// break-glass credential for a cluster whose users are not set up;
    /// leave it out otherwise. Users' own tokens are in the identity model.
    #[serde(default)]
    pub token: Option<String>,
    /// SSH listen address for git over SSH; none serves no SSH.
    #[serde(default)]
    pub ssh_addr: Option<SocketAddr>,
    /// The SSH host key (OpenSSH format), generated there on first start.
    #[serde(default)]
    pub ssh_host_key: Option<std::path::PathBuf>,
    /// Base URL clients reach the router at (`http(s)://host[:port][/path]`),
    /// for the links in REST answers. When absent, links name the listen
    /// address; never a request's `Host` header, which any client can set.
    #[serde(default)]
    pub public_url: Option<String>,
    /// Largest upload-pack request body (wants and haves), in bytes.
    #[serde(default = "default_max_negotiation_bytes")]
    pub max_negotiation_bytes: u64,
    /// Largest receive-pack request body (commands and pack), in bytes.
    #[serde(default = "default_max_push_bytes")]
    pub max_push_bytes: u64,
    /// Send every request to the configured storage nodes (and where their
    /// not-leader answers point) instead of the replicas the directory
    /// names: a router pinned to some nodes, e.g. on one side of a network.
    #[serde(default)]
    pub pinned: bool,
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
    #[error("at least one of storage-node or storage-nodes must be set")]
    NoStorageNode,
    #[error("token must be at least 16 characters")]
    WeakToken,
    #[error("public-url must be an http:// or https:// URL with a host and no query, got {0:?}")]
    BadPublicUrl(String),
}

impl Config {
    pub fn new(storage_node: String, token: Option<String>) -> Self {
        Config {
            http_addr: default_http_addr(),
            storage_node,
            storage_nodes: Vec::new(),
            token,
            ssh_addr: None,
            ssh_host_key: None,
            public_url: None,
            max_negotiation_bytes: default_max_negotiation_bytes(),
            max_push_bytes: default_max_push_bytes(),
            pinned: false,
        }
    }

    /// Every configured storage node, `storage-node` first, without
    /// duplicates, in configuration order (the order seeds are asked, and
    /// leader search tries without a directory).
    pub fn nodes(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let single = (!self.storage_node.is_empty()).then_some(&self.storage_node);
        for n in single.into_iter().chain(&self.storage_nodes) {
            if !out.contains(n) {
                out.push(n.clone());
            }
        }
        out
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let nodes = self.nodes();
        if nodes.is_empty() {
            return Err(ConfigError::NoStorageNode);
        }
        if let Some(bad) = nodes
            .iter()
            .find(|n| !n.starts_with("http://") && !n.starts_with("https://"))
        {
            return Err(ConfigError::BadStorageNode(bad.clone()));
        }
        if self.token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(ConfigError::WeakToken);
        }
        if let Some(url) = &self.public_url {
            let rest = url
                .strip_prefix("https://")
                .or_else(|| url.strip_prefix("http://"));
            let ok = rest.is_some_and(|r| {
                let host = r.split('/').next().unwrap_or_default();
                !host.is_empty()
                    && !r.contains(['?', '#'])
                    && r.chars().all(|c| c.is_ascii_graphic())
            });
            if !ok {
                return Err(ConfigError::BadPublicUrl(url.clone()));
            }
        }
        Ok(())
    }

    /// The base of every link the router gives out: `public-url`, else the
    /// address it listens on (`bound`, which has the real port).
    pub fn base_url(&self, bound: SocketAddr) -> String {
        if let Some(url) = &self.public_url {
            return url.trim_end_matches('/').to_owned();
        }
        if bound.ip().is_unspecified() {
            // Listening everywhere names no host; the local one is the
            // only one sure to reach it.
            return format!("http://localhost:{}", bound.port());
        }
        format!("http://{bound}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_node_still_valid() {
        let c = Config::new(
            "http://127.0.0.1:7410".into(),
            Some("0123456789abcdef".into()),
        );
        assert!(c.validate().is_ok());
        assert_eq!(c.nodes(), vec!["http://127.0.0.1:7410".to_owned()]);
    }

    #[test]
    fn node_list_merged_and_validated() {
        let mut c = Config::new(String::new(), Some("0123456789abcdef".into()));
        assert!(matches!(c.validate(), Err(ConfigError::NoStorageNode)));
        c.storage_nodes = vec!["http://a:1".into(), "http://b:1".into()];
        assert!(c.validate().is_ok());
        c.storage_node = "http://b:1".into();
        assert_eq!(
            c.nodes(),
            vec!["http://b:1".to_owned(), "http://a:1".into()]
        );
        c.storage_nodes.push("b:2".into());
        assert!(matches!(c.validate(), Err(ConfigError::BadStorageNode(n)) if n == "b:2"));
    }

    #[test]
    fn links_come_from_the_config_or_the_listen_address() {
        let mut c = Config::new(
            "http://127.0.0.1:7410".into(),
            Some("0123456789abcdef".into()),
        );
        let bound: SocketAddr = "127.0.0.1:8123".parse().unwrap();
        assert_eq!(c.base_url(bound), "http://127.0.0.1:8123");
        assert_eq!(
            c.base_url("0.0.0.0:80".parse().unwrap()),
            "http://localhost:80"
        );
        assert_eq!(c.base_url("[::1]:80".parse().unwrap()), "http://[::1]:80");
        c.public_url = Some("https://git.example.com/".into());
        assert!(c.validate().is_ok());
        assert_eq!(c.base_url(bound), "https://git.example.com");
        for bad in [
            "git.example.com",
            "ftp://x",
            "https://",
            "https://x/?a",
            "https://a b",
        ] {
            c.public_url = Some(bad.into());
            assert!(
                matches!(c.validate(), Err(ConfigError::BadPublicUrl(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn toml_shape() {
        let c: Config = serde_json::from_str(
            r#"{"storage-nodes": ["http://a:1", "http://b:1"], "token": "0123456789abcdef"}"#,
        )
        .expect("parses");
        assert_eq!(c.nodes().len(), 2);
    }
}
