//! Calls from this node to the others: one lazily connected channel per
//! peer, typed clients, and leader-following over a group's nodes — the
//! same client (`cairn-client`) the router and the CLI use.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cairn_client::{follow_leader, Attempt, NodePool, RetryPolicy};
use cairn_proto::admin::admin_client::AdminClient;
use cairn_proto::cluster::cluster_client::ClusterClient;
use cairn_proto::cluster::TransferShardLeaderRequest;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Marks a call one node forwarded to another, which must act or refuse.
pub const FORWARDED: &str = "x-cairn-forwarded";

/// This node's way to its peers (cheap to clone).
#[derive(Clone)]
pub struct Peers {
    pool: Arc<NodePool>,
    policy: RetryPolicy,
}

impl Default for Peers {
    fn default() -> Self {
        Peers {
            pool: Arc::default(),
            // Node-to-node steps (moves, transfers) outlast an election
            // with room to spare; nobody waits on them interactively.
            policy: RetryPolicy {
                rounds: 40,
                base_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_millis(300),
            },
        }
    }
}

fn url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

impl Peers {
    /// The channel to the node at `addr` (`host:port`).
    pub fn channel(&self, addr: &str) -> Result<Channel, Status> {
        self.pool
            .channel(&url(addr))
            .map_err(|e| Status::invalid_argument(format!("bad node address {addr}: {e}")))
    }

    pub fn cluster(&self, addr: &str) -> Result<ClusterClient<Channel>, Status> {
        Ok(ClusterClient::new(self.channel(addr)?))
    }

    pub fn admin(&self, addr: &str) -> Result<AdminClient<Channel>, Status> {
        Ok(AdminClient::new(self.channel(addr)?))
    }

    /// Runs `call` on the leader among `candidates` (`host:port`), following
    /// not-leader hints and moving past unreachable nodes.
    pub async fn on_leader<T, F, Fut>(
        &self,
        candidates: &[String],
        mut call: F,
    ) -> Result<T, Status>
    where
        F: FnMut(ClusterClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let urls: Vec<String> = candidates.iter().map(|a| url(a)).collect();
        follow_leader(&self.pool, &self.policy, &urls, |channel| {
            let answer = call(ClusterClient::new(channel));
            async move { answer.await.map_err(Attempt::from) }
        })
        .await
        .map(|(v, _)| v)
    }

    /// Asks `shard`'s leader, found from `candidates`, to hand leadership
    /// to `to`; marked forwarded, so the node reached acts or refuses and
    /// never forwards again.
    pub async fn transfer_leader(
        &self,
        candidates: &[String],
        shard: u64,
        to: u64,
    ) -> Result<(), Status> {
        self.on_leader(candidates, move |mut c| async move {
            let mut r = Request::new(TransferShardLeaderRequest {
                shard_id: shard,
                to_node: to,
            });
            r.metadata_mut()
                .insert(FORWARDED, MetadataValue::from_static("1"));
            c.transfer_shard_leader(r).await.map(|_| ())
        })
        .await
    }
}
