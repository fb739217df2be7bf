//! Owns the KV cache's blocks: a budget of `num_blocks`, handed out to sequences and reused
//! once freed.
//!
//! Blocks are reference-counted so sequences can share them (the `n` samples of one prompt, and
//! prefix caching). With prefix caching, every full block is keyed by a hash of its tokens and
//! of everything before them; a block nobody holds any more keeps its contents and its key
//! until it is needed for something else (least recently released first), so a later request
//! with the same prefix picks it up instead of recomputing it.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    #[error("out of KV cache blocks: {needed} needed, {free} free of {total}")]
    OutOfBlocks {
        needed: usize,
        free: usize,
        total: usize,
    },
}

/// Key of a full block: its tokens and, through `parent`, every token before them.
pub fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[derive(Debug, Default, Clone)]
struct CachedKey {
    hash: u64,
    /// The block's tokens, to tell a hash collision from a hit.
    tokens: Vec<u32>,
}

#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    prefix_caching: bool,
    ref_counts: Vec<u32>,
    /// Per block: its prefix-cache key while registered.
    keys: Vec<Option<CachedKey>>,
    by_hash: HashMap<u64, u32>,
    /// Free blocks holding nothing worth keeping.
    plain: Vec<u32>,
    /// Free blocks still holding a cached prefix, by release time (oldest evicted first).
    evictable: BTreeMap<u64, u32>,
    released_at: Vec<u64>,
    clock: u64,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        Self {
            block_size,
            prefix_caching,
            ref_counts: vec![0; num_blocks],
            keys: vec![None; num_blocks],
            by_hash: HashMap::new(),
            // Popped from the back: hand out low block ids first.
            plain: (0..num_blocks as u32).rev().collect(),
            evictable: BTreeMap::new(),
            released_at: vec![0; num_blocks],
            clock: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks that can be handed out now (cached-but-unused ones included).
    pub fn num_free(&self) -> usize {
        self.plain.len() + self.evictable.len()
    }

    /// Fraction of blocks held by sequences.
    pub fn usage(&self) -> f64 {
        if self.num_blocks() == 0 {
            return 0.0;
        }
        1.0 - self.num_free() as f64 / self.num_blocks() as f64
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Whether `table` could grow to hold `tokens` positions right now.
    pub fn can_grow(&self, table: &[u32], tokens: usize) -> bool {
        self.blocks_for(tokens).saturating_sub(table.len()) <= self.num_free()
    }

    /// Appends blocks to `table` until it holds `tokens` positions; all or nothing.
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> Result<(), BlockError> {
        let needed = self.blocks_for(tokens).saturating_sub(table.len());
        if needed > self.num_free() {
            return Err(BlockError::OutOfBlocks {
                needed,
                free: self.num_free(),
                total: self.num_blocks(),
            });
        }
        for _ in 0..needed {
            if let Some(b) = self.take_free() {
                self.ref_counts[b as usize] = 1;
                table.push(b);
            }
        }
        Ok(())
    }

    fn take_free(&mut self) -> Option<u32> {
        if let Some(b) = self.plain.pop() {
            return Some(b);
        }
        // Evict the least recently released cached block.
        let (_, b) = self.evictable.pop_first()?;
        self.unregister(b);
        Some(b)
    }

    fn unregister(&mut self, block: u32) {
        if let Some(key) = self.keys[block as usize].take() {
            if self.by_hash.get(&key.hash) == Some(&block) {
                self.by_hash.remove(&key.hash);
            }
        }
    }

    /// Another holder for a block already in use (a forked sample).
    pub fn share(&mut self, block: u32) {
        if let Some(rc) = self.ref_counts.get_mut(block as usize) {
            *rc += 1;
        }
    }

    /// Drops one reference to each block; blocks nobody holds become free (and, if they hold
    /// a registered prefix, stay findable until evicted).
    pub fn release(&mut self, table: &mut Vec<u32>) {
        // Release the tail first so that, under eviction, a prefix's later blocks go before
        // its earlier ones (which more requests share).
        for b in table.drain(..).rev() {
            let i = b as usize;
            let Some(rc) = self.ref_counts.get_mut(i) else {
                continue;
            };
            if *rc == 0 {
                continue;
            }
            *rc -= 1;
            if *rc > 0 {
                continue;
            }
            if self.keys[i].is_some() {
                self.clock += 1;
                self.released_at[i] = self.clock;
                self.evictable.insert(self.clock, b);
            } else {
                self.plain.push(b);
            }
        }
    }

    /// Records that `block` now holds the full block keyed by `hash` (its tokens given), so
    /// later sequences with the same prefix can reuse it.
    pub fn register(&mut self, block: u32, hash: u64, tokens: &[u32]) {
        if !self.prefix_caching || self.by_hash.contains_key(&hash) {
            return;
        }
        let i = block as usize;
        if i >= self.keys.len() || self.keys[i].is_some() {
            return;
        }
        self.keys[i] = Some(CachedKey {
            hash,
            tokens: tokens.to_vec(),
        });
        self.by_hash.insert(hash, block);
    }

    /// Looks up the cached block for `hash` holding exactly `tokens`, taking a reference to it.
    pub fn acquire_cached(&mut self, hash: u64, tokens: &[u32]) -> Option<u32> {
        if !self.prefix_caching {
            return None;
        }
        let &b = self.by_hash.get(&hash)?;
        let i = b as usize;
        if self.keys[i].as_ref().map(|k| k.tokens.as_slice()) != Some(tokens) {
            return None;
        }
        if self.ref_counts[i] == 0 {
            self.evictable.remove(&self.released_at[i]);
        }
        self.ref_counts[i] += 1;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_release_and_reuse() {
        let mut bm = BlockManager::new(4, 16, false);
        let mut a = Vec::new();
        bm.grow(&mut a, 33).unwrap();
        assert_eq!(a, vec![0, 1, 2]);
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
        bm.release(&mut a);
        bm.grow(&mut b, 40).unwrap();
        assert_eq!(bm.num_free(), 1);
        bm.release(&mut b);
        assert_eq!(bm.num_free(), 4);
    }

    #[test]
    fn shared_blocks_free_with_last_holder() {
        let mut bm = BlockManager::new(2, 4, false);
        let mut a = Vec::new();
        bm.grow(&mut a, 4).unwrap();
        bm.share(a[0]);
        let mut b = a.clone();
        bm.release(&mut a);
        assert_eq!(bm.num_free(), 1);
        bm.release(&mut b);
        assert_eq!(bm.num_free(), 2);
    }

    #[test]
    fn cached_blocks_are_found_and_evicted_lru() {
        let mut bm = BlockManager::new(3, 2, true);
        let mut a = Vec::new();
        bm.grow(&mut a, 4).unwrap();
        let h0 = block_hash(None, &[1, 2]);
        let h1 = block_hash(Some(h0), &[3, 4]);
        bm.register(a[0], h0, &[1, 2]);
        bm.register(a[1], h1, &[3, 4]);
        // Hit while still held: shared.
        let hit = bm.acquire_cached(h0, &[1, 2]).unwrap();
        assert_eq!(hit, a[0]);
        assert_eq!(
            bm.acquire_cached(h0, &[9, 9]),
            None,
            "collision is not a hit"
        );
        let mut b = vec![hit];
        bm.release(&mut a);
        bm.release(&mut b);
        assert_eq!(bm.num_free(), 3);
        // Released but still cached: found again.
        let again = bm.acquire_cached(h1, &[3, 4]).unwrap();
        assert_eq!(bm.num_free(), 2);
        let mut c = vec![again];
        // Needing two more blocks uses the plain one, then evicts the cached h0.
        bm.grow(&mut c, 6).unwrap();
        assert_eq!(bm.acquire_cached(h0, &[1, 2]), None);
        bm.release(&mut c);
        assert_eq!(bm.num_free(), 3);
    }

    #[test]
    fn no_prefix_cache_never_hits() {
        let mut bm = BlockManager::new(2, 2, false);
        let mut a = Vec::new();
        bm.grow(&mut a, 2).unwrap();
        let h = block_hash(None, &[1, 2]);
        bm.register(a[0], h, &[1, 2]);
        assert_eq!(bm.acquire_cached(h, &[1, 2]), None);
    }
}
