//! The format readers. Each is a leaf: nothing outside its folder knows its structures; the rest
//! of the crate sees it through [`crate::image::ImageFormat`] and [`crate::extent::Extent`].

pub(crate) mod qcow2;
pub(crate) mod raw;
pub(crate) mod vdi;
pub(crate) mod vhd;
pub(crate) mod vhdx;
pub(crate) mod vmdk;
