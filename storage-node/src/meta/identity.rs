//! Identities in the meta group: the rows `cairn-identity` defines, read
//! and written through the group's state, and this node's calls for them.

use cairn_identity::change::{self, AuditEvent, ChangeError, Outcome, Request, Row, Rows, RowsMut};
use cairn_identity::{Snapshot, User};
use cairn_raft::{GroupState, StateView, StoreError};

use super::client::{DirectoryError, MetaClient};
use super::state::{MetaAnswer, MetaError, MetaQuery, MetaRequest, MetaResponse};

/// The meta group's rows as `cairn-identity` reads them.
pub struct ViewRows<'a>(pub &'a StateView);

/// The same while applying an entry.
pub struct ApplyRows<'a, 'b>(pub &'a mut GroupState<'b>);

impl Rows for ViewRows<'_> {
    type Error = StoreError;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get(key)
    }
    fn scan_page(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        self.0.scan_prefix_page(prefix, after, limit)
    }
}

impl Rows for ApplyRows<'_, '_> {
    type Error = StoreError;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get(key)
    }
    fn scan_page(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        self.0.scan_prefix_page(prefix, after, limit)
    }
}

impl RowsMut for ApplyRows<'_, '_> {
    fn put(&mut self, key: &[u8], value: &[u8]) {
        self.0.put(key, value);
    }
    fn delete(&mut self, key: &[u8]) {
        self.0.delete(key);
    }
}

pub(super) fn meta_error(e: ChangeError) -> MetaError {
    match e {
        ChangeError::Corrupt { key, message } => MetaError::Corrupt { key, message },
        // Refusals are answers, not errors; callers map them first.
        ChangeError::Refused(reason) => MetaError::Corrupt {
            key: String::new(),
            message: reason,
        },
    }
}

/// Applies an identity entry: a refusal is [`MetaResponse::Refused`].
pub(super) fn apply(
    state: &mut GroupState<'_>,
    request: Request,
) -> Result<MetaResponse, MetaError> {
    match change::apply(&mut ApplyRows(state), request) {
        Ok(outcome) => Ok(MetaResponse::Identity(outcome)),
        Err(ChangeError::Refused(reason)) => Ok(MetaResponse::Refused(reason)),
        Err(e) => Err(meta_error(e)),
    }
}

/// Most audit records one read returns.
pub const MAX_AUDIT_PAGE: usize = 1_000;

pub(super) fn answer(view: &StateView, query: &MetaQuery) -> Result<MetaAnswer, MetaError> {
    let rows = ViewRows(view);
    Ok(match query {
        MetaQuery::IdentitySnapshot { known_version } => {
            let version = change::version(&rows).map_err(meta_error)?;
            if version == *known_version && version != 0 {
                MetaAnswer::IdentityUnchanged(version)
            } else {
                MetaAnswer::Identity(Box::new(change::snapshot(&rows).map_err(meta_error)?))
            }
        }
        MetaQuery::IdentityUser(name) => {
            MetaAnswer::IdentityUser(change::user(&rows, name).map_err(meta_error)?.map(Box::new))
        }
        MetaQuery::Audit { after, limit } => MetaAnswer::Audit(
            change::audit_after(&rows, *after, (*limit as usize).clamp(1, MAX_AUDIT_PAGE))
                .map_err(meta_error)?,
        ),
        _ => unreachable!("only identity queries are answered here"),
    })
}

impl MetaClient {
    /// The identity snapshot, unless `known_version` is still current
    /// (`Ok(None)`).
    pub async fn identity_snapshot(
        &self,
        known_version: u64,
    ) -> Result<Option<Snapshot>, DirectoryError> {
        match self
            .read(MetaQuery::IdentitySnapshot { known_version })
            .await?
        {
            MetaAnswer::Identity(s) => Ok(Some(*s)),
            MetaAnswer::IdentityUnchanged(_) => Ok(None),
            other => Err(DirectoryError::Codec(format!("{other:?}"))),
        }
    }

    pub async fn identity_user(&self, name: &str) -> Result<Option<User>, DirectoryError> {
        match self.read(MetaQuery::IdentityUser(name.to_owned())).await? {
            MetaAnswer::IdentityUser(u) => Ok(u.map(|u| *u)),
            other => Err(DirectoryError::Codec(format!("{other:?}"))),
        }
    }

    /// Proposes an identity change; a refusal is
    /// [`DirectoryError::Refused`].
    pub async fn identity_change(&self, request: Request) -> Result<Outcome, DirectoryError> {
        match self.write(MetaRequest::Identity(Box::new(request))).await? {
            MetaResponse::Identity(outcome) => Ok(outcome),
            other => Err(DirectoryError::Codec(format!("{other:?}"))),
        }
    }

    pub async fn audit(&self, after: u64, limit: u32) -> Result<Vec<AuditEvent>, DirectoryError> {
        match self.read(MetaQuery::Audit { after, limit }).await? {
            MetaAnswer::Audit(events) => Ok(events),
            other => Err(DirectoryError::Codec(format!("{other:?}"))),
        }
    }
}
