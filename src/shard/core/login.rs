//! Login: checking a CONNECT's credentials (cached verifications, slow hashes sent off the
//! executor) and the access rules in force.

use super::*;

impl Core {
    /// Puts new password and ACL rules in force (at start and on reload). Connected clients
    /// stay; every later operation is checked against the new rules.
    pub fn set_auth(&mut self, auth: Arc<Auth>) {
        self.auth = auth;
        self.verified.clear();
    }

    /// The first step of a CONNECT's login: decides at once, or asks for a password check
    /// off the executor. `cert_identity` is the client certificate's identity when the
    /// listener takes it as the user name (then no password is needed).
    pub fn check_login(
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
                    if self.verifying >= self.cfg.auth.verifications_inflight_max {
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
    pub fn verified(&mut self, v: Verification, ok: bool) -> Login {
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
