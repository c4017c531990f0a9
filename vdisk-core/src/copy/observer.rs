//! Hooks into a running copy, for what watches it without taking part in it: a digest of what
//! was written, a resume journal. The engine knows nothing of either; it asks observers whether
//! a work item is already done, tells them when each one is, and ticks them on the calling thread.

use crate::error::Result;

/// What a finished work item held.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ItemContent<'a> {
    /// The item's bytes, as written (or, for a skipped item, as read from the source).
    Data(&'a [u8]),
    /// The item reads as zero.
    Zero,
    /// A skipped data item whose bytes nobody asked for: not read.
    Unread,
}

/// One finished work item.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ItemDone<'a> {
    /// First byte of the virtual disk the item covers.
    pub(crate) start: u64,
    /// Bytes it covers.
    pub(crate) len: u64,
    /// What it held.
    pub(crate) content: ItemContent<'a>,
    /// An observer said it was already done: nothing was written.
    pub(crate) skipped: bool,
    /// Bytes written or zeroed on the target for this item (0 when skipped, or when a zero item
    /// needed no work).
    pub(crate) work_bytes: u64,
}

/// Watches a copy. Methods other than `tick` are called from the copy threads, in any order.
pub(crate) trait Observer: Sync {
    /// True when `start..start + len` needs no writing (a resumed copy already did it). The item
    /// is still reported to [`Observer::item_done`], with its bytes when any observer wants them.
    fn skip(&self, _start: u64, _len: u64) -> bool {
        false
    }

    /// True when [`Observer::item_done`] needs the bytes of every data item, skipped ones too.
    fn wants_content(&self) -> bool {
        false
    }

    /// Called once per work item, after its writes have returned (or it was skipped).
    fn item_done(&self, item: &ItemDone<'_>) -> Result<()>;

    /// Called on the calling thread between progress reports (about every 50 ms); an error
    /// stops the copy.
    fn tick(&self) -> Result<()> {
        Ok(())
    }

    /// Called when the copy is stopping because of an error, so that an observer that makes
    /// copy threads wait can release them.
    fn abort(&self) {}
}
