//! Key encoding (the layout is documented at the top of `storage/mod.rs`).
//!
//! Every per-client key starts with the client id prefixed by its length as a big-endian
//! u16, so that the keys of client `ab` (`00 02 61 62 ..`) never share a prefix with those
//! of client `abc` (`00 03 61 62 63 ..`): a prefix scan finds exactly one client's keys.

use super::StorageError;

/// The engine's key size limit.
pub(crate) const MAX_KEY: usize = u16::MAX as usize;

/// `[len: u16 BE][client id]`: the whole key of `sessions`, the prefix of the others.
pub(crate) fn client_prefix(client_id: &str) -> Result<Vec<u8>, StorageError> {
    client_key(client_id, &[], "client")
}

/// `[len: u16 BE][client id][suffix]`.
pub(crate) fn client_key(
    client_id: &str,
    suffix: &[u8],
    what: &'static str,
) -> Result<Vec<u8>, StorageError> {
    let id = client_id.as_bytes();
    let len = 2 + id.len() + suffix.len();
    if id.len() > u16::MAX as usize || len > MAX_KEY {
        return Err(StorageError::KeyTooLong { what, len });
    }
    let mut key = Vec::with_capacity(len);
    key.extend_from_slice(&(id.len() as u16).to_be_bytes());
    key.extend_from_slice(id);
    key.extend_from_slice(suffix);
    Ok(key)
}

pub(crate) fn subscription_key(client_id: &str, filter: &str) -> Result<Vec<u8>, StorageError> {
    client_key(client_id, filter.as_bytes(), "subscription")
}

pub(crate) fn queue_key(client_id: &str, seq: u64) -> Result<Vec<u8>, StorageError> {
    client_key(client_id, &seq.to_be_bytes(), "queue")
}

pub(crate) fn packet_key(client_id: &str, packet_id: u16) -> Result<Vec<u8>, StorageError> {
    client_key(client_id, &packet_id.to_be_bytes(), "packet id")
}

/// `[len: u16 BE][client id][origin len: u16 BE][origin client id][packet id: u16 BE]`: the
/// QoS 2 dedup key of the publisher `origin`'s message `packet_id`, held by `client_id`.
pub(crate) fn dedup_key(
    client_id: &str,
    origin: &str,
    packet_id: u16,
) -> Result<Vec<u8>, StorageError> {
    let o = origin.as_bytes();
    if o.len() > u16::MAX as usize {
        return Err(StorageError::KeyTooLong {
            what: "dedup",
            len: o.len(),
        });
    }
    let mut suffix = Vec::with_capacity(4 + o.len());
    suffix.extend_from_slice(&(o.len() as u16).to_be_bytes());
    suffix.extend_from_slice(o);
    suffix.extend_from_slice(&packet_id.to_be_bytes());
    client_key(client_id, &suffix, "dedup")
}

/// The origin and packet id of a dedup key's suffix (after the client prefix).
pub(crate) fn dedup_of(suffix: &[u8]) -> Option<(&str, u16)> {
    let len = u16::from_be_bytes([*suffix.first()?, *suffix.get(1)?]) as usize;
    if suffix.len() != 2 + len + 2 {
        return None;
    }
    let origin = std::str::from_utf8(&suffix[2..2 + len]).ok()?;
    Some((origin, packet_id_of(&suffix[2 + len..])?))
}

pub(crate) fn retained_key(topic: &str) -> Result<Vec<u8>, StorageError> {
    if topic.len() > MAX_KEY {
        return Err(StorageError::KeyTooLong {
            what: "retained",
            len: topic.len(),
        });
    }
    Ok(topic.as_bytes().to_vec())
}

/// Splits a per-client key into the client prefix (length and id), the client id and the
/// rest; `None` when the key is too short or the id is not UTF-8.
pub(crate) fn split_client_key(key: &[u8]) -> Option<(&[u8], &str, &[u8])> {
    let len = u16::from_be_bytes([*key.first()?, *key.get(1)?]) as usize;
    if key.len() < 2 + len {
        return None;
    }
    let (prefix, rest) = key.split_at(2 + len);
    let id = std::str::from_utf8(&prefix[2..]).ok()?;
    Some((prefix, id, rest))
}

pub(crate) fn seq_of(suffix: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(suffix.try_into().ok()?))
}

pub(crate) fn packet_id_of(suffix: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(suffix.try_into().ok()?))
}

/// Lower-case hex, for reporting keys.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_prefixes_do_not_nest() {
        let ab = client_prefix("ab").unwrap();
        let abc_key = queue_key("abc", 0).unwrap();
        assert!(!abc_key.starts_with(&ab));
        let ab_key = queue_key("ab", 7).unwrap();
        assert!(ab_key.starts_with(&ab));
    }

    #[test]
    fn queue_keys_sort_by_sequence() {
        let keys: Vec<_> = [0u64, 1, 255, 256, 65_536, u64::MAX]
            .iter()
            .map(|&s| queue_key("c", s).unwrap())
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn split_round_trips() {
        let k = subscription_key("client-1", "a/+/b").unwrap();
        let (prefix, id, rest) = split_client_key(&k).unwrap();
        assert_eq!(prefix, client_prefix("client-1").unwrap());
        assert_eq!(id, "client-1");
        assert_eq!(rest, b"a/+/b");
        let k = queue_key("", 42).unwrap();
        let (_, id, rest) = split_client_key(&k).unwrap();
        assert_eq!((id, seq_of(rest)), ("", Some(42)));
    }

    #[test]
    fn malformed_keys_are_rejected() {
        assert!(split_client_key(&[]).is_none());
        assert!(split_client_key(&[0]).is_none());
        assert!(split_client_key(&[0, 5, b'a']).is_none());
        assert!(split_client_key(&[0, 1, 0xFF]).is_none());
        assert_eq!(seq_of(&[1, 2, 3]), None);
        assert_eq!(packet_id_of(&[1]), None);
    }

    #[test]
    fn oversized_keys_are_refused() {
        let id = "x".repeat(40_000);
        let filter = "f".repeat(30_000);
        assert!(matches!(
            subscription_key(&id, &filter),
            Err(StorageError::KeyTooLong { .. })
        ));
        assert!(retained_key(&"t".repeat(70_000)).is_err());
    }

    #[test]
    fn dedup_keys_round_trip_and_stay_under_their_client() {
        let k = dedup_key("sub", "pub-1", 0x0102).unwrap();
        let (prefix, id, rest) = split_client_key(&k).unwrap();
        assert_eq!(prefix, client_prefix("sub").unwrap());
        assert_eq!(id, "sub");
        assert_eq!(dedup_of(rest), Some(("pub-1", 0x0102)));
        assert_eq!(dedup_of(&rest[..rest.len() - 1]), None);
        // Origins `a` and `ab` give different, non-nested keys.
        let a = dedup_key("s", "a", 7).unwrap();
        let ab = dedup_key("s", "ab", 7).unwrap();
        assert_ne!(a, ab);
        assert!(!ab.starts_with(&a[..a.len() - 2]));
    }

    #[test]
    fn hex_is_lower_case() {
        assert_eq!(hex(&[0x00, 0xAB, 0x10]), "00ab10");
    }
}
