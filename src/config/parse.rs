//! Reading the TOML config: errors with line and column, unknown keys with the nearest
//! known key, and a Mosquitto file recognised as such.

use super::*;

impl Config {
    /// Parses TOML text; unknown keys and wrong types are errors naming the key. Then
    /// [`Config::validate`].
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let cfg = Config::from_toml_unchecked(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// [`Config::from_toml`] without the validation, for a file that flags complete
    /// (`--cluster-jetstream` for a `storage.durability = "replicated"` file): the caller
    /// validates what it runs.
    pub fn from_toml_unchecked(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            if looks_like_mosquitto_conf(text) {
                return ConfigError {
                    key: "config".into(),
                    reason: "this is a Mosquitto configuration (mosquitto.conf), not shardmq's TOML; `shardmq convert-mosquitto-conf FILE` prints the equivalent".into(),
                };
            }
            let mut reason = e.message().trim().to_string();
            let key = e
                .span()
                .and_then(|s| key_at(text, s))
                .unwrap_or_else(|| "config".into());
            let unknown = reason
                .strip_prefix("unknown field `")
                .and_then(|r| r.split('`').next())
                .map(str::to_owned);
            if let Some(unknown) = unknown {
                // serde lists the keys of the section; the nearest key of any section is
                // what a typo or a misplaced key most likely meant.
                reason = format!("unknown key `{unknown}`");
                if let Some(near) = nearest_key(&unknown) {
                    reason.push_str(&format!(" (did you mean `{near}`?)"));
                }
            }
            if let Some(span) = e.span() {
                let (line, column) = line_column(text, span.start);
                reason.push_str(&format!(" (line {line}, column {column})"));
            }
            ConfigError { key, reason }
        })?;
        Ok(cfg)
    }
}

/// The key an error span points into: the span itself when it is a key (an unknown
/// field), or, when it is a value, the `table.key` assigned on that line (a wrong type
/// names the key, not the value). Falls back to the spanned text.
/// The 1-based line and column (in characters) of byte offset `at` in `text`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Every key of the configuration, as `section.key` (the defaults, written out as TOML).
fn known_keys() -> Vec<String> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
        if let toml::Value::Table(t) = v {
            for (k, v) in t {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                if matches!(v, toml::Value::Table(_)) {
                    walk(&path, v, out);
                } else {
                    out.push(path);
                }
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(v) = toml::Value::try_from(Config::default()) {
        walk("", &v, &mut out);
    }
    // Keys that are absent from the defaults (optional ones).
    for k in [
        "shards.count",
        "shards.cores",
        "auth.allow_anonymous",
        "auth.password_file",
        "auth.acl_file",
        "admin.token",
        "listeners.address",
        "listeners.transport",
        "listeners.cert_file",
        "listeners.key_file",
        "listeners.client_ca_file",
        "listeners.require_client_cert",
        "listeners.use_identity_as_username",
        "listeners.connections_max",
        "listeners.connect_rate_per_s",
        "listeners.ws_path",
    ] {
        if !out.iter().any(|o| o == k) {
            out.push(k.to_string());
        }
    }
    out
}

/// The known key nearest to `unknown` (a typo, or a key in the wrong section), if any is
/// near enough.
fn nearest_key(unknown: &str) -> Option<String> {
    known_keys()
        .into_iter()
        .map(|k| {
            let leaf = k.rsplit('.').next().unwrap_or(&k).to_string();
            (strsim::jaro_winkler(unknown, &leaf), k)
        })
        .filter(|(score, _)| *score >= 0.85)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// Whether a file that is not TOML reads as Mosquitto's `key value` configuration.
fn looks_like_mosquitto_conf(text: &str) -> bool {
    const MOSQUITTO_KEYS: [&str; 14] = [
        "listener",
        "port",
        "persistence",
        "persistence_location",
        "allow_anonymous",
        "password_file",
        "acl_file",
        "log_dest",
        "log_type",
        "max_queued_messages",
        "max_inflight_messages",
        "include_dir",
        "protocol",
        "per_listener_settings",
    ];
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    !lines.is_empty()
        && lines
            .iter()
            .all(|l| !l.contains('=') && !l.starts_with('['))
        && lines.iter().any(|l| {
            let word = l.split_whitespace().next().unwrap_or("");
            MOSQUITTO_KEYS.contains(&word)
        })
}

fn key_at(text: &str, span: std::ops::Range<usize>) -> Option<String> {
    let spanned = text.get(span.clone())?.trim();
    let line_start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
    let table = text[..line_start].lines().rev().find_map(|l| {
        let l = l.trim();
        l.strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .map(|t| t.trim_matches(|c| c == '[' || c == ']').trim().to_string())
    });
    let Some((key, _)) = text[line_start..span.start].split_once('=') else {
        // The span is the key itself (an unknown key).
        return Some(match table {
            Some(t) => format!("{t}.{spanned}"),
            None => spanned.to_string(),
        });
    };
    let key = key.trim();
    Some(match table {
        Some(t) if !key.is_empty() => format!("{t}.{key}"),
        _ if !key.is_empty() => key.to_string(),
        _ => spanned.to_string(),
    })
}
