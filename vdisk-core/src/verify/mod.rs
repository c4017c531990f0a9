//! Verification: a format-independent digest of the guest content (blkhash), comparing two
//! images (qemu-img compare's semantics), and the journal that makes a conversion resumable.
//!
//! All of it works from the extent maps: zero and unallocated ranges are hashed or compared
//! without being read, and data is read on several threads, as a copy reads it.

pub(crate) mod blkhash;
mod checksum;
mod compare;
mod fold;
pub(crate) mod journal;
mod pool;
pub(crate) mod resume;

pub use blkhash::BLKHASH_BLOCK_SIZE;
pub use checksum::{checksum, Checksum, ChecksumAlgorithm, ChecksumOptions};
pub use compare::{compare, CompareError, CompareOptions, CompareStage, Comparison, Difference};

/// A reusable buffer whose start is page-aligned: the kernel copies into page-aligned
/// destinations markedly faster (measured: a third less system time reading from the page
/// cache than into a plain vector).
#[derive(Default)]
pub(crate) struct PageBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl PageBuf {
    /// Alignment of the start.
    const ALIGN: usize = 4096;

    /// Make the buffer `len` bytes long (contents unspecified) and return it.
    pub(crate) fn resize(&mut self, len: usize) -> &mut [u8] {
        if self.raw.len() < len.saturating_add(Self::ALIGN) {
            self.raw = vec![0u8; len.saturating_add(Self::ALIGN)];
            self.start = self.raw.as_ptr().align_offset(Self::ALIGN).min(Self::ALIGN);
        }
        self.len = len;
        &mut self.raw[self.start..self.start + len]
    }

    /// The buffer as last resized.
    pub(crate) fn get(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}
