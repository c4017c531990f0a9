//! vhdx reader (in progress: opening fails with Unsupported until it lands).

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::extent::{Extent, FileId};
use crate::image::{ImageFormat, OpenContext};
use crate::info::{CheckReport, ImageInfo};
use crate::io::ReadAt;

/// A vhdx image.
#[derive(Debug)]
pub(crate) struct VhdxImage {
    size: u64,
}

impl VhdxImage {
    pub(crate) fn open(
        _ctx: &mut OpenContext<'_>,
        _src: Arc<dyn ReadAt>,
        _file: FileId,
        _path: Option<&Path>,
    ) -> Result<Self> {
        Err(Error::unsupported("vhdx images are not supported yet"))
    }
}

impl ImageFormat for VhdxImage {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, _offset: u64, _len: u64, _out: &mut Vec<Extent>) -> Result<()> {
        Err(Error::unsupported("vhdx"))
    }

    fn describe(&self, _info: &mut ImageInfo) {}

    fn check(&self, _report: &mut CheckReport) -> Result<()> {
        Ok(())
    }
}
