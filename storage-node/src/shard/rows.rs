//! How a shard's rows are encoded, with their format version.
//!
//! A row written by a versioned entry starts with its format version, a
//! byte from 1 to 31, then its body: JSON for records, 20 raw bytes for an
//! object id, UTF-8 for a name. Rows written by the entries of earlier
//! releases have no version (JSON rows begin with `{` or `[`; an id row is
//! exactly 20 bytes; a name is printable) and read as format 0; they are
//! never rewritten in place, so replaying those entries gives the same rows
//! on every replica. A reader meeting a version newer than it knows stops
//! with [`RowError::Version`] instead of guessing.

use cairn_packfile::ObjectId;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Which encoding an entry writes its rows in: the one of its format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Entries of earlier releases: rows without a version.
    Legacy,
    /// Versioned rows.
    V1,
}

/// The newest row format this build reads.
pub const NEWEST: u8 = 1;

/// Highest byte a version may take; legacy rows never start below 0x20.
const VERSION_MAX: u8 = 0x1f;

#[derive(Debug, thiserror::Error)]
pub enum RowError {
    #[error("row {key:?} has format version {version}; this build reads up to {NEWEST}")]
    Version { key: String, version: u8 },
    #[error("row {key:?} does not decode: {message}")]
    Corrupt { key: String, message: String },
}

fn shown(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// The row's format version and body; `key` is for errors only.
fn split<'a>(key: &[u8], row: &'a [u8]) -> Result<(u8, &'a [u8]), RowError> {
    match row.first() {
        Some(&v) if v <= VERSION_MAX => {
            if v == 0 || v > NEWEST {
                return Err(RowError::Version {
                    key: shown(key),
                    version: v,
                });
            }
            Ok((v, &row[1..]))
        }
        _ => Ok((0, row)),
    }
}

fn with_version(format: Format, body: &[u8]) -> Vec<u8> {
    match format {
        Format::Legacy => body.to_vec(),
        Format::V1 => {
            let mut row = Vec::with_capacity(body.len() + 1);
            row.push(1);
            row.extend_from_slice(body);
            row
        }
    }
}

/// A record as JSON.
pub fn json<T: Serialize>(format: Format, value: &T) -> Vec<u8> {
    with_version(
        format,
        &serde_json::to_vec(value).expect("shard rows always serialise"),
    )
}

pub fn read_json<T: DeserializeOwned>(key: &[u8], row: &[u8]) -> Result<T, RowError> {
    let (_, body) = split(key, row)?;
    serde_json::from_slice(body).map_err(|e| RowError::Corrupt {
        key: shown(key),
        message: e.to_string(),
    })
}

/// An object id (a ref's target).
pub fn oid(format: Format, id: &ObjectId) -> Vec<u8> {
    with_version(format, id.as_bytes())
}

pub fn read_oid(key: &[u8], row: &[u8]) -> Result<ObjectId, RowError> {
    // A legacy id row is its 20 bytes, whatever the first one is.
    let body = if row.len() == 20 {
        row
    } else {
        split(key, row)?.1
    };
    ObjectId::try_from(body).map_err(|e| RowError::Corrupt {
        key: shown(key),
        message: e.to_string(),
    })
}

/// A name (`workspace/slug`).
pub fn text(format: Format, value: &str) -> Vec<u8> {
    with_version(format, value.as_bytes())
}

pub fn read_text(key: &[u8], row: &[u8]) -> Result<String, RowError> {
    let (_, body) = split(key, row)?;
    String::from_utf8(body.to_vec()).map_err(|e| RowError::Corrupt {
        key: shown(key),
        message: e.to_string(),
    })
}

/// A row whose key is all it says.
pub fn marker(format: Format) -> Vec<u8> {
    with_version(format, b"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_read_back() {
        let id = ObjectId::from_bytes_or_panic(&[3; 20]);
        let zero = ObjectId::from_bytes_or_panic(&[0; 20]);
        for format in [Format::Legacy, Format::V1] {
            let row = json(format, &vec![1, 2]);
            assert_eq!(read_json::<Vec<u8>>(b"k", &row).expect("json"), vec![1, 2]);
            // An id starting with a byte below 0x20 is still read whole.
            for id in [id, zero] {
                assert_eq!(read_oid(b"k", &oid(format, &id)).expect("oid"), id);
            }
            assert_eq!(
                read_text(b"k", &text(format, "ws/app")).expect("text"),
                "ws/app"
            );
        }
        assert_eq!(json(Format::Legacy, &1)[0], b'1');
        assert_eq!(json(Format::V1, &1)[0], 1);
        assert_eq!(marker(Format::V1), vec![1]);
    }

    #[test]
    fn a_newer_version_is_refused_not_guessed() {
        let mut row = json(Format::V1, &"x");
        row[0] = 2;
        assert!(matches!(
            read_json::<String>(b"k", &row),
            Err(RowError::Version { version: 2, .. })
        ));
        let mut row = oid(Format::V1, &ObjectId::from_bytes_or_panic(&[7; 20]));
        row[0] = 5;
        assert!(matches!(
            read_oid(b"k", &row),
            Err(RowError::Version { version: 5, .. })
        ));
    }
}
