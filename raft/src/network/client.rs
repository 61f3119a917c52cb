//! Sending side: openraft's `RaftNetworkFactory` / `RaftNetworkV2` over
//! one shared gRPC channel per peer node.

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cairn_proto::raft::raft_client::RaftClient;
use cairn_proto::raft::{GroupMessage, GroupReply, SnapshotChunk};
use openraft::error::{
    NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::RaftNetworkV2;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::instrument;

use super::filter::TransportFilter;
use super::server::ReadIndexReply;
use crate::keys::GroupId;
use crate::snapshot::SnapshotFile;
use crate::types::{NodeId, PeerAddr, Snapshot, TypeConfig, Vote};

type RpcError = RPCError<TypeConfig>;

/// How the client side connects and streams.
#[derive(Debug, Clone)]
pub struct NetworkOptions {
    /// Bound on establishing a TCP/HTTP2 connection to a peer; a dead peer
    /// must fail fast so openraft can back off instead of burning its
    /// whole RPC timeout on a connect.
    pub connect_timeout: Duration,
    /// Snapshot bytes per streamed chunk when openraft does not ask for a
    /// size (`RPCOption::snapshot_chunk_size`).
    pub snapshot_chunk_size: usize,
}

impl Default for NetworkOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            snapshot_chunk_size: 1 << 20,
        }
    }
}

/// One lazily connected gRPC channel per peer node, shared by every group
/// that replicates to that node: this is what multiplexes many groups over
/// one HTTP/2 connection. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct PeerPool {
    channels: Arc<Mutex<HashMap<NodeId, (String, Channel)>>>,
    options: NetworkOptions,
}

/// A peer address that cannot be turned into a gRPC endpoint.
#[derive(Debug, thiserror::Error)]
#[error("peer {target} has an invalid raft address {addr:?}")]
pub struct InvalidPeerAddr {
    pub target: NodeId,
    pub addr: String,
    #[source]
    pub source: tonic::transport::Error,
}

impl PeerPool {
    /// An empty pool with the given connection options.
    pub fn new(options: NetworkOptions) -> Self {
        Self {
            channels: Arc::default(),
            options,
        }
    }

    /// The options the pool connects and streams with.
    pub fn options(&self) -> &NetworkOptions {
        &self.options
    }

    /// The channel to `target`, created (not yet connected) on first use.
    /// A changed address replaces the cached channel: membership is the
    /// truth about where a peer lives.
    pub fn channel(&self, target: NodeId, addr: &PeerAddr) -> Result<Channel, InvalidPeerAddr> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((known, channel)) = channels.get(&target) {
            if *known == addr.addr {
                return Ok(channel.clone());
            }
        }
        let uri = if addr.addr.contains("://") {
            addr.addr.clone()
        } else {
            format!("http://{}", addr.addr)
        };
        let invalid = |source| InvalidPeerAddr {
            target,
            addr: addr.addr.clone(),
            source,
        };
        let channel = Endpoint::from_shared(uri)
            .map_err(invalid)?
            .connect_timeout(self.options.connect_timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(target, (addr.addr.clone(), channel.clone()));
        Ok(channel)
    }

    /// Drops the cached channel of `target` (e.g. the node left the cluster).
    pub fn forget(&self, target: NodeId) {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&target);
    }

    /// Number of peers with a cached channel.
    pub fn len(&self) -> usize {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Whether no channel is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Asks `target`, believed to lead `group`, for a read index (see
    /// [`ReadIndexReply`]); `timeout` bounds the whole call.
    pub async fn read_index(
        &self,
        group: GroupId,
        target: NodeId,
        addr: &PeerAddr,
        timeout: Duration,
    ) -> Result<ReadIndexReply, tonic::Status> {
        let channel = self
            .channel(target, addr)
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut client = RaftClient::new(channel);
        let call = client.read_index(GroupMessage {
            group: group.0,
            payload: Bytes::new(),
        });
        let reply = tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| {
                tonic::Status::unavailable(format!("read index from node {target} timed out"))
            })??
            .into_inner();
        postcard::from_bytes(&reply.payload)
            .map_err(|e| tonic::Status::internal(format!("cannot decode read index reply: {e}")))
    }
}

/// openraft network factory of one group on one node. Every client it
/// makes shares the node's [`PeerPool`].
#[derive(Debug, Clone)]
pub struct GroupNetworkFactory {
    group: GroupId,
    node: NodeId,
    pool: PeerPool,
    filter: TransportFilter,
}

impl GroupNetworkFactory {
    /// Factory for `group` on node `node`; `filter` is consulted before
    /// every RPC (pass `TransportFilter::default()` outside tests).
    pub fn new(group: GroupId, node: NodeId, pool: PeerPool, filter: TransportFilter) -> Self {
        Self {
            group,
            node,
            pool,
            filter,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for GroupNetworkFactory {
    type Network = GroupNetwork;

    async fn new_client(&mut self, target: NodeId, node: &PeerAddr) -> GroupNetwork {
        GroupNetwork {
            group: self.group,
            from: self.node,
            target,
            addr: node.clone(),
            pool: self.pool.clone(),
            filter: self.filter.clone(),
        }
    }
}

/// openraft's connection from one group replica to the same group on
/// `target`. Holds no connection of its own: it borrows the pool's channel
/// per call, so a reconnect by one group serves all of them.
#[derive(Debug)]
pub struct GroupNetwork {
    group: GroupId,
    from: NodeId,
    target: NodeId,
    addr: PeerAddr,
    pool: PeerPool,
    filter: TransportFilter,
}

/// Which unary RPC to call.
#[derive(Debug, Clone, Copy)]
enum Unary {
    AppendEntries,
    Vote,
    PreVote,
    TransferLeader,
}

impl Unary {
    fn rpc_type(self) -> RPCTypes {
        match self {
            Unary::AppendEntries => RPCTypes::AppendEntries,
            // openraft has no pre-vote RPC type; a pre-vote is a vote probe.
            Unary::Vote | Unary::PreVote => RPCTypes::Vote,
            Unary::TransferLeader => RPCTypes::TransferLeader,
        }
    }
}

/// Maps a gRPC status to openraft's error classes. openraft backs off much
/// longer after `Unreachable`, so only "nobody is there to answer" goes
/// there: the connection failed, or the peer does not host the group (yet,
/// or any more). Everything else is a `NetworkError`, retried soon.
pub(crate) fn status_to_rpc_error(
    status: tonic::Status,
    action: RPCTypes,
    from: NodeId,
    target: NodeId,
    ttl: Duration,
) -> RpcError {
    use tonic::Code;
    match status.code() {
        Code::Unavailable | Code::NotFound | Code::Unimplemented => {
            RPCError::Unreachable(Unreachable::new(&status))
        }
        Code::DeadlineExceeded | Code::Cancelled => RPCError::Timeout(Timeout {
            action,
            id: from,
            target,
            timeout: ttl,
        }),
        _ => RPCError::Network(NetworkError::new(&status)),
    }
}

impl GroupNetwork {
    fn client(&self) -> Result<RaftClient<Channel>, RpcError> {
        if !self.filter.allows(self.from, self.target) {
            return Err(RPCError::Unreachable(Unreachable::from_string(format!(
                "traffic {} -> {} dropped by the transport filter",
                self.from, self.target
            ))));
        }
        let channel = self
            .pool
            .channel(self.target, &self.addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        Ok(RaftClient::new(channel))
    }

    fn timeout(&self, action: RPCTypes, ttl: Duration) -> Timeout<TypeConfig> {
        Timeout {
            action,
            id: self.from,
            target: self.target,
            timeout: ttl,
        }
    }

    async fn unary<Req, Resp>(
        &mut self,
        kind: Unary,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RpcError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let action = kind.rpc_type();
        let ttl = option.hard_ttl();
        let mut client = self.client()?;
        let payload =
            postcard::to_allocvec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(GroupMessage {
            group: self.group.0,
            payload: Bytes::from(payload),
        });
        // The deadline travels to the server too, so it stops working on an
        // answer nobody waits for.
        request.set_timeout(ttl);
        let call = async move {
            match kind {
                Unary::AppendEntries => client.append_entries(request).await,
                Unary::Vote => client.vote(request).await,
                Unary::PreVote => client.pre_vote(request).await,
                Unary::TransferLeader => client.transfer_leader(request).await,
            }
        };
        let reply: GroupReply = match tokio::time::timeout(ttl, call).await {
            Err(_) => return Err(RPCError::Timeout(self.timeout(action, ttl))),
            Ok(Err(status)) => {
                return Err(status_to_rpc_error(
                    status,
                    action,
                    self.from,
                    self.target,
                    ttl,
                ))
            }
            Ok(Ok(reply)) => reply.into_inner(),
        };
        postcard::from_bytes(&reply.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

/// Reads up to `buf.len()` bytes, fewer only at end of file.
fn read_full(file: &mut SnapshotFile, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Feeds the snapshot file into `tx` chunk by chunk; runs on a blocking
/// thread because the file is read with std I/O. Stops quietly when the
/// receiving side (the RPC) is gone.
fn send_chunks(
    mut file: SnapshotFile,
    group: GroupId,
    header: Vec<u8>,
    chunk_size: usize,
    tx: tokio::sync::mpsc::Sender<SnapshotChunk>,
) -> io::Result<()> {
    // The snapshot handle may have been read before (openraft reuses the
    // current snapshot for several followers): always start at byte 0.
    file.seek(SeekFrom::Start(0))?;
    let mut header = Some(Bytes::from(header));
    loop {
        let mut buf = vec![0u8; chunk_size];
        let n = read_full(&mut file, &mut buf)?;
        buf.truncate(n);
        let done = n < chunk_size;
        let chunk = SnapshotChunk {
            group: group.0,
            header: header.take().unwrap_or_default(),
            data: Bytes::from(buf),
            done,
        };
        if tx.blocking_send(chunk).is_err() || done {
            return Ok(());
        }
    }
}

impl RaftNetworkV2<TypeConfig> for GroupNetwork {
    type SnapshotData = SnapshotFile;

    #[instrument(level = "debug", skip_all, fields(group = %self.group, from = self.from, target = self.target))]
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RpcError> {
        self.unary(Unary::AppendEntries, &rpc, &option).await
    }

    #[instrument(level = "debug", skip_all, fields(group = %self.group, from = self.from, target = self.target))]
    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RpcError> {
        self.unary(Unary::Vote, &rpc, &option).await
    }

    #[instrument(level = "debug", skip_all, fields(group = %self.group, from = self.from, target = self.target))]
    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RpcError> {
        self.unary(Unary::PreVote, &rpc, &option).await
    }

    #[instrument(level = "debug", skip_all, fields(group = %self.group, from = self.from, target = self.target))]
    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RpcError> {
        self.unary(Unary::TransferLeader, &req, &option).await
    }

    /// Streams the snapshot file; `option.hard_ttl()` (openraft's
    /// install-snapshot timeout) bounds the whole transfer, so size that
    /// timeout for the largest expected snapshot.
    #[instrument(level = "debug", skip_all, fields(group = %self.group, from = self.from, target = self.target))]
    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot<SnapshotFile>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let ttl = option.hard_ttl();
        let mut client = self.client()?;
        let header = postcard::to_allocvec(&(&vote, &snapshot.meta))
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let chunk_size = option
            .snapshot_chunk_size()
            .unwrap_or(self.pool.options().snapshot_chunk_size)
            .max(1);
        // A small buffer keeps at most a few chunks in memory and lets the
        // file reader run ahead of the network by that much.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let group = self.group;
        let file = snapshot.snapshot;
        let reader =
            tokio::task::spawn_blocking(move || send_chunks(file, group, header, chunk_size, tx));
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request.set_timeout(ttl);
        let call = tokio::time::timeout(ttl, client.install_snapshot(request));
        let reply = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            res = call => res,
        };
        // A failed read ends the stream early, which the receiver rejects;
        // report the read error itself rather than the receiver's complaint.
        match reader.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(StreamingError::Network(NetworkError::new(&e))),
            Err(e) => return Err(StreamingError::Network(NetworkError::new(&e))),
        }
        let reply = match reply {
            Err(_) => {
                return Err(StreamingError::Timeout(
                    self.timeout(RPCTypes::InstallSnapshot, ttl),
                ))
            }
            Ok(Err(status)) => {
                return Err(status_to_rpc_error(
                    status,
                    RPCTypes::InstallSnapshot,
                    self.from,
                    self.target,
                    ttl,
                )
                .into())
            }
            Ok(Ok(reply)) => reply.into_inner(),
        };
        postcard::from_bytes(&reply.payload)
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))
    }
}
