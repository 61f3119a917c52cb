//! The error type of upload-pack and how errors are reported to the client.

use std::io;

use gix_hash::ObjectId;

use crate::pktline::PktError;
use crate::store::StoreError;

/// Why an upload-pack conversation ended early.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The client sent something the protocol does not allow.
    #[error("protocol error: {message}")]
    Protocol { message: String },
    /// The client wanted an object that is not (reachable from) an advertised ref.
    #[error("not our ref {id}")]
    NotOurRef { id: ObjectId },
    /// The client's pkt-line framing is broken.
    #[error("bad pkt-line from client: {0}")]
    Pkt(#[from] PktError),
    /// An object we store could not be parsed.
    #[error("object {id} is corrupt: {message}")]
    Corrupt { id: ObjectId, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl UploadError {
    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        UploadError::Protocol {
            message: message.into(),
        }
    }

    /// The text sent to the client in an `ERR` line or on side-band 3, or
    /// `None` when the connection itself is gone and writing is pointless.
    pub(crate) fn client_message(&self) -> Option<String> {
        match self {
            UploadError::Io(_) => None,
            UploadError::Pkt(PktError::Io(_)) => None,
            UploadError::NotOurRef { id } => Some(format!("upload-pack: not our ref {id}")),
            UploadError::Protocol { message } => Some(format!("upload-pack: {message}")),
            other => Some(format!("upload-pack: {other}")),
        }
    }
}
