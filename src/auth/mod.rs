//! Who may connect, and what they may touch: the password file, the ACL file and the
//! `[auth]` settings, parsed once and shared read-only (`Arc`) by every shard; a reload
//! (SIGHUP) parses the files again and hands each shard the new `Arc`.
//!
//! No I/O after loading and no knowledge of shards: the core asks [`Auth::login`] what to do
//! with a CONNECT's credentials and [`Auth::allows`] / [`Auth::allows_subscribe`] what a
//! client may do. Slow hashes are verified by the caller off the executor.

pub mod acl;
pub mod password;

use std::sync::Arc;

pub use acl::{Access, Acl};
pub use password::{FileError, PasswordFile, PasswordHash};

use crate::config::Config;

/// The rules in force.
#[derive(Debug, Default)]
pub struct Auth {
    allow_anonymous: bool,
    passwords: Option<PasswordFile>,
    acl: Option<Acl>,
    /// Every topic filter no client may subscribe to (`[access] subscribe_deny`).
    subscribe_deny: Vec<String>,
}

/// Why a login was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginFailure {
    /// No user name, and anonymous clients are not allowed.
    Anonymous,
    /// A user name the password file does not list.
    UnknownUser,
    /// A user name without a password.
    NoPassword,
    /// The password does not match.
    WrongPassword,
    /// Too many slow verifications in progress on this shard.
    Busy,
}

impl LoginFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            LoginFailure::Anonymous => "anonymous clients are not allowed",
            LoginFailure::UnknownUser => "unknown user",
            LoginFailure::NoPassword => "no password",
            LoginFailure::WrongPassword => "wrong password",
            LoginFailure::Busy => "too many logins being verified",
        }
    }
}

/// What to do with a CONNECT's credentials.
#[derive(Debug)]
pub enum LoginCheck {
    /// Decided: accepted with this user name (None: anonymous), or refused.
    Done(Result<Option<String>, LoginFailure>),
    /// The password must be checked against this hash (see [`PasswordHash::is_slow`]).
    Verify {
        user: String,
        hash: Arc<PasswordHash>,
    },
}

impl Auth {
    /// Reads the files the configuration names. Errors name the file and line.
    pub fn load(config: &Config) -> Result<Auth, FileError> {
        let cfg = &config.auth;
        let passwords = cfg
            .password_file
            .as_deref()
            .map(PasswordFile::load)
            .transpose()?;
        let acl = cfg.acl_file.as_deref().map(Acl::load).transpose()?;
        Ok(Auth {
            allow_anonymous: cfg.anonymous_allowed(),
            passwords,
            acl,
            subscribe_deny: config.access.subscribe_deny.clone(),
        })
    }

    /// Rules for tests and for a broker without files.
    pub fn new(
        allow_anonymous: bool,
        passwords: Option<PasswordFile>,
        acl: Option<Acl>,
        subscribe_deny: Vec<String>,
    ) -> Auth {
        Auth {
            allow_anonymous,
            passwords,
            acl,
            subscribe_deny,
        }
    }

    /// Whether an ACL file is in force (without one every topic is open).
    pub fn has_acl(&self) -> bool {
        self.acl.is_some()
    }

    /// Whether sessions belong to the user that made them: with a password file or an ACL
    /// file in force (without either, no user may read less than another).
    pub fn sessions_have_owners(&self) -> bool {
        self.passwords.is_some() || self.acl.is_some()
    }

    /// The first step of a login. `cert_identity`, when the listener takes it as the user
    /// name, is the user name and needs no password. Without a password file a user name
    /// is taken as given (as Mosquitto does).
    pub fn login(
        &self,
        user: Option<&str>,
        password: Option<&[u8]>,
        cert_identity: Option<&str>,
    ) -> LoginCheck {
        if let Some(id) = cert_identity {
            return LoginCheck::Done(Ok(Some(id.to_string())));
        }
        let Some(user) = user else {
            return LoginCheck::Done(if self.allow_anonymous {
                Ok(None)
            } else {
                Err(LoginFailure::Anonymous)
            });
        };
        let Some(file) = &self.passwords else {
            return LoginCheck::Done(Ok(Some(user.to_string())));
        };
        let Some(hash) = file.get(user) else {
            return LoginCheck::Done(Err(LoginFailure::UnknownUser));
        };
        if password.is_none() {
            return LoginCheck::Done(Err(LoginFailure::NoPassword));
        }
        LoginCheck::Verify {
            user: user.to_string(),
            hash: hash.clone(),
        }
    }

    /// Whether the client may read or write `topic`.
    pub fn allows(&self, user: Option<&str>, client_id: &str, topic: &str, access: Access) -> bool {
        match &self.acl {
            None => true,
            Some(acl) => acl.allows(user, client_id, topic, access),
        }
    }

    /// Whether the client may subscribe to `filter` (a whole filter, `$share/...` included).
    /// `Some(reason)` when refused: `true` for `[access] subscribe_deny`, `false` for the ACL.
    pub fn refuses_subscribe(
        &self,
        user: Option<&str>,
        client_id: &str,
        filter: &str,
    ) -> Option<bool> {
        if self.subscribe_deny.iter().any(|d| d == filter) {
            return Some(true);
        }
        let acl = self.acl.as_ref()?;
        let plain = match filter.strip_prefix("$share/") {
            Some(rest) => rest.split_once('/').map_or(rest, |(_, f)| f),
            None => filter,
        };
        (!acl.allows_subscribe(user, client_id, plain)).then_some(false)
    }
}

/// A bounded per-shard memory of logins verified recently: (user, keyed digest of the
/// password) pairs, so that a client reconnecting with the right password does not pay for
/// a slow hash again. The key is random per process; the map is cleared on reload.
#[derive(Debug)]
pub struct VerifiedCache {
    key: [u8; 32],
    entries: hashbrown::HashSet<[u8; 32]>,
    max: usize,
}

impl VerifiedCache {
    pub fn new(max: usize) -> VerifiedCache {
        use password_hash::rand_core::{OsRng, RngCore};
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        VerifiedCache {
            key,
            entries: hashbrown::HashSet::new(),
            max,
        }
    }

    /// The cache key of a (user, password) pair.
    pub fn digest(&self, user: &str, password: &[u8]) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut d = Sha256::new();
        d.update(self.key);
        d.update((user.len() as u64).to_be_bytes());
        d.update(user.as_bytes());
        d.update(password);
        d.finalize().into()
    }

    pub fn contains(&self, digest: &[u8; 32]) -> bool {
        self.entries.contains(digest)
    }

    /// Remembers a verified pair; when full, forgets an arbitrary older one.
    pub fn insert(&mut self, digest: [u8; 32]) {
        if self.max == 0 {
            return;
        }
        if self.entries.len() >= self.max {
            if let Some(old) = self.entries.iter().next().copied() {
                self.entries.remove(&old);
            }
        }
        self.entries.insert(digest);
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_decisions() {
        let pw =
            PasswordFile::parse(include_str!("../../tests/fixtures/auth/passwd"), "p").unwrap();
        let open = Auth::new(true, None, None, vec![]);
        assert!(matches!(
            open.login(None, None, None),
            LoginCheck::Done(Ok(None))
        ));
        let closed = Auth::new(false, Some(pw), None, vec![]);
        assert!(matches!(
            closed.login(None, None, None),
            LoginCheck::Done(Err(LoginFailure::Anonymous))
        ));
        assert!(matches!(
            closed.login(Some("nobody"), Some(b"x"), None),
            LoginCheck::Done(Err(LoginFailure::UnknownUser))
        ));
        assert!(matches!(
            closed.login(Some("alice"), None, None),
            LoginCheck::Done(Err(LoginFailure::NoPassword))
        ));
        assert!(matches!(
            closed.login(Some("alice"), Some(b"x"), None),
            LoginCheck::Verify { .. }
        ));
        match closed.login(None, None, Some("CN=dev1")) {
            LoginCheck::Done(Ok(Some(u))) => assert_eq!(u, "CN=dev1"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn verified_cache_is_bounded() {
        let mut c = VerifiedCache::new(2);
        let (a, b, d) = (
            c.digest("a", b"1"),
            c.digest("b", b"1"),
            c.digest("a", b"2"),
        );
        assert_ne!(a, d);
        c.insert(a);
        c.insert(b);
        c.insert(d);
        assert_eq!(c.len(), 2);
        assert!(c.contains(&d));
    }

    #[test]
    fn subscribe_deny_and_shared_filters() {
        let acl = Acl::parse("topic read a/#\n", "f").unwrap();
        let auth = Auth::new(true, None, Some(acl), vec!["test/nosubscribe".into()]);
        assert_eq!(
            auth.refuses_subscribe(None, "c", "test/nosubscribe"),
            Some(true)
        );
        assert_eq!(auth.refuses_subscribe(None, "c", "a/b"), None);
        assert_eq!(auth.refuses_subscribe(None, "c", "$share/g/a/b"), None);
        assert_eq!(auth.refuses_subscribe(None, "c", "$share/g/b"), Some(false));
    }
}
