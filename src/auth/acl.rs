//! Access control lists in Mosquitto's `acl_file` format, with Mosquitto's semantics.
//!
//! ```text
//! # comment
//! topic read public/#            <- before any `user` line: anonymous clients
//! user alice
//! topic readwrite alice/#        <- alice only
//! topic deny alice/secret/#
//! pattern write devices/%c/state <- every client (%c: client id, %u: user name)
//! ```
//!
//! With an ACL file everything not granted is denied. A client's rules are its user's
//! section (or the anonymous one), then every `pattern`. Within each list `deny` rules are
//! checked first, then the others in file order; the first rule whose filter matches the
//! topic and grants the access decides. A user's section that grants access is not
//! overridden by a pattern. `%c`/`%u` must be a whole level; a `%u` pattern does not apply to
//! anonymous clients, and a client whose id or user name contains `+` or `#` gets nothing
//! from patterns. A filter starting with a wildcard does not match `$` topics.
//!
//! Mosquitto checks only publish and delivery. Subscribing is checked here too (so that a
//! client learns at SUBACK time that a filter gives it nothing): a filter is refused when a
//! `deny` rule covers all of it, or when no rule granting read shares a topic with it.
//! Delivery is always checked per message, so a subscription to `#` only ever delivers
//! topics the client may read.

use hashbrown::HashMap;
use std::path::Path;

use super::password::{read_text, FileError};
use crate::protocol::TopicFilter;

/// What a client wants to do with a topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Receive messages on it.
    Read,
    /// Publish to it.
    Write,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Level {
    Literal(Box<str>),
    Plus,
    Hash,
    ClientId,
    Username,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    levels: Vec<Level>,
    read: bool,
    write: bool,
    /// Mentions `%u` (skipped for anonymous clients).
    uses_username: bool,
}

impl Rule {
    fn deny(&self) -> bool {
        !self.read && !self.write
    }
}

/// A parsed ACL file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acl {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

/// Puts `deny` rules first, keeping file order otherwise.
fn push(list: &mut Vec<Rule>, rule: Rule) {
    if rule.deny() {
        let at = list.iter().take_while(|r| r.deny()).count();
        list.insert(at, rule);
    } else {
        list.push(rule);
    }
}

/// The value a level of a rule stands for, for this client (`None`: the rule cannot apply).
fn level_value<'a>(l: &'a Level, client_id: &'a str, user: Option<&'a str>) -> Option<&'a str> {
    match l {
        Level::Literal(s) => Some(s),
        Level::ClientId => Some(client_id),
        Level::Username => user,
        Level::Plus => Some("+"),
        Level::Hash => Some("#"),
    }
}

/// Whether `topic` (a topic name) matches the rule's filter for this client.
fn matches(rule: &Rule, topic: &str, client_id: &str, user: Option<&str>) -> bool {
    let dollar = topic.starts_with('$');
    let mut t = topic.split('/');
    for (i, l) in rule.levels.iter().enumerate() {
        match l {
            Level::Hash => return !(i == 0 && dollar),
            Level::Plus => {
                if t.next().is_none() || (i == 0 && dollar) {
                    return false;
                }
            }
            _ => {
                let Some(v) = level_value(l, client_id, user) else {
                    return false;
                };
                if t.next() != Some(v) {
                    return false;
                }
            }
        }
    }
    t.next().is_none()
}

/// A level of a subscription filter.
fn filter_level(s: &str) -> Level {
    match s {
        "+" => Level::Plus,
        "#" => Level::Hash,
        _ => Level::Literal(s.into()),
    }
}

/// Whether some topic matches both the rule and the filter.
fn intersects(rule: &Rule, filter: &[Level], client_id: &str, user: Option<&str>) -> bool {
    let dollar = |l: &Level| matches!(l, Level::Literal(s) if s.starts_with('$'));
    let wild = |l: &Level| matches!(l, Level::Plus | Level::Hash);
    if let (Some(a), Some(b)) = (rule.levels.first(), filter.first()) {
        // A wildcard first level never meets a `$` topic.
        let a_dollar = level_value(a, client_id, user).is_some_and(|v| v.starts_with('$'));
        if (wild(a) && dollar(b)) || (wild(b) && a_dollar) {
            return false;
        }
    }
    let mut i = 0;
    loop {
        match (rule.levels.get(i), filter.get(i)) {
            (Some(Level::Hash), _) | (_, Some(Level::Hash)) => return true,
            (None, None) => return true,
            (None, Some(_)) | (Some(_), None) => return false,
            (Some(Level::Plus), Some(_)) | (Some(_), Some(Level::Plus)) => {}
            (Some(a), Some(Level::Literal(b))) => {
                if level_value(a, client_id, user) != Some(b) {
                    return false;
                }
            }
            (Some(_), Some(_)) => return false,
        }
        i += 1;
    }
}

/// Whether every topic matching the filter matches the rule.
fn covers(rule: &Rule, filter: &[Level], client_id: &str, user: Option<&str>) -> bool {
    if let (Some(a), Some(Level::Literal(b))) = (rule.levels.first(), filter.first()) {
        if matches!(a, Level::Plus | Level::Hash) && b.starts_with('$') {
            return false;
        }
    }
    let mut i = 0;
    loop {
        match (rule.levels.get(i), filter.get(i)) {
            (Some(Level::Hash), _) => return true,
            (None, None) => return true,
            // The filter ends (or `#` there also matches the parent): only `#` next covers it.
            (Some(_), None) | (None, Some(_)) | (Some(_), Some(Level::Hash)) => return false,
            (Some(Level::Plus), Some(_)) => {}
            (Some(_), Some(Level::Plus)) => return false,
            (Some(a), Some(Level::Literal(b))) => {
                if level_value(a, client_id, user) != Some(b) {
                    return false;
                }
            }
            (Some(_), Some(_)) => return false,
        }
        i += 1;
    }
}

fn dangerous(s: &str) -> bool {
    s.contains(['+', '#'])
}

impl Acl {
    /// Parses an ACL file's text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &str) -> Result<Acl, FileError> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (i, raw) in text.lines().enumerate() {
            let err = |reason: String| FileError {
                path: path.into(),
                line: i + 1,
                reason,
            };
            let line = raw.trim_end();
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (keyword, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
            let rest = rest.trim();
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err(err("`user` needs a user name".into()));
                    }
                    acl.users.entry(rest.to_string()).or_default();
                    user = Some(rest.to_string());
                }
                "topic" | "pattern" => {
                    let pattern = keyword == "pattern";
                    let (access, filter) = match rest.split_once([' ', '\t']) {
                        Some((a, f)) if matches!(a, "read" | "write" | "readwrite" | "deny") => {
                            (a, f.trim())
                        }
                        _ => ("readwrite", rest),
                    };
                    if filter.is_empty() {
                        return Err(err(format!("`{keyword}` needs a topic filter")));
                    }
                    TopicFilter::new(filter)
                        .ok()
                        .filter(|f| !f.is_shared())
                        .ok_or_else(|| err(format!("{filter:?} is not a valid topic filter")))?;
                    let levels: Vec<Level> = filter
                        .split('/')
                        .map(|l| match l {
                            "%c" if pattern => Level::ClientId,
                            "%u" if pattern => Level::Username,
                            l => filter_level(l),
                        })
                        .collect();
                    let rule = Rule {
                        uses_username: levels.contains(&Level::Username),
                        levels,
                        read: matches!(access, "read" | "readwrite"),
                        write: matches!(access, "write" | "readwrite"),
                    };
                    let list = if pattern {
                        &mut acl.patterns
                    } else {
                        match &user {
                            Some(u) => acl.users.entry(u.clone()).or_default(),
                            None => &mut acl.anonymous,
                        }
                    };
                    push(list, rule);
                }
                other => return Err(err(format!("unknown keyword {other:?}"))),
            }
        }
        Ok(acl)
    }

    pub fn load(path: &Path) -> Result<Acl, FileError> {
        let text = read_text(path)?;
        Acl::parse(&text, &path.display().to_string())
    }

    /// The two rule lists that apply to a client, in order, with whether the patterns apply.
    fn lists(&self, user: Option<&str>, client_id: &str) -> (&[Rule], &[Rule]) {
        let own = match user {
            Some(u) => self.users.get(u).map_or(&[][..], |v| &v[..]),
            None => &self.anonymous[..],
        };
        let patterns = if user.is_some_and(dangerous) || dangerous(client_id) {
            &[][..]
        } else {
            &self.patterns[..]
        };
        (own, patterns)
    }

    /// Whether the client may read or write `topic` (a topic name).
    pub fn allows(&self, user: Option<&str>, client_id: &str, topic: &str, access: Access) -> bool {
        let (own, patterns) = self.lists(user, client_id);
        for list in [own, patterns] {
            for r in list {
                if r.uses_username && user.is_none() {
                    continue;
                }
                if !matches(r, topic, client_id, user) {
                    continue;
                }
                if r.deny() {
                    return false;
                }
                let granted = match access {
                    Access::Read => r.read,
                    Access::Write => r.write,
                };
                if granted {
                    return true;
                }
            }
        }
        false
    }

    /// Whether the client may subscribe to `filter` (the part after `$share/<group>/` for a
    /// shared subscription): see the module docs.
    pub fn allows_subscribe(&self, user: Option<&str>, client_id: &str, filter: &str) -> bool {
        let levels: Vec<Level> = filter.split('/').map(filter_level).collect();
        let (own, patterns) = self.lists(user, client_id);
        for list in [own, patterns] {
            for r in list {
                if r.uses_username && user.is_none() {
                    continue;
                }
                if r.deny() {
                    if covers(r, &levels, client_id, user) {
                        return false;
                    }
                } else if r.read && intersects(r, &levels, client_id, user) {
                    return true;
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Access::{Read, Write};

    const ACL: &str = "\
# anonymous
topic read public/#

user alice
topic readwrite alice/#
topic deny alice/secret/#
topic write shared/in

user bob
topic read #
topic deny private/#

pattern readwrite devices/%c/#
pattern read users/%u/inbox
";

    fn acl() -> Acl {
        Acl::parse(ACL, "acl").unwrap()
    }

    #[test]
    fn users_anonymous_and_deny_first() {
        let a = acl();
        assert!(a.allows(None, "c", "public/x", Read));
        assert!(!a.allows(None, "c", "public/x", Write));
        assert!(!a.allows(None, "c", "alice/x", Read));
        assert!(a.allows(Some("alice"), "c", "alice/x", Write));
        assert!(!a.allows(Some("alice"), "c", "alice/secret/x", Read));
        assert!(
            !a.allows(Some("alice"), "c", "public/x", Read),
            "anonymous rules are not alice's"
        );
        assert!(a.allows(Some("alice"), "c", "shared/in", Write));
        assert!(!a.allows(Some("alice"), "c", "shared/in", Read));
        assert!(a.allows(Some("bob"), "c", "anything/at/all", Read));
        assert!(!a.allows(Some("bob"), "c", "private/x", Read));
        assert!(
            !a.allows(Some("bob"), "c", "$SYS/x", Read),
            "# does not match $ topics"
        );
        assert!(!a.allows(Some("carol"), "c", "public/x", Read));
    }

    #[test]
    fn patterns_substitute_client_id_and_user() {
        let a = acl();
        assert!(a.allows(None, "dev1", "devices/dev1/temp", Write));
        assert!(!a.allows(None, "dev1", "devices/dev2/temp", Write));
        assert!(
            !a.allows(None, "dev1", "users/dev1/inbox", Read),
            "%u needs a user"
        );
        assert!(a.allows(Some("carol"), "x", "users/carol/inbox", Read));
        assert!(!a.allows(Some("carol"), "x", "users/dave/inbox", Read));
        assert!(
            !a.allows(Some("c+"), "x", "users/c+/inbox", Read),
            "dangerous user name"
        );
        assert!(
            !a.allows(None, "d#", "devices/d#/x", Read),
            "dangerous client id"
        );
    }

    #[test]
    fn subscribe_checks() {
        let a = acl();
        assert!(a.allows_subscribe(Some("bob"), "c", "#"));
        assert!(!a.allows_subscribe(Some("bob"), "c", "private/#"));
        assert!(a.allows_subscribe(Some("bob"), "c", "+/x"));
        assert!(a.allows_subscribe(Some("alice"), "c", "alice/+"));
        assert!(
            a.allows_subscribe(Some("alice"), "c", "#"),
            "shares alice/#"
        );
        assert!(!a.allows_subscribe(Some("alice"), "c", "alice/secret/#"));
        assert!(
            !a.allows_subscribe(Some("alice"), "c", "shared/in"),
            "write only"
        );
        assert!(!a.allows_subscribe(None, "c", "alice/#"));
        assert!(
            a.allows_subscribe(None, "c", "public"),
            "public/# matches public"
        );
        assert!(!a.allows_subscribe(Some("bob"), "c", "$SYS/#"));
        assert!(a.allows_subscribe(None, "dev1", "devices/dev1/#"));
        assert!(!a.allows_subscribe(None, "dev1", "devices/dev2/#"));
        assert!(a.allows_subscribe(None, "dev1", "devices/+/x"));
    }

    #[test]
    fn bad_files_name_the_line() {
        let e = Acl::parse("topic read a\nfoo bar\n", "f").unwrap_err();
        assert_eq!(e.line, 2);
        let e = Acl::parse("user alice\ntopic read a/#/b\n", "f").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(
            Acl::parse("topic read\n", "f").is_ok(),
            "`read` alone is a topic"
        );
        assert!(Acl::parse("user\n", "f").is_err());
        assert!(Acl::parse("topic $share/g/x\n", "f").is_err());
    }

    #[test]
    fn no_rules_no_access() {
        let a = Acl::parse("", "f").unwrap();
        assert!(!a.allows(None, "c", "x", Read));
        assert!(!a.allows_subscribe(None, "c", "#"));
    }
}
