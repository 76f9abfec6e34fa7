//! The clean-stop marker: a node that stops in order, with every change its stores hold in
//! its stream, writes the stream's last sequence to `<data dir>/replica-clean`. Started
//! again with that disk, it finds the stream still ending there (nobody fenced it, nothing
//! lost) and needs no start snapshot: its stores and its stream agree. The marker is read
//! and deleted (durably) at start, before anything is written, so that it never outlives
//! the stop it speaks for.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The marker's name in the data directory.
pub const FILE: &str = "replica-clean";

/// What a clean stop noted: the stream, where it ended, and the shard count (a start with
/// another count re-homes sessions between stores, which the stream does not see).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    pub stream: String,
    pub last_seq: u64,
    pub shards: usize,
}

/// Where the marker lives for a data directory.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// Writes the marker, atomically and durably.
pub fn write(path: &Path, m: &Marker) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("{} {} {}\n", m.stream, m.last_seq, m.shards).as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// Reads and deletes the marker: what it holds, or `None` (no marker, or one that cannot
/// be parsed: then a start snapshot is written, as after any other stop). An error (the
/// marker could not be deleted) must stop the start: it would outlive this run.
pub fn take(path: &Path) -> std::io::Result<Option<Marker>> {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    std::fs::remove_file(path)?;
    sync_dir(path)?;
    let mut parts = text.split_whitespace();
    let (Some(stream), Some(seq), Some(shards), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Ok(None);
    };
    match (seq.parse::<u64>(), shards.parse::<usize>()) {
        (Ok(last_seq), Ok(shards)) if last_seq > 0 => Ok(Some(Marker {
            stream: stream.to_string(),
            last_seq,
            shards,
        })),
        _ => Ok(None),
    }
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_is_read_once_and_a_damaged_one_means_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        assert_eq!(take(&p).unwrap(), None);
        let m = Marker {
            stream: "SHARDMQ_00ff".into(),
            last_seq: 4242,
            shards: 2,
        };
        write(&p, &m).unwrap();
        assert_eq!(take(&p).unwrap(), Some(m));
        assert!(!p.exists(), "deleted once read");
        assert_eq!(take(&p).unwrap(), None);
        for bad in [
            &b"not a number"[..],
            b"S 12",
            b"S x 2",
            b"S 0 2",
            b"S 1 2 extra",
            b"\xff\xfe",
        ] {
            std::fs::write(&p, bad).unwrap();
            assert_eq!(take(&p).unwrap(), None, "{bad:?}");
            assert!(!p.exists());
        }
    }
}
