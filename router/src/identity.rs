//! The router's copy of the identity model, and what it sends back.
//!
//! Every request is authenticated and authorized against a snapshot of
//! the meta group's users, tokens and permissions held in memory, so a
//! git request costs one keyed hash and a few map lookups, never a meta
//! read. A background task asks any storage node for a newer snapshot
//! every [`POLL`]; a revoked token or permission therefore stops working
//! everywhere within about one poll plus one meta read (the bound stated
//! to operators is 2 s).
//!
//! Two kinds of writes are batched rather than made per request: tokens'
//! last-used times (flushed every [`TOUCH_FLUSH`]) and audit records such
//! as failed sign-ins (every [`AUDIT_FLUSH`]), each buffer bounded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use cairn_client::{Attempt, Cluster};
use cairn_identity::change::{AuditEvent, Change, Request};
use cairn_identity::{Index, Snapshot};
use cairn_proto::identity::identity_client::IdentityClient;
use cairn_proto::identity::{ChangeRequest, SnapshotRequest};

pub const POLL: Duration = Duration::from_millis(500);
pub const TOUCH_FLUSH: Duration = Duration::from_secs(30);
pub const AUDIT_FLUSH: Duration = Duration::from_secs(2);
/// Buffered audit records before new ones are counted and dropped.
const MAX_PENDING_AUDIT: usize = 10_000;
/// Distinct tokens whose use is remembered between flushes.
const MAX_PENDING_TOUCH: usize = 100_000;

pub struct Identities {
    index: RwLock<Arc<Index>>,
    touched: Mutex<HashMap<String, i64>>,
    audit: Mutex<(Vec<AuditEvent>, u64)>,
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Identities {
    pub fn new() -> Arc<Self> {
        Arc::new(Identities {
            index: RwLock::new(Arc::new(Index::default())),
            touched: Mutex::new(HashMap::new()),
            audit: Mutex::new((Vec::new(), 0)),
        })
    }

    /// The snapshot as of now.
    pub fn index(&self) -> Arc<Index> {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn install(&self, snapshot: Snapshot) {
        *self.index.write().unwrap_or_else(PoisonError::into_inner) =
            Arc::new(Index::new(snapshot));
    }

    /// Notes that token `id` was used now.
    pub fn touch(&self, id: &str) {
        let mut t = self.touched.lock().unwrap_or_else(PoisonError::into_inner);
        if t.len() < MAX_PENDING_TOUCH || t.contains_key(id) {
            t.insert(id.to_owned(), now());
        }
    }

    /// Queues an audit record.
    pub fn record(&self, event: AuditEvent) {
        let mut a = self.audit.lock().unwrap_or_else(PoisonError::into_inner);
        if a.0.len() < MAX_PENDING_AUDIT {
            a.0.push(event);
        } else {
            a.1 += 1;
        }
    }

    /// Fetches the snapshot once (waiting for it at start), then keeps it
    /// fresh and flushes the batches, for the router's life.
    pub fn spawn(self: &Arc<Self>, cluster: Arc<Cluster>) {
        let me = Arc::clone(self);
        let c = Arc::clone(&cluster);
        tokio::spawn(async move {
            loop {
                me.refresh(&c).await;
                tokio::time::sleep(POLL).await;
            }
        });
        let me = Arc::clone(self);
        let c = Arc::clone(&cluster);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(TOUCH_FLUSH).await;
                let used: Vec<(String, i64)> =
                    std::mem::take(&mut *me.touched.lock().unwrap_or_else(PoisonError::into_inner))
                        .into_iter()
                        .collect();
                if !used.is_empty() {
                    send(&c, "", Change::TouchTokens(used)).await;
                }
            }
        });
        let me = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(AUDIT_FLUSH).await;
                let (events, dropped) = {
                    let mut a = me.audit.lock().unwrap_or_else(PoisonError::into_inner);
                    (std::mem::take(&mut a.0), std::mem::take(&mut a.1))
                };
                if dropped > 0 {
                    tracing::warn!(dropped, "audit records dropped: more than the buffer holds");
                }
                for chunk in events.chunks(cairn_identity::change::MAX_AUDIT_BATCH) {
                    send(&cluster, "router", Change::Record(chunk.to_vec())).await;
                }
            }
        });
    }

    /// Installs a newer snapshot if there is one.
    pub async fn refresh(&self, cluster: &Cluster) {
        let _ = self.try_refresh(cluster).await;
    }

    /// Like [`Identities::refresh`], saying whether the nodes answered.
    pub async fn try_refresh(&self, cluster: &Cluster) -> Result<(), tonic::Status> {
        let known = self.index().version;
        let request = SnapshotRequest {
            known_version: known,
        };
        let answer = cluster
            .call_read("", |ch| async move {
                Ok(IdentityClient::new(ch)
                    .max_decoding_message_size(64 << 20)
                    .snapshot(request)
                    .await?)
            })
            .await;
        match answer {
            Ok(r) => {
                let r = r.into_inner();
                if r.unchanged {
                    return Ok(());
                }
                match serde_json::from_slice::<Snapshot>(&r.snapshot_json) {
                    Ok(s) => self.install(s),
                    Err(e) => tracing::error!(error = %e, "undecodable identity snapshot"),
                }
                Ok(())
            }
            Err(s) => {
                tracing::debug!(error = %s.message(), "identity snapshot not refreshed");
                Err(s)
            }
        }
    }
}

/// Proposes `change` as `actor`; failures are logged (what is batched
/// here is best effort: a lost last-used time or audit batch is logged).
async fn send(cluster: &Cluster, actor: &str, change: Change) {
    if let Err(s) = propose(cluster, actor, "", change).await {
        tracing::warn!(error = %s.message(), "identity batch not written");
    }
}

/// Proposes an identity change; the outcome JSON, or the refusal.
pub async fn propose(
    cluster: &Cluster,
    actor: &str,
    from: &str,
    change: Change,
) -> Result<cairn_identity::change::Outcome, tonic::Status> {
    let request = Request {
        actor: actor.to_owned(),
        from: from.to_owned(),
        at: now(),
        change,
    };
    let body = serde_json::to_vec(&request)
        .map_err(|e| tonic::Status::internal(format!("encoding a change: {e}")))?;
    let r = cluster
        .call("", |ch| {
            let req = ChangeRequest {
                request_json: body.clone().into(),
            };
            async move {
                IdentityClient::new(ch)
                    .change(req)
                    .await
                    .map_err(Attempt::mutation)
            }
        })
        .await?;
    serde_json::from_slice(&r.into_inner().outcome_json)
        .map_err(|e| tonic::Status::internal(format!("decoding an outcome: {e}")))
}
