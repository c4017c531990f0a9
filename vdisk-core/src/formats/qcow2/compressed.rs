//! The compressed cluster descriptor of an L2 entry.
//!
//! With `x = 62 - (cluster_bits - 8)`, bits `0..x` hold the host offset of the compressed bytes
//! (not aligned) and bits `x..62` the number of 512-byte sectors they occupy beyond the one
//! holding the offset.

/// The sector unit the stored length is counted in.
const SECTOR: u64 = 512;

/// The host offset of a compressed cluster and the spec's upper bound on its stored length.
pub(super) fn decode(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let shift = 62 - (cluster_bits - 8);
    let offset = entry & ((1u64 << shift) - 1);
    let sectors = ((entry >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    (offset, sectors * SECTOR - (offset % SECTOR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_x() {
        // 64 KiB clusters: x = 54; 3 additional sectors at offset 0x50123.
        let entry = (1 << 62) | (3u64 << 54) | 0x50123;
        assert_eq!(decode(entry, 16), (0x50123, 4 * 512 - 0x123));
        // 512-byte clusters: x = 61, a one-bit sector count.
        assert_eq!(decode((1 << 61) | 0x400, 9), (0x400, 1024));
        // 2 MiB clusters: x = 49.
        assert_eq!(decode((0x1fffu64 << 49) | 0x200, 21), (0x200, 0x2000 * 512));
    }
}
