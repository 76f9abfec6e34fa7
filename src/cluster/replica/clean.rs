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

/// Where the marker lives for a data directory.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// Writes the marker (the stream's last sequence), atomically and durably.
pub fn write(path: &Path, last_seq: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("{last_seq}\n").as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// Reads and deletes the marker: the sequence it holds, or `None` (no marker, or one that
/// cannot be read: then a start snapshot is written, as after any other stop).
pub fn take(path: &Path) -> std::io::Result<Option<u64>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    std::fs::remove_file(path)?;
    sync_dir(path)?;
    Ok(text.trim().parse::<u64>().ok())
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
        write(&p, 4242).unwrap();
        assert_eq!(take(&p).unwrap(), Some(4242));
        assert!(!p.exists(), "deleted once read");
        assert_eq!(take(&p).unwrap(), None);
        std::fs::write(&p, "not a number").unwrap();
        assert_eq!(take(&p).unwrap(), None);
        assert!(!p.exists());
    }
}
