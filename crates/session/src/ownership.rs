//! Which shard owns a client: a fixed hash of the client identifier's bytes, modulo the
//! shard count. The hash never changes across processes, restarts, machines or versions,
//! because it decides where a session is stored on disk: FNV-1a, 64-bit, with its published
//! offset basis and prime.

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a of `bytes`.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET_BASIS;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// The shard (`0..shards`) that owns `client_id`.
pub fn owner_shard(client_id: &[u8], shards: usize) -> usize {
    debug_assert!(shards > 0);
    (stable_hash(client_id) % shards as u64) as usize
}

/// How many slots client ids hash to for ownership across the nodes of a cluster.
pub const SLOTS: u16 = 4096;

/// The cluster slot (`0..SLOTS`) of `client_id`: the same stable hash, modulo [`SLOTS`].
pub fn slot_of(client_id: &[u8]) -> u16 {
    (stable_hash(client_id) % SLOTS as u64) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_the_published_fnv1a() {
        // Test vectors of the FNV reference implementation.
        assert_eq!(stable_hash(b""), 0xcbf29ce484222325);
        assert_eq!(stable_hash(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(stable_hash(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn owner_is_in_range() {
        for n in 1..8 {
            for id in ["", "a", "client-1", "myclientid"] {
                assert!(owner_shard(id.as_bytes(), n) < n);
            }
        }
    }
}
