//! Login: checking a CONNECT's credentials (cached verifications, slow hashes sent off the
//! executor) and the access rules in force.

use super::*;

/// The rules in force and the state of logins on this shard: the password and ACL rules
/// (shared read-only by every shard), the cache of logins verified recently, and how many
/// slow verifications run off the executor (at most `verifications_inflight_max`).
#[derive(Debug)]
pub(super) struct Logins {
    pub auth: Arc<Auth>,
    verified: VerifiedCache,
    verifying: u32,
    verifying_max: u32,
}

impl Logins {
    pub fn new(cfg: &Config) -> Logins {
        Logins {
            auth: Arc::new(Auth::new(
                cfg.auth.anonymous_allowed(),
                None,
                None,
                cfg.access.subscribe_deny.clone(),
            )),
            verified: VerifiedCache::new(cfg.auth.verified_cache_max as usize),
            verifying: 0,
            verifying_max: cfg.auth.verifications_inflight_max,
        }
    }

    /// Puts new rules in force; logins verified under the old ones must be verified again.
    pub fn set_auth(&mut self, auth: Arc<Auth>) {
        self.auth = auth;
        self.verified.clear();
    }

    /// The first step of a CONNECT's login: decides at once, or asks for a password check
    /// off the executor. `cert_identity` is the client certificate's identity when the
    /// listener takes it as the user name (then no password is needed).
    pub fn check(
        &mut self,
        c: &Connect,
        cert_identity: Option<&str>,
        peer: Option<std::net::SocketAddr>,
    ) -> LoginStep {
        let password = c.password.as_deref();
        let user = c.username.as_ref().map(|u| u.as_str());
        let mut login = Login {
            username: None,
            refused: None,
            peer,
        };
        match self.auth.login(user, password, cert_identity) {
            LoginCheck::Done(Ok(None)) => {}
            LoginCheck::Done(Ok(Some(name))) => match MqttStr::new(&name) {
                Ok(n) => login.username = Some(n),
                // A name that is no MQTT string (a huge certificate subject) must not
                // become an anonymous login.
                Err(_) => login.refused = Some(LoginFailure::UnknownUser),
            },
            LoginCheck::Done(Err(why)) => {
                login.username = c.username.clone();
                login.refused = Some(why);
            }
            LoginCheck::Verify { user, hash } => {
                login.username = MqttStr::new(&user).ok();
                let password = c.password.clone().unwrap_or_default();
                let digest = self.verified.digest(&user, &password);
                if self.verified.contains(&digest) {
                    return LoginStep::Done(login);
                }
                if hash.is_slow() {
                    if self.verifying >= self.verifying_max {
                        login.refused = Some(LoginFailure::Busy);
                        return LoginStep::Done(login);
                    }
                    self.verifying += 1;
                    return LoginStep::Verify(Verification {
                        login,
                        hash,
                        password,
                        digest,
                    });
                }
                if hash.verify(&password) {
                    self.verified.insert(digest);
                } else {
                    login.refused = Some(LoginFailure::WrongPassword);
                }
            }
        }
        LoginStep::Done(login)
    }

    /// The result of a [`Verification`] that ran off the executor.
    pub fn finish(&mut self, v: Verification, ok: bool) -> Login {
        self.verifying = self.verifying.saturating_sub(1);
        let mut login = v.login;
        if ok {
            self.verified.insert(v.digest);
        } else {
            login.refused = Some(LoginFailure::WrongPassword);
        }
        login
    }
}

impl Core {
    /// Puts new password and ACL rules in force (at start and on reload). Connected clients
    /// stay; every later operation is checked against the new rules.
    pub fn set_auth(&mut self, auth: Arc<Auth>) {
        self.logins.set_auth(auth);
    }

    /// The first step of a CONNECT's login (see [`Logins::check`]).
    pub fn check_login(
        &mut self,
        c: &Connect,
        cert_identity: Option<&str>,
        peer: Option<std::net::SocketAddr>,
    ) -> LoginStep {
        self.logins.check(c, cert_identity, peer)
    }

    /// The result of a [`Verification`] that ran off the executor.
    pub fn verified(&mut self, v: Verification, ok: bool) -> Login {
        self.logins.finish(v, ok)
    }
}
