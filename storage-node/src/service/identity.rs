//! The `Identity` gRPC service: users, credentials, permissions and the
//! audit log, answered through this node's access to the meta group.

use std::sync::Arc;

use cairn_identity::change::{AuditEvent, Change, Request as ChangeReq};
use cairn_proto::identity::identity_server::Identity;
use cairn_proto::identity::{
    AuditRequest, AuditResponse, ChangeRequest, ChangeResponse, SignInRequest, SignInResponse,
    SnapshotRequest, SnapshotResponse,
};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use crate::meta::client::MetaClient;
use crate::status::directory_status;

/// Largest change request: a batch of audit records at most.
const MAX_CHANGE_BYTES: usize = 1 << 20;

/// Password checks at once: each is a deliberately slow hash.
const SIGN_INS: usize = 2;

pub struct IdentityService {
    directory: Arc<MetaClient>,
    sign_ins: Semaphore,
}

impl IdentityService {
    pub fn new(directory: Arc<MetaClient>) -> Self {
        IdentityService {
            directory,
            sign_ins: Semaphore::new(SIGN_INS),
        }
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, Status> {
    serde_json::to_vec(v).map_err(|e| Status::internal(format!("encoding: {e}")))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotResponse>, Status> {
        let known = request.into_inner().known_version;
        let answer = self
            .directory
            .identity_snapshot(known)
            .await
            .map_err(directory_status)?;
        Ok(Response::new(match answer {
            None => SnapshotResponse {
                unchanged: true,
                version: known,
                snapshot_json: Default::default(),
            },
            Some(s) => SnapshotResponse {
                unchanged: false,
                version: s.version,
                snapshot_json: json(&s)?.into(),
            },
        }))
    }

    async fn change(
        &self,
        request: Request<ChangeRequest>,
    ) -> Result<Response<ChangeResponse>, Status> {
        let body = request.into_inner().request_json;
        if body.len() > MAX_CHANGE_BYTES {
            return Err(Status::invalid_argument(format!(
                "a change is at most {MAX_CHANGE_BYTES} bytes"
            )));
        }
        let mut change: ChangeReq = serde_json::from_slice(&body)
            .map_err(|e| Status::invalid_argument(format!("malformed change: {e}")))?;
        // Hashes only: a clear password sent here would be logged in raft.
        if let Change::SetPassword { hash, .. } = &change.change {
            if !hash.starts_with("$argon2") {
                return Err(Status::invalid_argument(
                    "send an Argon2 hash, not a password",
                ));
            }
        }
        if change.at == 0 {
            change.at = now();
        }
        let outcome = self
            .directory
            .identity_change(change)
            .await
            .map_err(directory_status)?;
        Ok(Response::new(ChangeResponse {
            outcome_json: json(&outcome)?.into(),
        }))
    }

    async fn sign_in(
        &self,
        request: Request<SignInRequest>,
    ) -> Result<Response<SignInResponse>, Status> {
        let SignInRequest {
            username,
            password,
            from,
        } = request.into_inner();
        if username.len() > cairn_identity::change::MAX_USERNAME_LEN
            || password.len() > cairn_identity::password::MAX_LEN
        {
            return Err(Status::unauthenticated("invalid username or password"));
        }
        let user = self
            .directory
            .identity_user(&username)
            .await
            .map_err(directory_status)?;
        let _permit = self
            .sign_ins
            .acquire()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        let hash = user.as_ref().and_then(|u| u.password_hash.clone());
        let ok = tokio::task::spawn_blocking(move || {
            // An unknown user costs the same hash, so timing tells nothing.
            let phc = hash.unwrap_or_else(|| {
                "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$\
                 0v6WcP6UjtrOG2+tOi6Wz0AZOmVn7V7L8ouZjVR0kVY"
                    .to_owned()
            });
            cairn_identity::password::verify(&password, &phc)
        })
        .await
        .unwrap_or(false);
        match user {
            Some(mut u) if ok => {
                u.password_hash = None;
                Ok(Response::new(SignInResponse {
                    user_json: json(&u)?.into(),
                }))
            }
            _ => {
                let record = ChangeReq {
                    actor: String::new(),
                    from: from.clone(),
                    at: now(),
                    change: Change::Record(vec![AuditEvent {
                        seq: 0,
                        at: now(),
                        actor: String::new(),
                        from,
                        action: "signin:failed".into(),
                        target: username,
                        detail: "password".into(),
                    }]),
                };
                if let Err(e) = self.directory.identity_change(record).await {
                    tracing::warn!(error = %e, "a failed sign-in was not audited");
                }
                Err(Status::unauthenticated("invalid username or password"))
            }
        }
    }

    async fn audit(
        &self,
        request: Request<AuditRequest>,
    ) -> Result<Response<AuditResponse>, Status> {
        let AuditRequest { after, limit } = request.into_inner();
        let events = self
            .directory
            .audit(after, limit)
            .await
            .map_err(directory_status)?;
        Ok(Response::new(AuditResponse {
            events_json: json(&events)?.into(),
        }))
    }
}
