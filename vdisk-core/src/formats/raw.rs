//! Raw images: plain files and block devices. Holes (from `SEEK_DATA`/`SEEK_HOLE`) map as zero.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::extent::{Extent, ExtentKind, FileId, Location};
use crate::image::{ImageFormat, OpenContext};
use crate::info::{CheckReport, ImageInfo};
use crate::io::ReadAt;

/// Largest data extent reported in one piece, so that a fully allocated multi-terabyte file
/// still yields extents of bounded size to the copy planner.
const MAX_RAW_EXTENT: u64 = 1 << 30;

/// A raw image.
#[derive(Debug)]
pub(crate) struct RawImage {
    src: Arc<dyn ReadAt>,
    file: FileId,
    size: u64,
}

impl RawImage {
    pub(crate) fn open(_ctx: &mut OpenContext<'_>, src: Arc<dyn ReadAt>, file: FileId) -> Result<Self> {
        let size = src.size();
        Ok(RawImage { src, file, size })
    }
}

impl ImageFormat for RawImage {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let end = offset + len;
        let data = |start: u64, len: u64| {
            Extent::new(
                start,
                len,
                ExtentKind::Data { layer: 0, location: Location::File { file: self.file, offset: start } },
            )
        };
        match self.src.next_data(offset) {
            None => out.push(data(offset, len.min(MAX_RAW_EXTENT))),
            Some(Err(e)) => return Err(Error::io(format!("finding data at {offset:#x}"), e)),
            Some(Ok(None)) => out.push(Extent::new(offset, len, ExtentKind::Zero { layer: 0 })),
            Some(Ok(Some((s, e)))) => {
                if s > offset {
                    out.push(Extent::new(offset, s.min(end) - offset, ExtentKind::Zero { layer: 0 }));
                }
                if s < end {
                    let s = s.max(offset);
                    out.push(data(s, (e.min(end) - s).min(MAX_RAW_EXTENT)));
                }
            }
        }
        Ok(())
    }

    fn describe(&self, _info: &mut ImageInfo) {}

    fn check(&self, _report: &mut CheckReport) -> Result<()> {
        // A raw image has no metadata that could be inconsistent.
        Ok(())
    }
}
