//! Encrypted images are never read, but `describe` reports them as `qemu-img info` does, with
//! the LUKS header's parameters (no key is needed for that).

use serde_json::{json, Map, Value};
use zerocopy::big_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

use super::error::invalid;
use super::header::{until_nul, Encryption};
use crate::error::Result;
use crate::io::ReadAt;

/// `LUKS\xba\xbe`, the LUKS header magic.
const LUKS_MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// The only LUKS version qemu writes into qcow2 images.
const LUKS_VERSION: u16 = 1;
/// Key slots in a LUKS1 header.
const KEY_SLOTS: usize = 8;
/// A key slot's `active` value when it holds a key.
const SLOT_ACTIVE: u32 = 0x00ac_71f3;
/// LUKS counts offsets in 512-byte sectors.
const SECTOR: u64 = 512;

/// One LUKS1 key slot (big-endian, 48 bytes).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawKeySlot {
    /// 0x00AC71F3 when active, 0x0000DEAD when not.
    active: U32,
    /// PBKDF2 iterations.
    iterations: U32,
    /// PBKDF2 salt.
    salt: [u8; 32],
    /// Start of the key material, in sectors.
    key_material_offset: U32,
    /// Anti-forensic stripes.
    stripes: U32,
}
const _: () = assert!(size_of::<RawKeySlot>() == 48);

/// The LUKS1 header (big-endian, 592 bytes).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawLuksHeader {
    /// `LUKS\xba\xbe`.
    magic: [u8; 6],
    /// 1.
    version: U16,
    /// Cipher name ("aes", "serpent", ...).
    cipher_name: [u8; 32],
    /// Cipher mode and IV generator ("xts-plain64", "cbc-essiv:sha256", ...).
    cipher_mode: [u8; 32],
    /// Hash for PBKDF2 and the anti-forensic splitter.
    hash_spec: [u8; 32],
    /// Start of the encrypted payload, in sectors.
    payload_offset: U32,
    /// Master key length in bytes.
    key_bytes: U32,
    /// Master key digest.
    mk_digest: [u8; 20],
    /// Master key digest salt.
    mk_digest_salt: [u8; 32],
    /// Master key digest iterations.
    mk_digest_iter: U32,
    /// Volume UUID as text.
    uuid: [u8; 40],
    /// The key slots.
    slots: [RawKeySlot; KEY_SLOTS],
}
const _: () = assert!(size_of::<RawLuksHeader>() == 592);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(until_nul(b)).trim().to_ascii_lowercase()
}

/// `format-specific.data.encrypt` as qemu-img prints it.
pub(super) fn describe(src: &dyn ReadAt, encryption: Encryption) -> Result<Option<Value>> {
    let (offset, length) = match encryption {
        Encryption::None => return Ok(None),
        Encryption::Aes => return Ok(Some(json!({ "format": "aes" }))),
        Encryption::Luks { offset, length } => (offset, length),
    };
    let what = "LUKS header";
    if length < size_of::<RawLuksHeader>() as u64 {
        return Err(invalid(what, offset, format!("the header area of {length} bytes is too small")));
    }
    let mut buf = [0u8; size_of::<RawLuksHeader>()];
    crate::io::read_exact(src, &mut buf, offset, what)?;
    let h = RawLuksHeader::read_from_bytes(&buf[..]).map_err(|_| invalid(what, offset, "too short"))?;
    if h.magic != LUKS_MAGIC {
        return Err(invalid(what, offset, "bad magic"));
    }
    if h.version.get() != LUKS_VERSION {
        return Err(invalid(what, offset, format!("unsupported LUKS version {}", h.version.get())));
    }
    let cipher = text(&h.cipher_name);
    let mode_spec = text(&h.cipher_mode);
    let mut parts = mode_spec.splitn(2, '-');
    let mode = parts.next().unwrap_or_default().to_string();
    let ivgen = parts.next().unwrap_or_default();
    let (ivgen_alg, ivgen_hash) = match ivgen.split_once(':') {
        Some((alg, hash)) => (alg.to_string(), Some(hash.to_string())),
        None => (ivgen.to_string(), None),
    };
    // XTS uses two keys of half the master key each.
    let key_bits = u64::from(h.key_bytes.get()) * 8 / if mode == "xts" { 2 } else { 1 };
    let mut slots = Vec::new();
    for slot in &h.slots {
        let key_offset = u64::from(slot.key_material_offset.get()) * SECTOR;
        slots.push(if slot.active.get() == SLOT_ACTIVE {
            json!({ "active": true, "iters": slot.iterations.get(), "key-offset": key_offset, "stripes": slot.stripes.get() })
        } else {
            json!({ "active": false, "key-offset": key_offset })
        });
    }
    let mut m = Map::new();
    m.insert("ivgen-alg".into(), json!(ivgen_alg));
    m.insert("detached-header".into(), json!(false));
    m.insert("hash-alg".into(), json!(text(&h.hash_spec)));
    m.insert("cipher-alg".into(), json!(format!("{cipher}-{key_bits}")));
    m.insert("uuid".into(), json!(text(&h.uuid)));
    if let Some(hash) = ivgen_hash {
        m.insert("ivgen-hash-alg".into(), json!(hash));
    }
    m.insert("format".into(), json!("luks"));
    m.insert("cipher-mode".into(), json!(mode));
    m.insert("slots".into(), Value::Array(slots));
    m.insert("payload-offset".into(), json!(u64::from(h.payload_offset.get()) * SECTOR));
    m.insert("master-key-iters".into(), json!(h.mk_digest_iter.get()));
    Ok(Some(Value::Object(m)))
}
