//! What the three sparse extent kinds (hosted sparse, COWD, seSparse) share: a grain directory of
//! optional grain tables held in memory, and the walk that turns grains into extents.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::extent::{Extent, ExtentKind};
use crate::image::{Emitter, Layer};
use crate::io::{read_vec, to_usize, ReadAt};
use crate::limits::{Limits, MetadataBudget};

/// Grain tables loaded in memory: for each directory entry, an optional table of `per_table`
/// raw entries. Tables named by several directory entries are loaded once.
#[derive(Clone, Debug)]
pub(crate) struct GrainTables<E> {
    /// For each directory entry: 0 when it has no table, else the table's slot + 1.
    dir: Vec<u32>,
    /// The tables' entries, slot after slot.
    entries: Vec<E>,
    /// Entries per table.
    per_table: u64,
    /// File offset of each slot's table (for `check`).
    pub(crate) table_offsets: Vec<u64>,
}

impl<E: Copy> GrainTables<E> {
    /// The entry of `grain`, or `None` when its table is absent.
    pub(crate) fn entry(&self, grain: u64) -> Option<E> {
        let t = usize::try_from(grain / self.per_table).ok()?;
        let slot = *self.dir.get(t)?;
        let slot = u64::from(slot.checked_sub(1)?);
        let i = usize::try_from(slot * self.per_table + grain % self.per_table).ok()?;
        self.entries.get(i).copied()
    }

    /// Whether table `t` exists.
    pub(crate) fn has_table(&self, t: u64) -> bool {
        usize::try_from(t).ok().and_then(|t| self.dir.get(t)).is_some_and(|&s| s != 0)
    }

    /// Every (grain index, entry) in tables that exist, in grain order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, E)> + '_ {
        self.dir.iter().enumerate().filter(|(_, &s)| s != 0).flat_map(move |(t, &s)| {
            let start = (u64::from(s) - 1) * self.per_table;
            (0..self.per_table).filter_map(move |k| {
                let e = self.entries.get(usize::try_from(start + k).ok()?)?;
                Some((t as u64 * self.per_table + k, *e))
            })
        })
    }
}

/// The limits and budget tables are loaded under.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mem<'a> {
    pub(crate) limits: &'a Limits,
    pub(crate) budget: &'a MetadataBudget,
}

/// Run `f` with the default limits and a fresh budget: `check` loads tables that an image opened
/// only to be described did not load.
fn with_check_mem<T>(f: impl FnOnce(Mem<'_>) -> T) -> T {
    let limits = Limits::default();
    let budget = MetadataBudget::new(limits.max_metadata_bytes);
    f(Mem { limits: &limits, budget: &budget })
}

/// The tables `check` walks: those loaded at open, or else loaded now by `load` under the default
/// limits (an image opened only to be described has none loaded).
pub(crate) fn tables_for_check<'a, E: Clone>(
    loaded: Option<&'a GrainTables<E>>,
    load: impl FnOnce(Mem<'_>) -> Result<GrainTables<E>>,
) -> Result<Cow<'a, GrainTables<E>>> {
    match loaded {
        Some(t) => Ok(Cow::Borrowed(t)),
        None => with_check_mem(load).map(Cow::Owned),
    }
}

/// How to read one kind of grain table from a file.
pub(crate) struct TableSpec<'a> {
    /// Name of the directory in messages ("grain directory", "redundant grain directory").
    pub(crate) what: &'a str,
    /// Entries per table.
    pub(crate) per_table: u64,
    /// Bytes per entry (4 or 8).
    pub(crate) entry_bytes: u64,
}

/// Load tables for directory entries `dir` (each already resolved to a table byte offset, 0 for none),
/// checking that each table lies inside the file, then decode and validate each entry with
/// `decode(table_offset, index_in_table, raw) -> entry`.
pub(crate) fn load_tables<E: Copy + Default>(
    mem: Mem<'_>,
    src: &dyn ReadAt,
    spec: &TableSpec<'_>,
    dir: &[u64],
    mut decode: impl FnMut(u64, u64, u64) -> Result<E>,
) -> Result<GrainTables<E>> {
    let table_bytes = spec.per_table * spec.entry_bytes;
    let mut slots: HashMap<u64, u32> = HashMap::new();
    let mut out_dir = Vec::new();
    out_dir.try_reserve_exact(dir.len()).map_err(|_| Error::limit(format!("{} does not fit in memory", spec.what)))?;
    let mut table_offsets = Vec::new();
    mem.budget.reserve(spec.what, (dir.len() as u64).saturating_mul(4))?;
    for (i, &off) in dir.iter().enumerate() {
        if off == 0 {
            out_dir.push(0);
            continue;
        }
        let end = off.checked_add(table_bytes).filter(|&e| e <= src.size()).ok_or_else(|| {
            Error::invalid(format!(
                "{} entry {i}: grain table at {off:#x} (+{table_bytes:#x}) lies past the end of the file ({:#x} bytes)",
                spec.what,
                src.size()
            ))
        })?;
        let _ = end;
        let next = u32::try_from(slots.len() + 1).map_err(|_| Error::limit("too many grain tables"))?;
        let slot = *slots.entry(off).or_insert(next);
        if slot == next {
            table_offsets.push(off);
        }
        out_dir.push(slot);
    }
    let total = (table_offsets.len() as u64).saturating_mul(spec.per_table);
    mem.limits.check_table_entries("grain tables", total)?;
    mem.budget.reserve("grain tables", total.saturating_mul(size_of::<E>() as u64))?;
    let mut entries: Vec<E> = Vec::new();
    let n = usize::try_from(total).map_err(|_| Error::limit("grain tables do not fit in memory"))?;
    entries.try_reserve_exact(n).map_err(|_| Error::limit("grain tables do not fit in memory"))?;
    // Read neighbouring tables together (writers lay them out back to back), up to 1 MiB a read.
    let mut order: Vec<usize> = (0..table_offsets.len()).collect();
    order.sort_by_key(|&s| table_offsets[s]);
    entries.resize(n, E::default());
    let mut k = 0;
    while k < order.len() {
        let first = order[k];
        let start = table_offsets[first];
        let mut run = vec![first];
        while let Some(&next) = order.get(k + run.len()) {
            let expect = start + table_bytes * run.len() as u64;
            if table_offsets[next] != expect || (run.len() as u64 + 1) * table_bytes > READ_RUN_BYTES {
                break;
            }
            run.push(next);
        }
        let bytes = read_vec(src, start, table_bytes * run.len() as u64, "grain table")?;
        for (r, &slot) in run.iter().enumerate() {
            let base = r * usize::try_from(table_bytes).unwrap_or(0);
            let toff = table_offsets[slot];
            for idx in 0..spec.per_table {
                let at = base + usize::try_from(idx * spec.entry_bytes).unwrap_or(usize::MAX);
                let raw = match spec.entry_bytes {
                    4 => bytes.get(at..at + 4).map(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
                    _ => bytes
                        .get(at..at + 8)
                        .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])),
                }
                .ok_or_else(|| Error::invalid("internal error: grain table read short"))?;
                let value = decode(toff, idx, raw)?;
                let dst = usize::try_from(slot as u64 * spec.per_table + idx).unwrap_or(usize::MAX);
                if let Some(d) = entries.get_mut(dst) {
                    *d = value;
                }
            }
        }
        k += run.len();
    }
    Ok(GrainTables { dir: out_dir, entries, per_table: spec.per_table, table_offsets })
}

/// Largest single read when loading neighbouring grain tables.
const READ_RUN_BYTES: u64 = 1 << 20;

/// Read a directory of `n` little-endian entries of `entry_bytes` at `offset`, bounded by the
/// file, the table limit and the budget.
pub(crate) fn read_directory(
    mem: Mem<'_>,
    src: &dyn ReadAt,
    offset: u64,
    n: u64,
    entry_bytes: u64,
    what: &str,
) -> Result<Vec<u64>> {
    mem.limits.check_table_entries(what, n)?;
    let bytes = n.checked_mul(entry_bytes).ok_or_else(|| Error::invalid(format!("{what}: size overflows")))?;
    let end = offset.checked_add(bytes).filter(|&e| e <= src.size());
    if end.is_none() {
        return Err(Error::invalid(format!(
            "{what} at {offset:#x} (+{bytes:#x}) lies past the end of the file ({:#x} bytes)",
            src.size()
        )));
    }
    // The raw bytes and the decoded entries are both held for a moment.
    mem.budget.reserve(what, bytes.saturating_add(n.saturating_mul(8)))?;
    let raw = read_vec(src, offset, bytes, what)?;
    let mut out = Vec::new();
    out.try_reserve_exact(to_usize(n, what)?).map_err(|_| Error::limit(format!("{what} does not fit in memory")))?;
    out.extend(raw.chunks_exact(to_usize(entry_bytes, what)?).map(|c| {
        let mut b = [0u8; 8];
        b[..c.len()].copy_from_slice(c);
        u64::from_le_bytes(b)
    }));
    Ok(out)
}

/// One extent kind's view of its grains, for [`map_grains`].
pub(crate) trait GrainLookup {
    /// Grain size in bytes.
    fn grain_size(&self) -> u64;
    /// Bytes covered by one grain table.
    fn table_span(&self) -> u64;
    /// Bytes the tables cover (the extent's own capacity); past it nothing is allocated.
    fn covered(&self) -> u64;
    /// Whether table `t` exists (false: all its grains are unallocated).
    fn has_table(&self, t: u64) -> bool;
    /// What grain `g` holds from `in_grain` bytes into it: `None` when unallocated.
    fn resolve(&self, g: u64, in_grain: u64) -> Result<Option<ExtentKind>>;
}

/// Map `rel..rel + len` of a sparse extent that starts at virtual offset `base`, at most up to the
/// end of the grain table holding `rel`. Unallocated grains fall through to `parent`.
pub(crate) fn map_grains(
    g: &dyn GrainLookup,
    base: u64,
    rel: u64,
    len: u64,
    parent: Option<&Layer>,
    out: &mut Vec<Extent>,
) -> Result<()> {
    let end = rel + len;
    let mut em = Emitter::new(out, parent);
    if rel >= g.covered() {
        em.fall_through(base + rel, len)?;
        return em.flush();
    }
    let span = g.table_span();
    let table = rel / span;
    let stop = end.min(g.covered()).min((table + 1).saturating_mul(span));
    if !g.has_table(table) {
        // Runs of absent tables are one unallocated extent.
        let mut t = table + 1;
        let mut stop = stop;
        while stop < end.min(g.covered()) && !g.has_table(t) {
            stop = end.min(g.covered()).min((t + 1).saturating_mul(span));
            t += 1;
        }
        em.fall_through(base + rel, stop - rel)?;
        return em.flush();
    }
    let gs = g.grain_size();
    let mut pos = rel;
    while pos < stop {
        let grain = pos / gs;
        let gstart = grain * gs;
        let piece_end = stop.min(gstart + gs);
        match g.resolve(grain, pos - gstart)? {
            None => em.fall_through(base + pos, piece_end - pos)?,
            Some(kind) => em.push(Extent::new(base + pos, piece_end - pos, kind))?,
        }
        pos = piece_end;
    }
    em.flush()
}
