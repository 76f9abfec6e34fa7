//! Password files in Mosquitto's format, and the hashes they hold.
//!
//! One entry a line, `user:hash`; blank lines and lines starting with `#` are skipped. Hashes:
//! - `$6$<salt>$<hash>`: SHA-512 of the password followed by the salt (both base64 fields);
//!   what `mosquitto_passwd -H sha512` (and Mosquitto 1.6) writes.
//! - `$7$<iterations>$<salt>$<hash>`: PBKDF2-HMAC-SHA512 (`mosquitto_passwd`'s default).
//! - `$argon2id$...` (also `argon2i`/`argon2d`): a PHC string; what `shardmq passwd` writes.
//!
//! Comparisons are constant-time. Verifying a slow hash is the caller's business to move off
//! the executor ([`PasswordHash::is_slow`]).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hashbrown::HashMap;
use sha2::{Digest, Sha512};
use std::fmt;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Highest PBKDF2 iteration count accepted from a file (a typo must not cost minutes a login).
const PBKDF2_ITERATIONS_MAX: u32 = 10_000_000;
/// PBKDF2 above this many iterations is verified off the executor.
const PBKDF2_FAST_ITERATIONS_MAX: u32 = 1_000;
/// Largest password or ACL file read (bytes).
pub const FILE_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// One stored password hash.
#[derive(Clone, PartialEq, Eq)]
pub enum PasswordHash {
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Pbkdf2Sha512 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    /// A PHC string, checked by the argon2 crate at parse time.
    Argon2(String),
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PasswordHash::Sha512 { .. } => f.write_str("Sha512"),
            PasswordHash::Pbkdf2Sha512 { iterations, .. } => {
                write!(f, "Pbkdf2Sha512({iterations})")
            }
            PasswordHash::Argon2(_) => f.write_str("Argon2"),
        }
    }
}

fn b64(field: &str, what: &str) -> Result<Vec<u8>, String> {
    STANDARD
        .decode(field)
        .map_err(|e| format!("{what} is not base64: {e}"))
}

impl PasswordHash {
    /// Parses the part of a password file line after `user:`.
    pub fn parse(s: &str) -> Result<PasswordHash, String> {
        if let Some(rest) = s.strip_prefix("$6$") {
            let (salt, hash) = rest.split_once('$').ok_or("a $6$ hash needs $salt$hash")?;
            let (salt, hash) = (b64(salt, "salt")?, b64(hash, "hash")?);
            if hash.len() != 64 {
                return Err("a $6$ hash must be 64 bytes".into());
            }
            return Ok(PasswordHash::Sha512 { salt, hash });
        }
        if let Some(rest) = s.strip_prefix("$7$") {
            let mut parts = rest.splitn(3, '$');
            let (Some(iterations), Some(salt), Some(hash)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err("a $7$ hash needs $iterations$salt$hash".into());
            };
            let iterations: u32 = iterations
                .parse()
                .map_err(|_| format!("iterations {iterations:?} is not a number"))?;
            if iterations == 0 || iterations > PBKDF2_ITERATIONS_MAX {
                return Err(format!(
                    "iterations must be between 1 and {PBKDF2_ITERATIONS_MAX}"
                ));
            }
            let (salt, hash) = (b64(salt, "salt")?, b64(hash, "hash")?);
            if hash.is_empty() || hash.len() > 64 {
                return Err("a $7$ hash must be 1 to 64 bytes".into());
            }
            return Ok(PasswordHash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            });
        }
        if s.starts_with("$argon2") {
            let phc = argon2::password_hash::PasswordHash::new(s)
                .map_err(|e| format!("bad argon2 hash: {e}"))?;
            if !matches!(phc.algorithm.as_str(), "argon2id" | "argon2i" | "argon2d") {
                return Err(format!("unknown algorithm {}", phc.algorithm));
            }
            // The parameters must be ones the argon2 crate accepts, or every login fails.
            argon2::Params::try_from(&phc).map_err(|e| format!("bad argon2 parameters: {e}"))?;
            return Ok(PasswordHash::Argon2(s.to_string()));
        }
        Err("unknown hash format (expected $6$, $7$ or $argon2id$)".into())
    }

    /// Whether verifying takes long enough (milliseconds) to belong off the executor.
    pub fn is_slow(&self) -> bool {
        match self {
            PasswordHash::Sha512 { .. } => false,
            PasswordHash::Pbkdf2Sha512 { iterations, .. } => {
                *iterations > PBKDF2_FAST_ITERATIONS_MAX
            }
            PasswordHash::Argon2(_) => true,
        }
    }

    /// Whether `password` is the one this hash was made from.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            PasswordHash::Sha512 { salt, hash } => {
                let mut d = Sha512::new();
                d.update(password);
                d.update(salt);
                d.finalize().as_slice().ct_eq(hash).into()
            }
            PasswordHash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => {
                let mut out = vec![0u8; hash.len()];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                out.ct_eq(hash).into()
            }
            PasswordHash::Argon2(phc) => {
                use argon2::PasswordVerifier;
                match argon2::password_hash::PasswordHash::new(phc) {
                    Ok(h) => argon2::Argon2::default()
                        .verify_password(password, &h)
                        .is_ok(),
                    Err(_) => false,
                }
            }
        }
    }
}

/// A file that cannot be used: which file, which line (1-based; 0 when the whole file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileError {
    pub path: String,
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.path, self.reason)
        } else {
            write!(f, "{}:{}: {}", self.path, self.line, self.reason)
        }
    }
}

impl std::error::Error for FileError {}

/// Reads a whole (bounded) text file for the auth loaders.
pub(crate) fn read_text(path: &Path) -> Result<String, FileError> {
    let err = |reason: String| FileError {
        path: path.display().to_string(),
        line: 0,
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read: {e}")))?;
    if meta.len() > FILE_BYTES_MAX {
        return Err(err(format!("larger than {FILE_BYTES_MAX} bytes")));
    }
    std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))
}

/// The users of a password file.
#[derive(Clone, Debug, Default)]
pub struct PasswordFile {
    entries: HashMap<String, Arc<PasswordHash>>,
}

impl PasswordFile {
    /// Parses a password file's text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &str) -> Result<PasswordFile, FileError> {
        let mut entries = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let err = |reason: String| FileError {
                path: path.into(),
                line: i + 1,
                reason,
            };
            let line = line.trim_end_matches(['\r', '\n', ' ', '\t']);
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| err("expected user:hash".into()))?;
            if user.is_empty() {
                return Err(err("empty user name".into()));
            }
            let hash = PasswordHash::parse(hash).map_err(|r| err(format!("user {user:?}: {r}")))?;
            if entries.insert(user.to_string(), Arc::new(hash)).is_some() {
                return Err(err(format!("user {user:?} is listed twice")));
            }
        }
        Ok(PasswordFile { entries })
    }

    pub fn load(path: &Path) -> Result<PasswordFile, FileError> {
        let text = read_text(path)?;
        PasswordFile::parse(&text, &path.display().to_string())
    }

    pub fn get(&self, user: &str) -> Option<&Arc<PasswordHash>> {
        self.entries.get(user)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// An argon2id PHC string for `password` with a fresh random salt and the argon2 crate's
/// default (OWASP-recommended) parameters.
pub fn hash_argon2id(password: &[u8]) -> Result<String, String> {
    use password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash: {e}"))
}

/// Sets `user`'s entry in the password file at `path` to `hash` (adds it, or replaces the
/// existing line in place), keeping every other line as it was. Writes a temporary file
/// with mode 0600 next to it, fsyncs, then renames it over the old one.
pub fn set_entry(path: &Path, user: &str, hash: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    if user.is_empty() || user.contains(':') || user.contains(['\n', '\r']) {
        return Err(format!(
            "user name {user:?} must be non-empty, without ':' or newlines"
        ));
    }
    let old = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: cannot read: {e}", path.display())),
    };
    // Checks the file as the broker would (an unreadable file is not silently rewritten).
    PasswordFile::parse(&old, &path.display().to_string()).map_err(|e| e.to_string())?;
    let mut out = String::with_capacity(old.len() + hash.len() + user.len() + 2);
    let mut replaced = false;
    for line in old.lines() {
        match line.split_once(':') {
            Some((u, _)) if u == user && !line.starts_with('#') => {
                out.push_str(&format!("{user}:{hash}\n"));
                replaced = true;
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if !replaced {
        out.push_str(&format!("{user}:{hash}\n"));
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| format!("{}: not a file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(out.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: cannot write: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made by `mosquitto_passwd` 2.0.11; see tests/fixtures/auth/README.md for passwords.
    const FIXTURE: &str = include_str!("../../tests/fixtures/auth/passwd");

    #[test]
    fn mosquitto_hashes_verify() {
        let f = PasswordFile::parse(FIXTURE, "passwd").unwrap();
        let h = f.get("pbkdf2user").unwrap();
        assert!(matches!(
            **h,
            PasswordHash::Pbkdf2Sha512 {
                iterations: 101,
                ..
            }
        ));
        assert!(h.verify(b"pbkdf2-secret"));
        assert!(!h.verify(b"pbkdf2-secreT"));
        let h = f.get("sha512user").unwrap();
        assert!(matches!(**h, PasswordHash::Sha512 { .. }));
        assert!(h.verify(b"sha512 secret"));
        assert!(!h.verify(b""));
        assert!(f.get("nobody").is_none());
    }

    #[test]
    fn argon2id_round_trip() {
        let phc = hash_argon2id(b"pw").unwrap();
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        let h = PasswordHash::parse(&phc).unwrap();
        assert!(h.is_slow());
        assert!(h.verify(b"pw"));
        assert!(!h.verify(b"pw2"));
    }

    #[test]
    fn bad_lines_name_their_line() {
        let e = PasswordFile::parse("# c\n\nu:$6$AAAA$AAAA\n", "f").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        let e = PasswordFile::parse("a:$7$0$AAAA$AAAA\n", "f").unwrap_err();
        assert!(e.reason.contains("iterations"), "{e}");
        let e = PasswordFile::parse("nocolon\n", "f").unwrap_err();
        assert_eq!((e.line, e.reason.as_str()), (1, "expected user:hash"));
        let e = PasswordFile::parse("a:plain\n", "f").unwrap_err();
        assert!(e.reason.contains("unknown hash format"), "{e}");
        assert!(PasswordFile::parse("a:$argon2id$bad\n", "f").is_err());
        let twice = format!("{}\n{}", FIXTURE.lines().next().unwrap(), FIXTURE);
        assert!(PasswordFile::parse(&twice, "f").is_err());
    }

    #[test]
    fn set_entry_adds_replaces_and_keeps_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, FIXTURE).unwrap();
        set_entry(&p, "carol", &hash_argon2id(b"c1").unwrap()).unwrap();
        set_entry(&p, "alice", &hash_argon2id(b"a2").unwrap()).unwrap();
        let f = PasswordFile::load(&p).unwrap();
        assert_eq!(f.len(), 5);
        assert!(f.get("carol").unwrap().verify(b"c1"));
        assert!(f.get("alice").unwrap().verify(b"a2"));
        assert!(f.get("bob").unwrap().verify(b"bob-pw"));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(set_entry(&p, "x:y", "h").is_err());
    }
}
