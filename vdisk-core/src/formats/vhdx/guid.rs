//! GUIDs as VHDX stores them: Data1, Data2 and Data3 little-endian, then eight bytes as is.

use std::fmt;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// A GUID in its on-disk byte order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(transparent)]
pub(crate) struct Guid(pub(crate) [u8; 16]);

const _: () = assert!(size_of::<Guid>() == 16);

impl Guid {
    /// The GUID written `{d1-d2-d3-d4[0..2]-d4[2..8]}`.
    pub(crate) const fn new(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5], d4[6], d4[7]])
    }

    /// A random (version 4) GUID, from the standard library's per-process random hash keys,
    /// the clock and a counter: unique, not secret.
    pub(crate) fn random() -> Guid {
        use std::hash::{BuildHasher, Hasher};
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut b = [0u8; 16];
        for half in b.chunks_exact_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
            if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
                h.write_u128(d.as_nanos());
            }
            half.copy_from_slice(&h.finish().to_le_bytes());
        }
        // Version 4 in the high nibble of Data3 (stored little-endian), the RFC 4122 variant.
        b[7] = (b[7] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Guid(b)
    }

    /// True for the all-zero GUID.
    pub(crate) fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Parse the text form, with or without braces, in any case
    /// (`{ff34003b-11ed-4cf8-a166-b2be05e20b80}`).
    pub(crate) fn parse(text: &str) -> Option<Guid> {
        let t = text.trim();
        let t = t.strip_prefix('{').and_then(|t| t.strip_suffix('}')).unwrap_or(t);
        let groups: Vec<&str> = t.split('-').collect();
        let [g1, g2, g3, g4, g5] = groups.as_slice() else { return None };
        if g1.len() != 8 || g2.len() != 4 || g3.len() != 4 || g4.len() != 4 || g5.len() != 12 {
            return None;
        }
        let hex = |s: &str| -> Option<u64> {
            if s.bytes().all(|b| b.is_ascii_hexdigit()) {
                u64::from_str_radix(s, 16).ok()
            } else {
                None
            }
        };
        let d1 = u32::try_from(hex(g1)?).ok()?;
        let d2 = u16::try_from(hex(g2)?).ok()?;
        let d3 = u16::try_from(hex(g3)?).ok()?;
        let tail = (hex(g4)? << 48) | hex(g5)?;
        Some(Guid::new(d1, d2, d3, tail.to_be_bytes()))
    }
}

impl fmt::Display for Guid {
    /// Lowercase, without braces: `ff34003b-11ed-4cf8-a166-b2be05e20b80`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        let d1 = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let d2 = u16::from_le_bytes([b[4], b[5]]);
        let d3 = u16::from_le_bytes([b[6], b[7]]);
        write!(f, "{d1:08x}-{d2:04x}-{d3:04x}-{:02x}{:02x}-", b[8], b[9])?;
        for x in &b[10..] {
            write!(f, "{x:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{self}}}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_in_on_disk_order() {
        // The BAT region GUID as the specification writes it, and its bytes in the file.
        let g = Guid::new(0x2DC2_7766, 0xF623, 0x4200, [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08]);
        assert_eq!(&g.0[..4], &[0x66, 0x77, 0xC2, 0x2D]);
        assert_eq!(g.to_string(), "2dc27766-f623-4200-9d64-115e9bfd4a08");
        assert_eq!(Guid::parse("{2DC27766-F623-4200-9D64-115E9BFD4A08}"), Some(g));
        assert_eq!(Guid::parse("2dc27766-f623-4200-9d64-115e9bfd4a08"), Some(g));
        for bad in [
            "",
            "{}",
            "2dc27766-f623-4200-9d64-115e9bfd4a0",
            "2dc27766-f623-4200-9d64-115e9bfd4a0g",
            "+dc27766-f623-4200-9d64-115e9bfd4a08",
        ] {
            assert_eq!(Guid::parse(bad), None, "{bad}");
        }
        assert!(Guid([0; 16]).is_zero() && !g.is_zero());
    }

    #[test]
    fn random_guids_are_version_4_and_distinct() {
        let a = Guid::random();
        let b = Guid::random();
        assert_ne!(a, b);
        for g in [a, b] {
            let text = g.to_string();
            assert_eq!(&text[14..15], "4", "{text}");
            assert!(matches!(&text[19..20], "8" | "9" | "a" | "b"), "{text}");
        }
    }
}
