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
    /// When the stream was made (JetStream's `created`, Unix nanoseconds), in the
    /// clean-stop marker: a stream made again under the same name (NATS lost it, or it was
    /// deleted) is another stream, even where it reaches the same sequence, and gets a
    /// start snapshot. A difference is only ever taken as a reason for that snapshot, never
    /// to skip anything: NATS servers before 2.12.15 may report a new creation time for the
    /// same stream after a restart (an idempotent create recorded a new one). So the
    /// `replicated`-mode marker carries none (`None`: not checked; also a clean-stop marker
    /// written before this was noted).
    pub created: Option<i128>,
}

impl Marker {
    /// Whether `created` (the stream's as it is now) is the one the marker noted.
    pub fn same_stream_made(&self, created: i128) -> bool {
        self.created.is_none_or(|c| c == created)
    }
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
        let line = match m.created {
            Some(c) => format!("{} {} {} {c}\n", m.stream, m.last_seq, m.shards),
            None => format!("{} {} {}\n", m.stream, m.last_seq, m.shards),
        };
        f.write_all(line.as_bytes())?;
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
    Ok(parse(&text, false))
}

/// The name of the `replicated`-mode marker in the data directory. A run that acknowledges
/// from its stream (and fsyncs its stores only in the background) keeps it up to date:
/// `"<stream> <seq> <shards>"` (a fourth field, the creation time, is read if present but
/// never written here: see [`Marker::created`]), where every store durably holds every
/// change of the stream's log up to `seq`, and the log after `seq` is kept (the appender
/// fsyncs the stores and moves `seq` forward before it trims the log). A start that finds
/// it and no clean-stop marker applies the log after `seq` to the stores.
pub const AHEAD_FILE: &str = "replica-ahead";

/// Writes the `replicated`-mode marker, atomically and durably.
pub fn write_ahead(data_dir: &Path, m: &Marker) -> std::io::Result<()> {
    write(&data_dir.join(AHEAD_FILE), m)
}

/// Reads the `replicated`-mode marker (`None`: there is none). A marker that cannot be
/// parsed is an error (InvalidData): the start must not guess what the stores hold.
pub fn read_ahead(data_dir: &Path) -> std::io::Result<Option<Marker>> {
    let text = match std::fs::read(data_dir.join(AHEAD_FILE)) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    parse(&text, true).map(Some).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not \"<stream> <sequence> <shards>\": {:?}", text.trim()),
        )
    })
}

/// Deletes the `replicated`-mode marker, durably (the stores hold what the stream does).
pub fn clear_ahead(data_dir: &Path) -> std::io::Result<()> {
    let path = data_dir.join(AHEAD_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(&path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// `"<stream> <seq> <shards> [<created>]"`; `seq_zero_ok`: a sequence of 0 is allowed.
fn parse(text: &str, seq_zero_ok: bool) -> Option<Marker> {
    let mut parts = text.split_whitespace();
    let (Some(stream), Some(seq), Some(shards), created, None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let created = match created.map(str::parse::<i128>) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(_)) => return None,
    };
    match (seq.parse::<u64>(), shards.parse::<usize>()) {
        (Ok(last_seq), Ok(shards)) if (last_seq > 0 || seq_zero_ok) && shards > 0 => Some(Marker {
            stream: stream.to_string(),
            last_seq,
            shards,
            created,
        }),
        _ => None,
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
            created: Some(1_796_295_600_632_000_123),
        };
        write(&p, &m).unwrap();
        assert_eq!(take(&p).unwrap(), Some(m.clone()));
        assert!(!p.exists(), "deleted once read");
        assert_eq!(take(&p).unwrap(), None);
        assert!(m.same_stream_made(1_796_295_600_632_000_123));
        assert!(!m.same_stream_made(1_796_295_600_632_000_124), "made again");
        // One written before the stream's making was noted: read, not checked.
        std::fs::write(&p, b"S 12 1\n").unwrap();
        let old = take(&p).unwrap().unwrap();
        assert_eq!((old.last_seq, old.created), (12, None));
        assert!(old.same_stream_made(7));
        for bad in [
            &b"not a number"[..],
            b"S 12",
            b"S x 2",
            b"S 0 2",
            b"S 1 2 extra",
            b"S 1 2 3 4",
            b"\xff\xfe",
        ] {
            std::fs::write(&p, bad).unwrap();
            assert_eq!(take(&p).unwrap(), None, "{bad:?}");
            assert!(!p.exists());
        }
    }

    #[test]
    fn the_ahead_marker_is_written_read_and_cleared_and_a_damaged_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_ahead(dir.path()).unwrap(), None);
        clear_ahead(dir.path()).unwrap();
        let m = Marker {
            stream: "SHARDMQ_00ff".into(),
            last_seq: 0,
            shards: 2,
            created: Some(-5),
        };
        write_ahead(dir.path(), &m).unwrap();
        assert_eq!(read_ahead(dir.path()).unwrap(), Some(m.clone()));
        assert_eq!(read_ahead(dir.path()).unwrap(), Some(m), "read, not taken");
        clear_ahead(dir.path()).unwrap();
        assert_eq!(read_ahead(dir.path()).unwrap(), None);
        for bad in [
            &b"S 1"[..],
            b"S x 2",
            b"S 1 0",
            b"S 1 2 extra",
            b"S 1 2 3 4",
            b"",
        ] {
            std::fs::write(dir.path().join(AHEAD_FILE), bad).unwrap();
            let e = read_ahead(dir.path()).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{bad:?}");
        }
    }
}
