//! The `Events` gRPC service: a shard's event log for other processes —
//! streamed from a position or a consumer's cursor by any replica (after a
//! read barrier), cursors and retention moved through the shard leader.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_proto::events::events_server::Events;
use cairn_proto::events::{
    AckRequest, ConsumerRequest, ConsumerState, Event as EventMsg, EventBatch, Gap, RefChange,
    RetentionRequest, RetentionResponse, SubscribeRequest,
};
use cairn_proto::routing::Refusal;
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::host::ShardHost;
use crate::shard::entry::Entry;
use crate::shard::events::{self, Ack, Answer, Event, Register, Retention, Unregister};
use crate::shard::state::{ShardRequest, ShardResponse};
use crate::status::propose_status;

/// Events read from the state per batch.
const BATCH: usize = 256;

/// How often a stream looks for new events once it has caught up.
const POLL: Duration = Duration::from_millis(100);

/// An empty batch this often tells the reader the stream is alive.
const KEEPALIVE: Duration = Duration::from_secs(5);

/// Streams a node serves at once: each polls the state while it lives.
const MAX_STREAMS: usize = 256;

pub struct EventsService {
    host: Arc<ShardHost>,
    streams: Arc<Semaphore>,
}

impl EventsService {
    pub fn new(host: Arc<ShardHost>) -> Self {
        EventsService {
            host,
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
        }
    }

    fn hosted(&self, shard: u64) -> Result<(), Status> {
        if shard == 0 || !self.host.hosts(shard) {
            return Err(Refusal::WrongShard { epoch: None }
                .into_status(format!("wrong shard: shard {shard} is not on this node")));
        }
        Ok(())
    }

    /// Proposes an event-log entry on this node (its leader) and returns
    /// the consumer it answers.
    async fn propose<T: Serialize>(
        &self,
        shard: u64,
        kind: &str,
        payload: &T,
    ) -> Result<Option<events::Consumer>, Status> {
        self.hosted(shard)?;
        let entry = Entry::new(kind, 1, None, payload);
        let response = self
            .host
            .propose(shard, ShardRequest::Entry(entry))
            .await
            .map_err(propose_status)?;
        let ShardResponse::Entry(bytes) = response else {
            return Err(Status::internal(format!("unexpected answer {response:?}")));
        };
        match postcard::from_bytes::<Answer>(&bytes)
            .map_err(|e| Status::internal(format!("decoding the answer: {e}")))?
        {
            Answer::Consumer(c) => Ok(c),
            Answer::Refused(why) => Err(Status::invalid_argument(why)),
        }
    }
}

fn consumer_state(c: Option<events::Consumer>) -> ConsumerState {
    ConsumerState {
        registered: c.is_some(),
        position: c.map_or(0, |c| c.position),
    }
}

fn to_proto(shard: u64, e: Event) -> EventMsg {
    EventMsg {
        shard_id: shard,
        index: e.index,
        at_ms: e.at_ms,
        kind: e.kind.as_str().to_owned(),
        repo_id: e.repo_id,
        repository: e.repository,
        changes: e
            .changes
            .into_iter()
            .map(|c| RefChange {
                name: c.name,
                old: c.old,
                new: c.new,
            })
            .collect(),
        actor: e.actor.unwrap_or_default(),
        push_options: e.push_options,
    }
}

/// Whether `repository` (`ws/slug`) is what `filter` asks for: a
/// workspace, a repository, or everything when empty; without case.
fn wanted(filter: &str, repository: &str) -> bool {
    if filter.is_empty() {
        return true;
    }
    let (f, r) = (filter.to_ascii_lowercase(), repository.to_ascii_lowercase());
    r == f || r.strip_prefix(&f).is_some_and(|rest| rest.starts_with('/'))
}

fn check_consumer(name: &str) -> Result<(), Status> {
    if events::valid_consumer(name) {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "invalid consumer name {:?}: 1-64 of A-Z a-z 0-9 - _ .",
            name.chars().take(64).collect::<String>()
        )))
    }
}

fn status_of(e: crate::shard::state::ApplyError) -> Status {
    Status::internal(e.to_string())
}

type BatchStream = ReceiverStream<Result<EventBatch, Status>>;

#[tonic::async_trait]
impl Events for EventsService {
    type SubscribeStream = BatchStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<BatchStream>, Status> {
        let r = request.into_inner();
        self.hosted(r.shard_id)?;
        if r.filter.len() > 200 {
            return Err(Status::invalid_argument("filter too long"));
        }
        if !r.consumer.is_empty() {
            check_consumer(&r.consumer)?;
        }
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "this node serves {MAX_STREAMS} event streams already; retry later"
            ))
        })?;
        let shard = r.shard_id;
        self.host
            .linearizable_read(shard)
            .await
            .map_err(propose_status)?;
        let mut after = r.after;
        if after == 0 && !r.consumer.is_empty() {
            let view = self.host.state_view(shard).map_err(propose_status)?;
            match events::consumer(&view, &r.consumer).map_err(status_of)? {
                Some(c) => after = c.position,
                None => {
                    return Err(Status::not_found(format!(
                        "consumer {} is not registered",
                        r.consumer
                    )))
                }
            }
        }
        let (tx, rx) = mpsc::channel(4);
        let host = self.host.clone();
        let idle = (r.idle_ms > 0).then(|| Duration::from_millis(u64::from(r.idle_ms)));
        tokio::spawn(async move {
            let _permit = permit;
            let mut last_sent = Instant::now();
            let mut last_event = Instant::now();
            loop {
                if host.is_shut_down() {
                    return;
                }
                let read = host
                    .state_view(shard)
                    .map_err(propose_status)
                    .and_then(|view| events::read(&view, after, BATCH).map_err(status_of));
                let read = match read {
                    Ok(read) => read,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let full = read.events.len() == BATCH;
                let mut position = read.gap.map_or(after, |(_, to)| to.max(after));
                let mut batch = EventBatch {
                    gap: read.gap.map(|(from, to)| Gap { from, to }),
                    ..Default::default()
                };
                for e in read.events {
                    position = position.max(e.index);
                    if wanted(&r.filter, &e.repository) {
                        batch.events.push(to_proto(shard, e));
                    }
                }
                batch.position = position;
                let news = position > after || batch.gap.is_some();
                if news || last_sent.elapsed() >= KEEPALIVE {
                    if tx.send(Ok(batch)).await.is_err() {
                        return;
                    }
                    last_sent = Instant::now();
                }
                if news {
                    last_event = Instant::now();
                }
                after = position;
                if idle.is_some_and(|idle| last_event.elapsed() >= idle) {
                    return;
                }
                if !full {
                    tokio::time::sleep(POLL).await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn ack(&self, request: Request<AckRequest>) -> Result<Response<ConsumerState>, Status> {
        let r = request.into_inner();
        let ack = Ack {
            consumer: r.consumer,
            position: r.position,
        };
        let c = self.propose(r.shard_id, events::kinds::ACK, &ack).await?;
        Ok(Response::new(consumer_state(c)))
    }

    async fn register(
        &self,
        request: Request<ConsumerRequest>,
    ) -> Result<Response<ConsumerState>, Status> {
        let r = request.into_inner();
        let reg = Register {
            consumer: r.consumer,
            from: None,
        };
        let c = self
            .propose(r.shard_id, events::kinds::REGISTER, &reg)
            .await?;
        Ok(Response::new(consumer_state(c)))
    }

    async fn unregister(
        &self,
        request: Request<ConsumerRequest>,
    ) -> Result<Response<ConsumerState>, Status> {
        let r = request.into_inner();
        let u = Unregister {
            consumer: r.consumer,
        };
        self.propose(r.shard_id, events::kinds::UNREGISTER, &u)
            .await?;
        Ok(Response::new(consumer_state(None)))
    }

    async fn get_consumer(
        &self,
        request: Request<ConsumerRequest>,
    ) -> Result<Response<ConsumerState>, Status> {
        let r = request.into_inner();
        self.hosted(r.shard_id)?;
        check_consumer(&r.consumer)?;
        self.host
            .linearizable_read(r.shard_id)
            .await
            .map_err(propose_status)?;
        let view = self.host.state_view(r.shard_id).map_err(propose_status)?;
        let c = events::consumer(&view, &r.consumer).map_err(status_of)?;
        Ok(Response::new(consumer_state(c)))
    }

    async fn set_retention(
        &self,
        request: Request<RetentionRequest>,
    ) -> Result<Response<RetentionResponse>, Status> {
        let r = request.into_inner();
        let retention = Retention {
            min_age_ms: r.min_age_ms,
            max_events: r.max_events,
            max_bytes: r.max_bytes,
        };
        self.propose(r.shard_id, events::kinds::RETENTION, &retention)
            .await?;
        Ok(Response::new(RetentionResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::wanted;

    #[test]
    fn filters_by_workspace_or_repository_without_case() {
        assert!(wanted("", "w/app"));
        assert!(wanted("w", "w/app"));
        assert!(wanted("W/App", "w/app"));
        assert!(!wanted("w/ap", "w/app"));
        assert!(!wanted("ww", "w/app"));
        assert!(!wanted("w/app2", "w/app"));
    }
}
