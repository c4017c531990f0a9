#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vdisk_fuzz::format(data, vdisk_core::Format::Ova);
});
