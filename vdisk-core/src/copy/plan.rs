//! Extents to work items: a pure function of the extent stream and the item size.
//!
//! A data item never crosses a boundary that is a multiple of the item size, so a worker's
//! buffer is bounded by the item size, and a compressed unit (aligned, and no larger than an
//! item) is never split between two items and decompressed twice. Zero ranges become their own
//! items, cut into bounded chunks so progress and cancellation stay responsive.

use crate::error::Result;
use crate::extent::Extent;

/// Zero ranges shorter than this that fall between data in one window are copied as part of the
/// data item (as zeros) rather than split off, to keep writes large.
pub(crate) const ABSORB_ZERO_BYTES: u64 = 64 << 10;

/// Largest zero item: zeroing is fast on most targets but a cloud volume may write every byte;
/// 256 MiB keeps each item well under a second of work for progress and cancellation.
pub(crate) const MAX_ZERO_ITEM: u64 = 256 << 20;

/// One unit of work for a copy thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum WorkItem {
    /// Read `pieces` (consecutive, covering `start..start + len`) and write them.
    Data {
        /// First byte.
        start: u64,
        /// Length, at most the item size.
        len: u64,
        /// The extents (clipped) covering the range; some may be zero.
        pieces: Vec<Extent>,
    },
    /// Make `start..start + len` read as zero.
    Zero {
        /// First byte.
        start: u64,
        /// Length.
        len: u64,
    },
}

#[cfg(test)]
impl WorkItem {
    /// Bytes of the virtual disk this item covers.
    pub(crate) fn len(&self) -> u64 {
        match self {
            WorkItem::Data { len, .. } | WorkItem::Zero { len, .. } => *len,
        }
    }
}

/// Turns a stream of extents into work items; see the module documentation.
#[derive(Debug)]
pub(crate) struct Planner<I> {
    extents: I,
    item_size: u64,
    /// The rest of an extent not yet planned.
    carry: Option<Extent>,
    /// The data item being built: start and pieces.
    open: Option<(u64, Vec<Extent>)>,
    /// Items ready to hand out.
    ready: std::collections::VecDeque<WorkItem>,
    failed: bool,
}

impl<I: Iterator<Item = Result<Extent>>> Planner<I> {
    /// Plan `extents` into items of at most `item_size` bytes (a power of two is best).
    pub(crate) fn new(extents: I, item_size: u64) -> Self {
        Planner {
            extents,
            item_size: item_size.max(4096),
            carry: None,
            open: None,
            ready: Default::default(),
            failed: false,
        }
    }

    fn window_end(&self, pos: u64) -> u64 {
        (pos / self.item_size).saturating_add(1).saturating_mul(self.item_size)
    }

    fn flush(&mut self) {
        if let Some((start, pieces)) = self.open.take() {
            let end = pieces.last().map_or(start, Extent::end);
            self.ready.push_back(WorkItem::Data { start, len: end - start, pieces });
        }
    }

    /// Plan (part of) one extent; returns what is left of it.
    fn step(&mut self, e: Extent) -> Option<Extent> {
        let window_end = self.window_end(e.start);
        let in_open_window = match &self.open {
            Some((start, pieces)) => {
                self.window_end(*start) == window_end && pieces.last().map_or(*start, Extent::end) == e.start
            }
            None => false,
        };
        if e.kind.is_data() {
            let piece = e.head(window_end - e.start);
            if !in_open_window {
                self.flush();
                self.open = Some((piece.start, Vec::new()));
            }
            if let Some((_, pieces)) = &mut self.open {
                pieces.push(piece);
            }
            return (piece.end() < e.end()).then(|| e.tail_from(piece.end()));
        }
        // A zero range: absorb a short one between data in the same window, else its own item.
        if in_open_window && e.len < ABSORB_ZERO_BYTES && e.end() < window_end {
            if let Some((_, pieces)) = &mut self.open {
                pieces.push(e);
            }
            return None;
        }
        self.flush();
        let chunk = e.len.min(MAX_ZERO_ITEM);
        self.ready.push_back(WorkItem::Zero { start: e.start, len: chunk });
        (chunk < e.len).then(|| e.tail_from(e.start + chunk))
    }
}

impl<I: Iterator<Item = Result<Extent>>> Iterator for Planner<I> {
    type Item = Result<WorkItem>;

    fn next(&mut self) -> Option<Result<WorkItem>> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Some(Ok(item));
            }
            if self.failed {
                return None;
            }
            let next = match self.carry.take() {
                Some(e) => e,
                None => match self.extents.next() {
                    Some(Ok(e)) => e,
                    Some(Err(err)) => {
                        self.failed = true;
                        return Some(Err(err));
                    }
                    None => {
                        self.failed = true;
                        self.flush();
                        continue;
                    }
                },
            };
            if next.len == 0 {
                continue;
            }
            self.carry = self.step(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::{ExtentKind, FileId, Location};
    use proptest::prelude::*;

    fn is_data(e: &Extent) -> bool {
        matches!(e.kind, ExtentKind::Data { .. })
    }

    fn data(start: u64, len: u64) -> Extent {
        Extent::new(
            start,
            len,
            ExtentKind::Data { layer: 0, location: Location::File { file: FileId(0), offset: start } },
        )
    }

    fn zero(start: u64, len: u64) -> Extent {
        Extent::new(start, len, ExtentKind::Zero { layer: 0 })
    }

    fn plan(extents: Vec<Extent>, item: u64) -> Vec<WorkItem> {
        Planner::new(extents.into_iter().map(Ok), item).map(|r| r.unwrap()).collect()
    }

    #[test]
    fn splits_data_at_window_boundaries_and_absorbs_small_zero_gaps() {
        let items = plan(vec![data(0, 10000), zero(10000, 4096), data(14096, 20000), zero(34096, 1 << 30)], 16384);
        assert_eq!(
            items,
            vec![
                WorkItem::Data {
                    start: 0,
                    len: 16384,
                    pieces: vec![data(0, 10000), zero(10000, 4096), data(14096, 2288)]
                },
                WorkItem::Data { start: 16384, len: 16384, pieces: vec![data(16384, 16384)] },
                WorkItem::Data { start: 32768, len: 1328, pieces: vec![data(32768, 1328)] },
                WorkItem::Zero { start: 34096, len: MAX_ZERO_ITEM },
                WorkItem::Zero { start: 34096 + MAX_ZERO_ITEM, len: MAX_ZERO_ITEM },
                WorkItem::Zero { start: 34096 + 2 * MAX_ZERO_ITEM, len: MAX_ZERO_ITEM },
                WorkItem::Zero { start: 34096 + 3 * MAX_ZERO_ITEM, len: MAX_ZERO_ITEM },
            ]
        );
    }

    proptest! {
        /// Items cover the extents exactly, in order, and a data item never crosses a window.
        #[test]
        fn items_tile_the_extents(lens in prop::collection::vec((1u64..200_000, any::<bool>()), 1..60),
                                  shift in 12u32..20) {
            let item = 1u64 << shift;
            let mut extents = Vec::new();
            let mut pos = 0;
            for (len, is_data) in lens {
                extents.push(if is_data { data(pos, len) } else { zero(pos, len) });
                pos += len;
            }
            let items = plan(extents.clone(), item);
            let mut at = 0;
            for it in &items {
                match it {
                    WorkItem::Data { start, len, pieces } => {
                        prop_assert_eq!(*start, at);
                        prop_assert!(*len <= item);
                        prop_assert_eq!(start / item, (start + len - 1) / item);
                        let mut p = *start;
                        for piece in pieces {
                            prop_assert_eq!(piece.start, p);
                            let original = extents.iter().find(|e| e.start <= p && p < e.end()).unwrap();
                            prop_assert_eq!(original.clip(piece.start, piece.end()).unwrap(), *piece);
                            p = piece.end();
                        }
                        prop_assert_eq!(p, start + len);
                        prop_assert!(pieces.iter().any(is_data));
                    }
                    WorkItem::Zero { start, len } => {
                        prop_assert_eq!(*start, at);
                        prop_assert!(*len <= MAX_ZERO_ITEM);
                        prop_assert!(extents.iter().all(|e| e.clip(*start, start + len).is_none_or(|c| !is_data(&c))));
                    }
                }
                at += it.len();
            }
            prop_assert_eq!(at, pos);
        }
    }
}
