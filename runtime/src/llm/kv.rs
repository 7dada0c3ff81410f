//! The paged KV cache of a copy: a fixed pool of f16 blocks that sequences take as they grow.

use half::{f16, slice::HalfBitsSliceExt};

/// Blocks of `block_tokens` positions, each holding K and V of every layer for those positions.
pub struct KvPool {
    block_tokens: usize,
    layers: usize,
    kv_dim: usize,
    /// f16 values as their bits: a zeroed `u16` vector is allocated without touching it.
    data: Vec<u16>,
    free: Vec<u32>,
    blocks: usize,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KvPool({} of {} blocks free)",
            self.free.len(),
            self.blocks
        )
    }
}

/// Where one sequence's positions live in the pool.
#[derive(Debug, Default)]
pub struct BlockTable {
    pub blocks: Vec<u32>,
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
            blocks,
        }
    }

    /// Bytes the pool holds.
    pub fn bytes(&self) -> u64 {
        (self.data.len() * 2) as u64
    }

    /// Positions the whole pool holds.
    pub fn capacity(&self) -> usize {
        self.blocks * self.block_tokens
    }

    pub fn total_blocks(&self) -> usize {
        self.blocks
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks a sequence of `tokens` positions needs.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens)
    }

    /// Grow `table` to hold `tokens` positions; `false` (and nothing taken) when the pool has
    /// too few free blocks.
    pub fn grow(&mut self, table: &mut BlockTable, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.blocks.len());
        if need > self.free.len() {
            return false;
        }
        let at = self.free.len() - need;
        table.blocks.extend(self.free.drain(at..));
        true
    }

    /// Give all of `table`'s blocks back.
    pub fn release(&mut self, table: &mut BlockTable) {
        self.free.append(&mut table.blocks);
    }

    fn base(&self, table: &BlockTable, layer: usize, pos: usize) -> usize {
        let block = table.blocks[pos / self.block_tokens] as usize;
        let slot = pos % self.block_tokens;
        ((block * self.layers + layer) * 2 * self.block_tokens + slot) * self.kv_dim
    }

    /// K of `pos` in `layer` (V is `block_tokens` rows further).
    pub fn k(&self, table: &BlockTable, layer: usize, pos: usize) -> &[f16] {
        let at = self.base(table, layer, pos);
        self.data[at..at + self.kv_dim].reinterpret_cast()
    }

    pub fn v(&self, table: &BlockTable, layer: usize, pos: usize) -> &[f16] {
        let at = self.base(table, layer, pos) + self.block_tokens * self.kv_dim;
        self.data[at..at + self.kv_dim].reinterpret_cast()
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
