//! The paged KV cache of a copy: a fixed pool of f16 blocks that sequences take as they grow,
//! share (counted references, copied before a shared block is written) and leave to the
//! prefix cache when they end.

use half::{f16, slice::HalfBitsSliceExt};

use super::prefix::{PrefixCache, ROOT};

/// Blocks of `block_tokens` positions, each holding K and V of every layer for those positions.
pub struct KvPool {
    block_tokens: usize,
    layers: usize,
    kv_dim: usize,
    /// f16 values as their bits: a zeroed `u16` vector is allocated without touching it.
    data: Vec<u16>,
    /// Blocks nobody uses and no cached prefix holds.
    free: Vec<u32>,
    /// Sequences using each block.
    refs: Vec<u32>,
    blocks: usize,
    /// Full blocks by the hash of their prefix; `None` when the prefix cache is off.
    prefix: Option<PrefixCache>,
    /// Whether the K and V values live elsewhere (a GPU's memory): then `data` is empty and
    /// block copies are recorded for the backend (`take_copies`) instead of made.
    elsewhere: bool,
    copies: Vec<(u32, u32)>,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KvPool({} of {} blocks free)",
            self.free_blocks(),
            self.blocks
        )
    }
}

/// Where one sequence's positions live in the pool.
#[derive(Debug)]
pub struct BlockTable {
    pub blocks: Vec<u32>,
    /// Leading blocks named in the prefix cache (or found there), and the hash of the last.
    pub hashed: usize,
    pub chain: u64,
}

impl Default for BlockTable {
    fn default() -> Self {
        BlockTable {
            blocks: Vec::new(),
            hashed: 0,
            chain: ROOT,
        }
    }
}

/// Blocks of a prompt found in the prefix cache.
#[derive(Debug, Default)]
pub struct Reuse {
    pub blocks: Vec<u32>,
    /// The hash of the last block found.
    pub chain: u64,
}

impl KvPool {
    /// A pool of at least `tokens` positions (rounded up to whole blocks). The memory is
    /// allocated zeroed, so the pages are only touched as sequences fill them, but all of it
    /// is counted in the copy's size.
    pub fn new(tokens: usize, block_tokens: usize, layers: usize, kv_dim: usize) -> KvPool {
        let blocks = tokens.div_ceil(block_tokens).max(1);
        KvPool {
            block_tokens,
            layers,
            kv_dim,
            data: vec![0u16; blocks * layers * 2 * block_tokens * kv_dim],
            free: (0..blocks as u32).rev().collect(),
            refs: vec![0; blocks],
            blocks,
            prefix: None,
            elsewhere: false,
            copies: Vec::new(),
        }
    }

    /// The same pool's blocks, with the values held by a backend elsewhere (a GPU): no host
    /// memory for them; `bytes` still counts what the backend holds.
    pub fn blocks_only(tokens: usize, block_tokens: usize, layers: usize, kv_dim: usize) -> KvPool {
        let blocks = tokens.div_ceil(block_tokens).max(1);
        KvPool {
            block_tokens,
            layers,
            kv_dim,
            data: Vec::new(),
            free: (0..blocks as u32).rev().collect(),
            refs: vec![0; blocks],
            blocks,
            prefix: None,
            elsewhere: true,
            copies: Vec::new(),
        }
    }

    /// Block copies `(from, to)` the backend must make before the next step writes, in order
    /// (only a pool of `blocks_only` records them).
    pub fn take_copies(&mut self) -> Vec<(u32, u32)> {
        std::mem::take(&mut self.copies)
    }

    /// Keep full blocks in a prefix cache (the pool and its bytes stay the same).
    pub fn with_prefix_cache(mut self, on: bool) -> KvPool {
        self.prefix = on.then(PrefixCache::default);
        self
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// Bytes the pool holds.
    pub fn bytes(&self) -> u64 {
        (self.blocks * self.layers * 2 * self.block_tokens * self.kv_dim * 2) as u64
    }

    /// Positions the whole pool holds.
    pub fn capacity(&self) -> usize {
        self.blocks * self.block_tokens
    }

    pub fn total_blocks(&self) -> usize {
        self.blocks
    }

    /// Blocks a sequence may take: free ones and idle cached ones.
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.prefix.as_ref().map_or(0, PrefixCache::idle)
    }

    /// A block for a sequence: a free one, else the least recently used idle cached one.
    fn take(&mut self) -> Option<u32> {
        let b = self
            .free
            .pop()
            .or_else(|| self.prefix.as_mut().and_then(PrefixCache::evict))?;
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Blocks a sequence of `tokens` positions needs.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens)
    }

    /// Grow `table` to hold `tokens` positions; `false` (and nothing taken) when the pool has
    /// too few free blocks.
    pub fn grow(&mut self, table: &mut BlockTable, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.blocks.len());
        if need > self.free_blocks() {
            return false;
        }
        for _ in 0..need {
            let b = self.take().expect("counted");
            table.blocks.push(b);
        }
        true
    }

    /// Give all of `table`'s blocks back: a block no other sequence uses becomes free, or
    /// idle in the prefix cache if it holds a cached prefix (last blocks first, so that a
    /// prefix's tail is evicted before its head).
    pub fn release(&mut self, table: &mut BlockTable) {
        for b in table.blocks.drain(..).rev() {
            let refs = &mut self.refs[b as usize];
            *refs -= 1;
            if *refs > 0 {
                continue;
            }
            match &mut self.prefix {
                Some(p) if p.holds(b) => p.park(b),
                _ => self.free.push(b),
            }
        }
        table.hashed = 0;
        table.chain = ROOT;
    }

    /// Another table over the same blocks (another choice of the same prompt).
    pub fn share(&mut self, table: &BlockTable) -> BlockTable {
        for &b in &table.blocks {
            self.refs[b as usize] += 1;
        }
        BlockTable {
            blocks: table.blocks.clone(),
            hashed: table.hashed,
            chain: table.chain,
        }
    }

    /// Make the blocks holding positions `from..to` the table's own before they are written:
    /// a block other sequences use is copied first. `false` when no block is free for a copy
    /// (the blocks copied so far stay the table's own).
    pub fn writable(&mut self, table: &mut BlockTable, from: usize, to: usize) -> bool {
        let end = to.div_ceil(self.block_tokens).min(table.blocks.len());
        for i in from / self.block_tokens..end {
            let old = table.blocks[i];
            if self.refs[old as usize] <= 1 {
                continue;
            }
            let Some(new) = self.take() else {
                return false;
            };
            let len = self.layers * 2 * self.block_tokens * self.kv_dim;
            if self.elsewhere {
                self.copies.push((old, new));
            } else {
                let (from, to) = (old as usize * len, new as usize * len);
                self.data.copy_within(from..from + len, to);
            }
            self.refs[old as usize] -= 1;
            table.blocks[i] = new;
        }
        true
    }

    /// Name the table's full blocks of computed positions (`tokens[..computed]`) in the
    /// prefix cache.
    pub fn remember(&mut self, table: &mut BlockTable, tokens: &[u32], computed: usize) {
        let bt = self.block_tokens;
        let Some(p) = &mut self.prefix else { return };
        while (table.hashed + 1) * bt <= computed.min(tokens.len()) {
            let i = table.hashed;
            table.chain = p.insert(table.blocks[i], table.chain, &tokens[i * bt..(i + 1) * bt]);
            table.hashed += 1;
        }
    }

    /// The cached blocks `tokens` starts with, at most `most` of them, each now used by the
    /// caller (give them back with `release` of a table holding them).
    pub fn reuse(&mut self, tokens: &[u32], most: usize) -> Reuse {
        let mut found = Reuse {
            blocks: Vec::new(),
            chain: ROOT,
        };
        let Some(p) = &mut self.prefix else {
            return found;
        };
        for block in tokens.chunks_exact(self.block_tokens).take(most) {
            let Some((b, hash)) = p.find(found.chain, block) else {
                break;
            };
            p.touch(b);
            self.refs[b as usize] += 1;
            found.blocks.push(b);
            found.chain = hash;
        }
        found
    }

    fn base(&self, table: &BlockTable, layer: usize, pos: usize) -> usize {
        let block = table.blocks[pos / self.block_tokens] as usize;
        let slot = pos % self.block_tokens;
        ((block * self.layers + layer) * 2 * self.block_tokens + slot) * self.kv_dim
    }

    /// K of `pos` in `layer` (V is `block_tokens` rows further).
    #[cfg(test)]
    pub fn k(&self, table: &BlockTable, layer: usize, pos: usize) -> &[f16] {
        let at = self.base(table, layer, pos);
        self.data[at..at + self.kv_dim].reinterpret_cast()
    }

    #[cfg(test)]
    pub fn v(&self, table: &BlockTable, layer: usize, pos: usize) -> &[f16] {
        let at = self.base(table, layer, pos) + self.block_tokens * self.kv_dim;
        self.data[at..at + self.kv_dim].reinterpret_cast()
    }

    /// Columns `cols` of the K rows (or, with `v`, the V rows) of positions `0..upto` in
    /// `layer`, appended to `out`: block by block, without a division per position.
    pub fn rows<'a>(
        &'a self,
        table: &BlockTable,
        layer: usize,
        upto: usize,
        v: bool,
        cols: std::ops::Range<usize>,
        out: &mut Vec<&'a [f16]>,
    ) {
        let (bt, d) = (self.block_tokens, self.kv_dim);
        assert!(cols.end <= d, "rows: columns past the KV width");
        for (i, &block) in table.blocks.iter().enumerate().take(upto.div_ceil(bt)) {
            let first = ((block as usize * self.layers + layer) * 2 * bt + v as usize * bt) * d;
            let slots = (upto - i * bt).min(bt);
            let rows = &self.data[first..first + slots * d];
            out.extend(
                rows.chunks_exact(d)
                    .map(|r| -> &[f16] { r[cols.clone()].reinterpret_cast() }),
            );
        }
    }

    /// Mutable K and V rows of `pos` in `layer`.
    pub fn kv_mut(
        &mut self,
        table: &BlockTable,
        layer: usize,
        pos: usize,
    ) -> (&mut [f16], &mut [f16]) {
        let at = self.base(table, layer, pos);
        let vat = at + self.block_tokens * self.kv_dim;
        let (head, tail) = self.data.split_at_mut(vat);
        (
            head[at..at + self.kv_dim].reinterpret_cast_mut(),
            tail[..self.kv_dim].reinterpret_cast_mut(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(pool: &mut KvPool, table: &BlockTable, tokens: usize, value: f32) {
        for pos in 0..tokens {
            pool.kv_mut(table, 0, pos).0[0] = f16::from_f32(value + pos as f32);
        }
    }

    #[test]
    fn rows_are_the_positions_k_and_v_in_order() {
        let mut pool = KvPool::new(128, 16, 2, 8);
        let (mut a, mut b) = (BlockTable::default(), BlockTable::default());
        // Interleaved growth, so a's blocks are not contiguous in the pool.
        for n in [10, 20, 37] {
            assert!(pool.grow(&mut a, n) && pool.grow(&mut b, n));
        }
        for pos in 0..37 {
            let (k, v) = pool.kv_mut(&a, 1, pos);
            k.iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = f16::from_f32((pos * 8 + i) as f32));
            v.iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = f16::from_f32(-((pos * 8 + i) as f32)));
        }
        for upto in [1, 16, 17, 37] {
            for v in [false, true] {
                let mut got = Vec::new();
                pool.rows(&a, 1, upto, v, 2..6, &mut got);
                assert_eq!(got.len(), upto);
                for (pos, row) in got.iter().enumerate() {
                    let want = if v {
                        pool.v(&a, 1, pos)
                    } else {
                        pool.k(&a, 1, pos)
                    };
                    assert_eq!(*row, &want[2..6], "upto {upto} pos {pos} v {v}");
                }
            }
        }
    }

    #[test]
    fn a_shared_block_is_copied_before_it_is_written() {
        let mut pool = KvPool::new(64, 16, 1, 4);
        let mut a = BlockTable::default();
        assert!(pool.grow(&mut a, 20));
        filled(&mut pool, &a, 20, 1.0);
        let mut b = pool.share(&a);
        assert_eq!(pool.free_blocks(), 2, "sharing takes no block");
        // Position 20 is in the shared partial block: b gets its own copy.
        assert!(pool.writable(&mut b, 20, 21));
        assert_eq!(b.blocks[0], a.blocks[0], "the full block stays shared");
        assert_ne!(b.blocks[1], a.blocks[1]);
        assert_eq!(pool.free_blocks(), 1);
        pool.kv_mut(&b, 0, 20).0[0] = f16::from_f32(-1.0);
        assert_eq!(pool.k(&b, 0, 19)[0].to_f32(), 20.0, "copied");
        assert_eq!(pool.k(&a, 0, 20)[0].to_f32(), 0.0, "a's block untouched");
        assert!(pool.writable(&mut a, 20, 21), "a's block is its own again");
        pool.release(&mut a);
        assert_eq!(pool.free_blocks(), 2, "the block b still uses stays taken");
        pool.release(&mut b);
        assert_eq!(pool.free_blocks(), 4);
    }

    #[test]
    fn a_prompt_reuses_cached_blocks_and_idle_ones_go_least_recently_used() {
        let mut pool = KvPool::new(64, 4, 1, 4).with_prefix_cache(true);
        let tokens: Vec<u32> = (0..10).collect();
        let mut a = BlockTable::default();
        assert!(pool.grow(&mut a, 10));
        filled(&mut pool, &a, 10, 0.0);
        pool.remember(&mut a, &tokens, 10);
        assert_eq!(a.hashed, 2, "two full blocks");
        let found = pool.reuse(&tokens, 5);
        assert_eq!(found.blocks, a.blocks[..2]);
        assert_eq!(found.chain, a.chain);
        let mut b = BlockTable {
            blocks: found.blocks,
            hashed: 2,
            chain: found.chain,
        };
        assert_eq!(pool.k(&b, 0, 7)[0].to_f32(), 7.0);
        pool.release(&mut a);
        pool.release(&mut b);
        // All 16 blocks can be taken; the cached ones go last, oldest first.
        assert_eq!(pool.free_blocks(), 16);
        let mut c = BlockTable::default();
        assert!(pool.grow(&mut c, 14 * 4), "free blocks first");
        let mut again = BlockTable {
            blocks: pool.reuse(&tokens, 5).blocks,
            ..Default::default()
        };
        assert_eq!(again.blocks.len(), 2, "still cached");
        let mut d = BlockTable::default();
        assert!(!pool.grow(&mut d, 4), "blocks in use cannot be taken");
        pool.release(&mut again);
        assert!(
            pool.grow(&mut d, 8),
            "idle cached blocks go when nothing else is free"
        );
        assert_eq!(pool.reuse(&tokens, 5).blocks.len(), 0, "evicted");
    }

    #[test]
    fn sequences_take_blocks_as_they_grow_and_give_them_back() {
        let mut pool = KvPool::new(64, 16, 2, 8);
        assert_eq!(pool.free_blocks(), 4);
        let (mut a, mut b) = (BlockTable::default(), BlockTable::default());
        assert!(pool.grow(&mut a, 17));
        assert_eq!(a.blocks.len(), 2);
        assert!(pool.grow(&mut b, 32));
        assert!(!pool.grow(&mut a, 33), "no room: nothing taken");
        assert_eq!((a.blocks.len(), pool.free_blocks()), (2, 0));
        pool.kv_mut(&b, 1, 31).0[3] = f16::from_f32(2.5);
        assert_eq!(pool.k(&b, 1, 31)[3].to_f32(), 2.5);
        assert_eq!(pool.v(&b, 1, 31)[3].to_f32(), 0.0);
        pool.release(&mut b);
        assert!(pool.grow(&mut a, 64));
        assert_eq!(pool.capacity(), 64);
        assert_eq!(pool.bytes(), 4 * 2 * 2 * 16 * 8 * 2);
    }
}
