//! The blkhash construction (blksum >= 0.10.1, `nbdcopy --blkhash`), with SHA-256 and 64 KiB
//! blocks:
//!
//! - the guest content (length `L`) is cut into 64 KiB blocks, the last one possibly short;
//! - each block gets an inner digest `d_i = SHA-256(block_i)`, the short last block hashed at its
//!   real length; a full block of zeros always has the same digest `Z`, so zero and unallocated
//!   ranges take `Z` without being read, and data blocks found all zero skip the hashing;
//! - the result is `SHA-256(d_0 || d_1 || ... || d_{n-1} || LE64(L))`, in lowercase hex.
//!
//! [`StreamHasher`] takes the content as ranges of any size and alignment, from many threads in
//! any order: blocks wholly inside a range are hashed by the thread that brings it, blocks that
//! straddle ranges are assembled from their pieces, and the digests are folded in block order
//! through an [`OrderedFold`] whose window bounds the memory whatever the disk size.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};

use sha2::{Digest, Sha256};

use super::fold::{Fold, OrderedFold};
use crate::copy::is_zero;
use crate::copy::observer::{ItemContent, ItemDone, Observer};
use crate::error::{Error, Result};

/// Block size of the blkhash construction vdisk computes (blksum's default).
pub const BLKHASH_BLOCK_SIZE: u64 = 64 << 10;

const BLOCK: u64 = BLKHASH_BLOCK_SIZE;

/// A block as a buffer length.
const BLOCK_BYTES: usize = 64 << 10;

/// An index into a buffer whose length bounds `v`.
fn at(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// How far (in blocks) a thread may run ahead of the in-order fold: 1 GiB of content, whose
/// digests and zero runs take well under 1 MiB while they wait; more than any work item, so the
/// thread the fold waits for never waits itself.
const WINDOW_BLOCKS: u64 = (1 << 30) / BLOCK;

/// One inner digest.
pub(crate) type BlockDigest = [u8; 32];

/// `Z`: the digest of a full block of zeros.
pub(crate) fn zero_digest() -> &'static BlockDigest {
    static Z: OnceLock<BlockDigest> = OnceLock::new();
    Z.get_or_init(|| Sha256::digest([0u8; BLOCK_BYTES]).into())
}

/// `Z` repeated, so that a run of zero blocks feeds the outer hash in large updates.
fn zero_digests() -> &'static [u8] {
    static ZS: OnceLock<Vec<u8>> = OnceLock::new();
    ZS.get_or_init(|| zero_digest().repeat(128))
}

/// The inner digest of one block (`block.len()` is its real length).
pub(crate) fn block_digest(block: &[u8]) -> BlockDigest {
    if block.len() as u64 == BLOCK && is_zero(block) {
        *zero_digest()
    } else {
        Sha256::digest(block).into()
    }
}

/// The inner digest of a block of `len` zeros.
fn zeros_digest(len: u64) -> BlockDigest {
    if len == BLOCK {
        return *zero_digest();
    }
    let mut h = Sha256::new();
    let zeros = [0u8; 4096];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64);
        h.update(&zeros[..at(n)]);
        left -= n;
    }
    h.finalize().into()
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Consecutive inner digests, as handed to the fold.
pub(crate) enum Run {
    /// These digests, in order.
    Digests(Vec<BlockDigest>),
    /// This many full blocks of zeros.
    Zeros(u64),
}

/// The outer hash.
struct Outer(Sha256);

impl Fold<Run> for Outer {
    fn fold(&mut self, run: Run) {
        match run {
            Run::Digests(digests) => digests.iter().for_each(|d| self.0.update(d)),
            Run::Zeros(mut n) => {
                let zs = zero_digests();
                let per = (zs.len() / 32) as u64;
                while n > 0 {
                    let k = n.min(per);
                    self.0.update(&zs[..at(k * 32)]);
                    n -= k;
                }
            }
        }
    }
}

/// A block whose bytes arrive in pieces from more than one range.
#[derive(Default)]
struct Partial {
    /// Allocated when the first piece of data arrives (pieces of zeros need no buffer).
    buf: Option<Vec<u8>>,
    filled: u64,
}

/// The blkhash of `size` bytes of content handed over as ranges; see the module documentation.
pub(crate) struct StreamHasher {
    size: u64,
    blocks: u64,
    fold: OrderedFold<Run, Outer>,
    partials: Mutex<HashMap<u64, Partial>>,
}

impl StreamHasher {
    /// A hasher for content of `size` bytes.
    pub(crate) fn new(size: u64) -> Self {
        StreamHasher {
            size,
            blocks: size.div_ceil(BLOCK),
            fold: OrderedFold::new(WINDOW_BLOCKS, Outer(Sha256::new())),
            partials: Mutex::new(HashMap::new()),
        }
    }

    /// One past the last byte of block `i`.
    fn block_end(&self, i: u64) -> u64 {
        i.saturating_add(1).saturating_mul(BLOCK).min(self.size)
    }

    /// The content of `start..start + len`: its bytes, or `None` when it reads as zero. Every
    /// byte of the content must be added exactly once; blocks may be split between calls.
    pub(crate) fn add(&self, start: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        let end = start.checked_add(len).filter(|&e| e <= self.size).ok_or_else(|| {
            Error::invalid(format!("internal error: digest range {start:#x}+{len:#x} past {:#x}", self.size))
        })?;
        if data.is_some_and(|d| d.len() as u64 != len) {
            return Err(Error::invalid("internal error: digest range and its bytes differ in length"));
        }
        let bytes = |from: u64, to: u64| data.map(|d| &d[at(from - start)..at(to - start)]);
        let mut completed = Vec::new();
        let mut pos = start;
        // A head that does not start a block, or a range inside one block: a piece.
        if pos < end && (pos % BLOCK != 0 || end < self.block_end(pos / BLOCK)) {
            let upto = end.min(self.block_end(pos / BLOCK));
            self.piece(pos, upto, bytes(pos, upto), &mut completed)?;
            pos = upto;
        }
        // Whole blocks.
        let first = pos / BLOCK;
        let mut digests = Vec::new();
        let mut zeros = 0u64;
        let mut short_zero = None;
        while pos < end && self.block_end(pos / BLOCK) <= end {
            let block_end = self.block_end(pos / BLOCK);
            match bytes(pos, block_end) {
                Some(block) => digests.push(block_digest(block)),
                None if block_end - pos == BLOCK => zeros += 1,
                None => short_zero = Some(zeros_digest(block_end - pos)),
            }
            pos = block_end;
        }
        // A tail that does not end its block: a piece.
        if pos < end {
            self.piece(pos, end, bytes(pos, end), &mut completed)?;
        }
        if !digests.is_empty() {
            let n = digests.len() as u64;
            self.fold.deposit(first, first + n, Run::Digests(digests))?;
        }
        if zeros > 0 {
            self.fold.deposit(first, first + zeros, Run::Zeros(zeros))?;
        }
        if let Some(d) = short_zero {
            self.fold.deposit(first + zeros, first + zeros + 1, Run::Digests(vec![d]))?;
        }
        for (i, d) in completed {
            self.fold.deposit(i, i + 1, Run::Digests(vec![d]))?;
        }
        Ok(())
    }

    /// Add the piece `from..to` (inside one block) and, when it completes its block, its digest
    /// to `completed`.
    fn piece(&self, from: u64, to: u64, data: Option<&[u8]>, completed: &mut Vec<(u64, BlockDigest)>) -> Result<()> {
        let i = from / BLOCK;
        let block_start = i * BLOCK;
        let block_len = self.block_end(i) - block_start;
        let mut partials = self.partials.lock().unwrap_or_else(PoisonError::into_inner);
        let partial = partials.entry(i).or_default();
        if let Some(data) = data {
            let buf = partial.buf.get_or_insert_with(|| vec![0u8; at(block_len)]);
            buf[at(from - block_start)..at(to - block_start)].copy_from_slice(data);
        }
        partial.filled += to - from;
        if partial.filled > block_len {
            return Err(Error::invalid(format!("internal error: block {i} of the digest received twice")));
        }
        if partial.filled == block_len {
            let done = partials.remove(&i).unwrap_or_default();
            drop(partials);
            completed.push((i, done.buf.as_deref().map_or_else(|| zeros_digest(block_len), block_digest)));
        }
        Ok(())
    }

    /// Stop: threads waiting to deposit return an error.
    pub(crate) fn stop(&self) {
        self.fold.stop();
    }

    /// The digest, once every byte was added.
    pub(crate) fn finish(self) -> Result<String> {
        let pieces_left = !self.partials.lock().unwrap_or_else(PoisonError::into_inner).is_empty();
        let (folded, waiting, Outer(mut outer)) = self.fold.into_parts();
        if folded != self.blocks || waiting || pieces_left {
            return Err(Error::invalid(format!(
                "internal error: the digest covers {folded} of {} blocks",
                self.blocks
            )));
        }
        outer.update(self.size.to_le_bytes());
        Ok(hex(&outer.finalize()))
    }
}

/// `convert --checksum`: the digest of what a copy wrote, from each item's bytes.
impl Observer for StreamHasher {
    fn wants_content(&self) -> bool {
        true
    }

    fn item_done(&self, item: &ItemDone<'_>) -> Result<()> {
        match item.content {
            ItemContent::Data(bytes) => self.add(item.start, item.len, Some(bytes)),
            ItemContent::Zero => self.add(item.start, item.len, None),
            ItemContent::Unread => Err(Error::invalid("internal error: the digest was not given an item's bytes")),
        }
    }

    fn abort(&self) {
        self.stop();
    }
}

/// The blkhash of `data` in one piece (tests and small inputs).
#[cfg(test)]
pub(crate) fn blkhash(data: &[u8]) -> String {
    let h = StreamHasher::new(data.len() as u64);
    h.add(0, data.len() as u64, Some(data)).unwrap();
    h.finish().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KIB: usize = 1024;

    /// blkhash by its definition, in the plainest way.
    fn naive(data: &[u8]) -> String {
        let mut outer = Sha256::new();
        for block in data.chunks(BLOCK as usize) {
            outer.update(Sha256::digest(block));
        }
        outer.update((data.len() as u64).to_le_bytes());
        hex(&outer.finalize())
    }

    #[test]
    fn blkhash_test_vectors() {
        // test/blkhash-test.c of the blkhash project (sha256, 64 KiB blocks).
        assert_eq!(blkhash(b""), "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc");
        assert_eq!(blkhash(&[b'A'; 64 * KIB]), "2e3a5f57d5e726ee5de62db1a85ff816f4fa6ea4627807d9a51bdc4c883e165e");
        assert_eq!(blkhash(&[0; 64 * KIB]), "8ab067ab7939a3d4f40cbb118956c07c06aeae2d075d6e0a2ebbb94bd42832af");
        assert_eq!(blkhash(&[b'A'; 32 * KIB]), "9467334d6d7668a2f06898185b5cddc78cdfbd962f50c6bf250101f03a0e54dc");
        assert_eq!(blkhash(&[0; 32 * KIB]), "842d185f0ff348b0d689e184bddc47f69a19032a6934c89b879479f1e86f9d56");
        assert_eq!(blkhash(&[0; 8 * 64 * KIB]), "722ac11a3a81034edf196aa3ee68d1a2e345cd0838b0c78c2ce2fb015d4d817d");
        assert_eq!(blkhash(&[0; 17 * 32 * KIB]), "e623a5702b1feb08fbb3d18e35bbb7ec10146b8cd1bcff811200a3948c78c55c");
        let letters: Vec<u8> = b"ABCDEF".iter().flat_map(|&c| std::iter::repeat_n(c, 32 * KIB)).collect();
        assert_eq!(blkhash(&letters), "4ab1586084326f5beb911621282e9557cd26856105eff7f78cace5986af4738b");
        // The same zero content declared as holes instead of bytes.
        for (len, want) in [
            (64 * KIB, "8ab067ab7939a3d4f40cbb118956c07c06aeae2d075d6e0a2ebbb94bd42832af"),
            (8 * 64 * KIB, "722ac11a3a81034edf196aa3ee68d1a2e345cd0838b0c78c2ce2fb015d4d817d"),
            (17 * 32 * KIB, "e623a5702b1feb08fbb3d18e35bbb7ec10146b8cd1bcff811200a3948c78c55c"),
            (32 * KIB, "842d185f0ff348b0d689e184bddc47f69a19032a6934c89b879479f1e86f9d56"),
            (1 << 30, "c6d6562c3074a2caa0ceea3e1f460f3af678c792ed05e64157eb51e68ae5260d"),
        ] {
            let h = StreamHasher::new(len as u64);
            h.add(0, len as u64, None).unwrap();
            assert_eq!(h.finish().unwrap(), want, "{len} bytes of holes");
        }
    }

    #[test]
    fn nbdcopy_test_vectors() {
        // libnbd copy/copy-blkhash-known.sh (sha256 ones).
        let h = blkhash(b"hello");
        assert!(h.starts_with("337355fe") && h.ends_with("2545e6"), "{h}");
        let mut two = vec![0u8; (1 << 20) + 7];
        two[..5].copy_from_slice(b"hello");
        two[1 << 20..].copy_from_slice(b"goodbye");
        let h = blkhash(&two);
        assert!(h.starts_with("61b8f3a8") && h.ends_with("ded28"), "{h}");
        let h = blkhash(&b"12345678".repeat(131072));
        assert!(h.starts_with("cbb388ed") && h.ends_with("78f8"), "{h}");
    }

    proptest! {
        /// Any split into ranges, added in any order from several threads, with zero ranges
        /// given as holes, gives the digest of the naive definition.
        #[test]
        fn ranges_in_any_order_give_the_naive_digest(
            cuts in prop::collection::vec(0u64..600_000, 0..12),
            zero_mask in any::<u16>(),
            size in 0u64..600_000,
            seed in any::<u64>(),
        ) {
            let mut bounds: Vec<u64> = cuts.into_iter().filter(|&c| c < size).collect();
            bounds.extend([0, size]);
            bounds.sort_unstable();
            bounds.dedup();
            let mut data: Vec<u8> = (0..size).map(|i| (i.wrapping_mul(seed | 1) >> 11) as u8 | 1).collect();
            let mut ranges = Vec::new();
            for (k, w) in bounds.windows(2).enumerate() {
                let zero = zero_mask & (1 << (k % 16)) != 0;
                if zero {
                    data[w[0] as usize..w[1] as usize].fill(0);
                }
                ranges.push((w[0], w[1], zero));
            }
            let want = naive(&data);
            // Reverse-ish order, spread over threads.
            let turn = (seed % (ranges.len().max(1) as u64)) as usize;
            ranges.rotate_left(turn);
            let h = StreamHasher::new(size);
            std::thread::scope(|s| {
                for chunk in ranges.chunks(3) {
                    let (h, data) = (&h, &data);
                    s.spawn(move || {
                        for &(a, b, zero) in chunk {
                            let bytes = (!zero).then(|| &data[a as usize..b as usize]);
                            h.add(a, b - a, bytes).unwrap();
                        }
                    });
                }
            });
            prop_assert_eq!(h.finish().unwrap(), want);
        }
    }

    #[test]
    fn missing_or_repeated_ranges_are_errors() {
        let h = StreamHasher::new(200_000);
        h.add(0, 100_000, None).unwrap();
        assert!(h.finish().is_err());
        let h = StreamHasher::new(200_000);
        h.add(0, 100_000, None).unwrap();
        assert!(h.add(0, 65536, None).is_err());
        h.add(100_000, 60_000, None).unwrap();
        assert!(h.add(131_072, 40_000, None).is_err(), "a block filled past its length");
    }
}
