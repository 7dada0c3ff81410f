//! The prefix cache: full KV blocks named by a hash of their tokens chained with the hash of
//! every block before them, so a new prompt that starts the same way finds them again.
//! Blocks no sequence uses stay here, oldest first, until the pool needs them back.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

/// The hash that starts every chain (the block before the first).
pub const ROOT: u64 = 0x666c_6174_6d65_7368;

/// The hash of a block of `tokens` that follows the block hashed `parent`.
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    // SipHash with fixed keys: the same on every run and every node.
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// What the cache knows of one block it holds.
#[derive(Debug)]
struct Entry {
    hash: u64,
    parent: u64,
    /// The block's tokens, compared on a hit: a hash collision is never a wrong answer.
    tokens: Vec<u32>,
    /// When it became idle (its key in `idle`), if no sequence uses it.
    idle_since: Option<u64>,
}

/// Cached blocks by hash, and the idle ones in least-recently-used order.
#[derive(Debug, Default)]
pub struct PrefixCache {
    by_hash: HashMap<u64, u32>,
    entries: HashMap<u32, Entry>,
    /// Idle cached blocks by the tick they became idle: the first is evicted first.
    idle: BTreeMap<u64, u32>,
    tick: u64,
}

impl PrefixCache {
    /// Cached blocks that no sequence uses (they can be taken back).
    pub fn idle(&self) -> usize {
        self.idle.len()
    }

    /// Whether `block` holds a cached prefix.
    pub fn holds(&self, block: u32) -> bool {
        self.entries.contains_key(&block)
    }

    /// Name `block` (in use by a sequence) by its hash. Returns the hash; where another block
    /// already holds the same tokens, that one stays the cached one and `block` stays private.
    pub fn insert(&mut self, block: u32, parent: u64, tokens: &[u32]) -> u64 {
        let hash = block_hash(parent, tokens);
        if self.by_hash.contains_key(&hash) || self.entries.contains_key(&block) {
            return hash;
        }
        self.by_hash.insert(hash, block);
        self.entries.insert(
            block,
            Entry {
                hash,
                parent,
                tokens: tokens.to_vec(),
                idle_since: None,
            },
        );
        hash
    }

    /// The cached block holding `tokens` after the block hashed `parent`, and its hash.
    pub fn find(&self, parent: u64, tokens: &[u32]) -> Option<(u32, u64)> {
        let hash = block_hash(parent, tokens);
        let block = *self.by_hash.get(&hash)?;
        let e = &self.entries[&block];
        (e.parent == parent && e.tokens == tokens).then_some((block, hash))
    }

    /// A cached block is used again: it is no longer idle.
    pub fn touch(&mut self, block: u32) {
        if let Some(e) = self.entries.get_mut(&block) {
            if let Some(t) = e.idle_since.take() {
                self.idle.remove(&t);
            }
        }
    }

    /// The last sequence using a cached block let it go: it waits, idle, to be used again.
    pub fn park(&mut self, block: u32) {
        if let Some(e) = self.entries.get_mut(&block) {
            self.tick += 1;
            e.idle_since = Some(self.tick);
            self.idle.insert(self.tick, block);
        }
    }

    /// Take back the least recently used idle block (it leaves the cache).
    pub fn evict(&mut self) -> Option<u32> {
        let (_, block) = self.idle.pop_first()?;
        let e = self
            .entries
            .remove(&block)
            .expect("an idle block is cached");
        self.by_hash.remove(&e.hash);
        Some(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_hash_depends_on_its_tokens_and_everything_before_them() {
        let a = block_hash(ROOT, &[1, 2, 3]);
        assert_eq!(a, block_hash(ROOT, &[1, 2, 3]), "stable");
        assert_ne!(a, block_hash(ROOT, &[1, 2, 4]));
        assert_ne!(a, block_hash(ROOT, &[3, 2, 1]));
        // The same tokens after another prefix are another block.
        let b = block_hash(a, &[7, 8, 9]);
        assert_ne!(b, block_hash(block_hash(ROOT, &[1, 2, 4]), &[7, 8, 9]));
        assert_ne!(b, block_hash(ROOT, &[7, 8, 9]));
    }

    #[test]
    fn blocks_are_found_by_their_chain_and_the_first_copy_stays_cached() {
        let mut c = PrefixCache::default();
        let h0 = c.insert(5, ROOT, &[1, 2]);
        let h1 = c.insert(9, h0, &[3, 4]);
        assert_eq!(c.find(ROOT, &[1, 2]), Some((5, h0)));
        assert_eq!(c.find(h0, &[3, 4]), Some((9, h1)));
        assert_eq!(c.find(ROOT, &[3, 4]), None, "not after another prefix");
        assert_eq!(
            c.insert(6, ROOT, &[1, 2]),
            h0,
            "a second copy stays private"
        );
        assert!(!c.holds(6));
        assert_eq!(c.find(ROOT, &[1, 2]), Some((5, h0)));
    }

    #[test]
    fn idle_blocks_are_evicted_least_recently_used_first() {
        let mut c = PrefixCache::default();
        for b in 0..3 {
            c.insert(b, ROOT, &[b]);
        }
        assert_eq!(c.evict(), None, "blocks in use are never evicted");
        c.park(2);
        c.park(0);
        c.park(1);
        assert_eq!(c.idle(), 3);
        c.touch(2); // used again: no longer idle
        c.park(2); // and idle again: now the newest
        assert_eq!(c.evict(), Some(0));
        assert_eq!(
            c.find(ROOT, &[0]),
            None,
            "an evicted block is no longer found"
        );
        assert_eq!(c.evict(), Some(1));
        assert_eq!(c.evict(), Some(2));
        assert_eq!(c.evict(), None);
    }
}
