//! Containers: files that are not disk images themselves but hold some (an OVA holds the disks
//! of a virtual machine). A container yields, for the disk chosen, a source that reads that disk in
//! place, which the format readers open like any file.

pub(crate) mod ova;
