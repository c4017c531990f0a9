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
