//! Resource limits that bound what an untrusted image can make vdisk do.
//!
//! Every table a reader keeps in memory is counted against [`Limits::max_metadata_bytes`] through a
//! [`MetadataBudget`]; every limit error names the limit and how to raise it.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Default metadata budget: 1 GiB holds the L1/L2, grain or BAT tables of a 64 TiB image with
/// 64 KiB clusters (about 128 MiB of L2) several times over, yet stops a forged header from
/// making vdisk allocate tens of gigabytes.
pub const DEFAULT_MAX_METADATA_BYTES: u64 = 1 << 30;

/// Default cap on the entries of any one table: 2^28 entries covers a 16 PiB qcow2 L1 at 64 KiB
/// clusters and the BAT of a 64 TiB VHDX with 1 MiB blocks.
pub const DEFAULT_MAX_TABLE_ENTRIES: u64 = 1 << 28;

/// Default chain depth: real backing chains and snapshot trees are a handful of layers deep;
/// 64 leaves room for long-lived snapshot chains and still stops a runaway chain early.
pub const DEFAULT_MAX_CHAIN_DEPTH: u32 = 64;

/// Default largest virtual size: 256 TiB is four times VHDX's 64 TiB maximum and beyond any block
/// volume a cloud provisions, while keeping every offset computation far from `u64` overflow.
pub const DEFAULT_MAX_VIRTUAL_SIZE: u64 = 256 << 40;

/// Default largest compressed unit (qcow2 cluster, VMDK grain) and largest block a reader may
/// hold in memory at once: qcow2 clusters reach 2 MiB; anything bigger is hostile.
pub const DEFAULT_MAX_UNIT_BYTES: u64 = 2 << 20;

/// Limits on what opening and reading an image may consume.
///
/// ```
/// let mut limits = vdisk_core::Limits::default();
/// limits.max_chain_depth = 4;
/// assert!(limits.max_virtual_size >= 64 << 40);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Bytes of metadata (tables, descriptors, logs) all layers together may hold in memory.
    pub max_metadata_bytes: u64,
    /// Entries in any one table (L1, refcount table, grain directory, BAT, snapshot table).
    pub max_table_entries: u64,
    /// Images in a chain (the image itself counts as one), across backing files and parents.
    pub max_chain_depth: u32,
    /// Largest virtual disk size accepted.
    pub max_virtual_size: u64,
    /// Largest compressed cluster or grain, and largest single block, held in memory.
    pub max_unit_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_metadata_bytes: DEFAULT_MAX_METADATA_BYTES,
            max_table_entries: DEFAULT_MAX_TABLE_ENTRIES,
            max_chain_depth: DEFAULT_MAX_CHAIN_DEPTH,
            max_virtual_size: DEFAULT_MAX_VIRTUAL_SIZE,
            max_unit_bytes: DEFAULT_MAX_UNIT_BYTES,
        }
    }
}

impl Limits {
    /// Refuse a table of `entries` entries named `what` beyond [`Limits::max_table_entries`].
    pub fn check_table_entries(&self, what: &str, entries: u64) -> Result<()> {
        if entries > self.max_table_entries {
            return Err(Error::limit(format!(
                "{what} has {entries} entries, more than the limit of {} (raise max_table_entries / --max-table-entries)",
                self.max_table_entries
            )));
        }
        Ok(())
    }

    /// Refuse a virtual size beyond [`Limits::max_virtual_size`].
    pub fn check_virtual_size(&self, size: u64) -> Result<()> {
        if size > self.max_virtual_size {
            return Err(Error::limit(format!(
                "virtual size {size} is larger than the limit of {} bytes (raise max_virtual_size / --max-virtual-size)",
                self.max_virtual_size
            )));
        }
        Ok(())
    }

    /// Refuse a compressed unit or block of `bytes` bytes named `what` beyond [`Limits::max_unit_bytes`].
    pub fn check_unit(&self, what: &str, bytes: u64) -> Result<()> {
        if bytes > self.max_unit_bytes {
            return Err(Error::limit(format!(
                "{what} of {bytes} bytes is larger than the limit of {} (raise max_unit_bytes / --max-unit-bytes)",
                self.max_unit_bytes
            )));
        }
        Ok(())
    }
}

/// A running count of metadata bytes held, shared by every layer of one open image.
#[derive(Debug)]
pub struct MetadataBudget {
    limit: u64,
    used: AtomicU64,
}

impl MetadataBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        MetadataBudget { limit, used: AtomicU64::new(0) }
    }

    /// Account for `bytes` more bytes of metadata named `what`, or fail with a limit error.
    /// Call this before allocating.
    pub fn reserve(&self, what: &str, bytes: u64) -> Result<()> {
        let mut current = self.used.load(Ordering::Relaxed);
        loop {
            let next = current.checked_add(bytes).filter(|&n| n <= self.limit).ok_or_else(|| {
                Error::limit(format!(
                    "{what} needs {bytes} bytes of metadata, beyond the limit of {} bytes (raise max_metadata_bytes / --max-metadata-bytes)",
                    self.limit
                ))
            })?;
            match self.used.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(seen) => current = seen,
            }
        }
    }

    /// Bytes reserved so far.
    #[cfg(test)]
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn budget_refuses_past_its_limit() {
        let b = MetadataBudget::new(100);
        b.reserve("a", 60).unwrap();
        let e = b.reserve("L2 table", 41).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::LimitExceeded);
        assert!(e.to_string().contains("max_metadata_bytes"), "{e}");
        b.reserve("b", 40).unwrap();
        assert_eq!(b.used(), 100);
        assert!(b.reserve("c", u64::MAX).is_err());
    }
}
