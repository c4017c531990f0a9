//! vhd reader (in progress: opening fails with Unsupported until it lands).

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::extent::{Extent, FileId};
use crate::image::{ImageFormat, OpenContext};
use crate::info::{CheckReport, ImageInfo};
use crate::io::ReadAt;

/// A vhd image.
#[derive(Debug)]
pub(crate) struct VhdImage {
    size: u64,
}

impl VhdImage {
    pub(crate) fn open(
        _ctx: &mut OpenContext<'_>,
        _src: Arc<dyn ReadAt>,
        _file: FileId,
        _path: Option<&Path>,
    ) -> Result<Self> {
        Err(Error::unsupported("vhd images are not supported yet"))
    }
}

impl ImageFormat for VhdImage {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, _offset: u64, _len: u64, _out: &mut Vec<Extent>) -> Result<()> {
        Err(Error::unsupported("vhd"))
    }

    fn describe(&self, _info: &mut ImageInfo) {}

    fn check(&self, _report: &mut CheckReport) -> Result<()> {
        Ok(())
    }
}
