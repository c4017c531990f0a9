//! CRC-32C (Castagnoli), the checksum of VHDX headers, region tables and log entries.
//!
//! Reflected polynomial 0x82F63B78, initial value and final XOR 0xFFFFFFFF (as in iSCSI and ext4).
//! Table-driven, eight bytes at a time ("slicing by 8"): the log scan checksums up to the whole
//! log, so the byte-at-a-time loop would be the bottleneck of opening a dirty image.

/// The reflected Castagnoli polynomial.
const POLY: u32 = 0x82F6_3B78;

/// `TABLES[0]` is the classic byte table; `TABLES[k][b]` is the CRC of byte `b` followed by `k`
/// zero bytes, which lets eight input bytes be folded in one step.
static TABLES: [[u32; 256]; 8] = build_tables();

const fn build_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i: u32 = 0;
    while i < 256 {
        let mut c = i;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[0][i as usize] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut k = 1;
        while k < 8 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            k += 1;
        }
        i += 1;
    }
    t
}

/// Continue a CRC-32C: `update(update(0, a), b) == crc32c(a ++ b)`.
pub(crate) fn update(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let lo = u32::from_le_bytes([word[0], word[1], word[2], word[3]]) ^ c;
        let [a, b, cc, d] = lo.to_le_bytes();
        c = TABLES[7][usize::from(a)]
            ^ TABLES[6][usize::from(b)]
            ^ TABLES[5][usize::from(cc)]
            ^ TABLES[4][usize::from(d)]
            ^ TABLES[3][usize::from(word[4])]
            ^ TABLES[2][usize::from(word[5])]
            ^ TABLES[1][usize::from(word[6])]
            ^ TABLES[0][usize::from(word[7])];
    }
    for &byte in chunks.remainder() {
        let [low, ..] = c.to_le_bytes();
        c = (c >> 8) ^ TABLES[0][usize::from(low ^ byte)];
    }
    !c
}

/// CRC-32C of `data`.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    update(0, data)
}

/// CRC-32C of a structure whose own checksum field (4 bytes at `field`) counts as zero, as
/// VHDX defines every checksum. `field + 4` must not exceed `data.len()` (else the whole
/// structure is summed as is).
pub(crate) fn crc32c_with_zeroed_field(data: &[u8], field: usize) -> u32 {
    match (data.get(..field), data.get(field.saturating_add(4)..)) {
        (Some(head), Some(tail)) => update(update(update(0, head), &[0; 4]), tail),
        _ => crc32c(data),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Bit-at-a-time reference, straight from the definition.
    fn reference(data: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            }
        }
        !c
    }

    #[test]
    fn check_value_and_known_vectors() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        // RFC 3720 (iSCSI) B.4 test vectors.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
        let dec: Vec<u8> = (0u8..32).rev().collect();
        assert_eq!(crc32c(&dec), 0x113F_DB5C);
    }

    #[test]
    fn sliced_equals_bitwise_and_updates_compose() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0]).collect();
        for len in [0, 1, 7, 8, 9, 63, 64, 65, 999, 1000] {
            assert_eq!(crc32c(&data[..len]), reference(&data[..len]), "len {len}");
        }
        for split in [0, 3, 8, 500, 1000] {
            assert_eq!(update(update(0, &data[..split]), &data[split..]), crc32c(&data));
        }
        let mut zeroed = data.clone();
        zeroed[4..8].fill(0);
        assert_eq!(crc32c_with_zeroed_field(&data, 4), crc32c(&zeroed));
    }
}
