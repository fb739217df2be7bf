//! Owns the KV cache's blocks: a budget of `num_blocks`, handed out to sequences and reused
//! once freed. Blocks are reference-counted so that sequences can share them (n > 1 samples,
//! prefix caching).

use std::collections::VecDeque;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    #[error("out of KV cache blocks: {needed} needed, {free} free of {total}")]
    OutOfBlocks {
        needed: usize,
        free: usize,
        total: usize,
    },
}

#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    ref_counts: Vec<u32>,
    free: VecDeque<u32>,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            ref_counts: vec![0; num_blocks],
            free: (0..num_blocks as u32).collect(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Whether `table` could grow to hold `tokens` positions right now.
    pub fn can_grow(&self, table: &[u32], tokens: usize) -> bool {
        self.blocks_for(tokens).saturating_sub(table.len()) <= self.free.len()
    }

    /// Appends blocks to `table` until it holds `tokens` positions; all or nothing.
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> Result<(), BlockError> {
        let needed = self.blocks_for(tokens).saturating_sub(table.len());
        if needed > self.free.len() {
            return Err(BlockError::OutOfBlocks {
                needed,
                free: self.free.len(),
                total: self.num_blocks(),
            });
        }
        for _ in 0..needed {
            if let Some(b) = self.free.pop_front() {
                self.ref_counts[b as usize] = 1;
                table.push(b);
            }
        }
        Ok(())
    }

    /// Another holder for a block already in use (shared prefix).
    pub fn share(&mut self, block: u32) {
        if let Some(rc) = self.ref_counts.get_mut(block as usize) {
            *rc += 1;
        }
    }

    /// Drops one reference to each block; blocks nobody holds go back to the free list.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        for b in table.drain(..) {
            if let Some(rc) = self.ref_counts.get_mut(b as usize) {
                if *rc > 0 {
                    *rc -= 1;
                    if *rc == 0 {
                        self.free.push_back(b);
                    }
                }
            }
        }
    }

    /// Shrinks `table` to hold only `tokens` positions, releasing the blocks past them.
    pub fn truncate(&mut self, table: &mut Vec<u32>, tokens: usize) {
        let keep = self.blocks_for(tokens).min(table.len());
        let mut tail = table.split_off(keep);
        self.release(&mut tail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_release_and_reuse() {
        let mut bm = BlockManager::new(4, 16);
        let mut a = Vec::new();
        bm.grow(&mut a, 33).unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(bm.num_free(), 1);
        let mut b = Vec::new();
        assert_eq!(
            bm.grow(&mut b, 40),
            Err(BlockError::OutOfBlocks {
                needed: 3,
                free: 1,
                total: 4
            })
        );
        assert!(b.is_empty(), "a failed grow takes nothing");
        bm.truncate(&mut a, 16);
        assert_eq!(a.len(), 1);
        bm.grow(&mut b, 40).unwrap();
        assert_eq!(bm.num_free(), 0);
        bm.release(&mut a);
        bm.release(&mut b);
        assert_eq!(bm.num_free(), 4);
    }

    #[test]
    fn shared_blocks_free_with_last_holder() {
        let mut bm = BlockManager::new(2, 4);
        let mut a = Vec::new();
        bm.grow(&mut a, 4).unwrap();
        bm.share(a[0]);
        let mut b = a.clone();
        bm.release(&mut a);
        assert_eq!(bm.num_free(), 1);
        bm.release(&mut b);
        assert_eq!(bm.num_free(), 2);
    }
}
