//! The list of groups this node holds and the meta nodes it last knew,
//! kept next to the raft database so a restart opens the same groups and
//! finds the directory.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ShardHostError;

/// The groups this node holds a replica of and the meta nodes it knows,
/// kept next to the raft database: written when a replica is opened or
/// closed or the meta group moves, read at start. Absent on a node's first
/// start, which takes the configured layout.
pub(super) const HOSTED_FILE: &str = "hosted-shards.json";

/// What [`HOSTED_FILE`] holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Hosted {
    /// Groups with a replica here, the meta group (0) included.
    pub(super) groups: Vec<u64>,
    /// The meta group's nodes and addresses as last read from the
    /// directory (how a node outside the group finds it after a restart).
    #[serde(default)]
    pub(super) meta_nodes: Vec<(u64, String)>,
}

/// The file's two forms: the current one, and the bare list of shard ids
/// written before the meta group could move (meta membership then came
/// from the configuration).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum HostedFile {
    Current(Hosted),
    ShardsOnly(Vec<u64>),
}

/// What a node with data folder `data_dir` recorded of its groups: `None`
/// if it never started with shards; otherwise the meta nodes it last knew
/// (empty if the file predates that record).
pub fn recorded_meta_nodes(data_dir: &Path) -> Result<Option<Vec<u64>>, ShardHostError> {
    let path = data_dir.join("raft").join(HOSTED_FILE);
    Ok(read_hosted(&path)?.map(|file| match file {
        HostedFile::Current(h) => h.meta_nodes.iter().map(|(id, _)| *id).collect(),
        HostedFile::ShardsOnly(_) => Vec::new(),
    }))
}

pub(super) fn read_hosted(path: &Path) -> Result<Option<HostedFile>, ShardHostError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ShardHostError::Hosted(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ShardHostError::Hosted(format!("{}: {e}", path.display()))),
    }
}

pub(super) fn write_hosted(path: &Path, hosted: &Hosted) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec(hosted).map_err(std::io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::META_GROUP;

    #[test]
    fn hosted_file_reads_both_forms_and_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(HOSTED_FILE);
        assert!(read_hosted(&path).expect("absent is fine").is_none());

        // Written before the meta group could move: shard ids only.
        std::fs::write(&path, b"[1,3]").expect("write");
        match read_hosted(&path).expect("reads") {
            Some(HostedFile::ShardsOnly(ids)) => assert_eq!(ids, vec![1, 3]),
            other => panic!("old form read as {other:?}"),
        }

        let hosted = Hosted {
            groups: vec![META_GROUP, 2, 4],
            meta_nodes: vec![(1, "127.0.0.1:7410".into()), (4, "127.0.0.1:7413".into())],
        };
        write_hosted(&path, &hosted).expect("write");
        match read_hosted(&path).expect("reads") {
            Some(HostedFile::Current(h)) => assert_eq!(h, hosted),
            other => panic!("current form read as {other:?}"),
        }

        std::fs::write(&path, b"{\"groups\": \"nope\"}").expect("write");
        assert!(read_hosted(&path).is_err(), "a corrupt file is an error");
    }
}
