//! Decoder candidates on real data: every compressed cluster of an image (qcow2 zlib/zstd or a
//! streamOptimized VMDK) is read into memory, then each candidate decodes all of them on one
//! core, several rounds; the best round is printed in MB/s of decompressed output.
//!
//!     cargo run --release --manifest-path benches/decoders/Cargo.toml -- IMAGE [ROUNDS]

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use vdisk_core::{Compression, ExtentKind, Image, Location, OpenOptions};

struct Unit {
    stored: Vec<u8>,
    len: usize,
    method: Compression,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("usage: decoder-bench IMAGE [ROUNDS]");
    let rounds: usize = args.get(2).map_or(5, |r| r.parse().unwrap());
    let image = Image::open(path, &OpenOptions::default()).unwrap();
    let file = std::fs::File::open(path).unwrap();
    let size = file.metadata().unwrap().len();
    let mut units = Vec::new();
    for e in image.extents() {
        let e = e.unwrap();
        if let ExtentKind::Data { location: Location::Compressed(u), .. } = e.kind {
            if u.skip != 0 {
                continue;
            }
            let n = u.stored_len.min(size - u.offset) as usize;
            let mut stored = vec![0u8; n];
            file.read_exact_at(&mut stored, u.offset).unwrap();
            units.push(Unit { stored, len: u.unit_len as usize, method: u.method });
        }
    }
    let total: usize = units.iter().map(|u| u.len).sum();
    let method = units.first().map(|u| u.method).expect("no compressed clusters");
    println!("{path}: {} compressed units, {:.1} MiB decompressed ({method:?})", units.len(), total as f64 / 1048576.0);
    let mut out = vec![0u8; units.iter().map(|u| u.len).max().unwrap()];
    let mut bench = |name: &str, f: &mut dyn FnMut(&Unit, &mut [u8])| {
        let mut best = f64::MAX;
        for _ in 0..rounds {
            let t = Instant::now();
            for u in &units {
                f(u, &mut out[..u.len]);
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("  {name:<28} {:>7.0} MB/s", total as f64 / best / 1e6);
    };
    let zlib_header = method == Compression::Zlib;
    match method {
        Compression::Deflate | Compression::Zlib => {
            let mut d = flate2::Decompress::new(zlib_header);
            bench("flate2 (zlib-rs backend)", &mut |u, o| {
                d.reset(zlib_header);
                d.decompress(&u.stored, o, flate2::FlushDecompress::Finish).unwrap();
            });
            let mut state = miniz_oxide::inflate::stream::InflateState::new_boxed(if zlib_header {
                miniz_oxide::DataFormat::Zlib
            } else {
                miniz_oxide::DataFormat::Raw
            });
            bench("miniz_oxide", &mut |u, o| {
                state.reset(if zlib_header { miniz_oxide::DataFormat::Zlib } else { miniz_oxide::DataFormat::Raw });
                miniz_oxide::inflate::stream::inflate(&mut state, &u.stored, o, miniz_oxide::MZFlush::Finish);
            });
            bench("zune-inflate (allocates)", &mut |u, o| {
                let opts = zune_inflate::DeflateOptions::default().set_limit(u.len).set_size_hint(u.len);
                let mut dec = zune_inflate::DeflateDecoder::new_with_options(&u.stored, opts);
                let v = if zlib_header { dec.decode_zlib() } else { dec.decode_deflate() };
                if let Ok(v) = v {
                    let n = v.len().min(o.len());
                    o[..n].copy_from_slice(&v[..n]);
                }
            });
        }
        Compression::Zstd => {
            let mut fd = ruzstd::decoding::FrameDecoder::new();
            bench("ruzstd (streaming)", &mut |u, o| {
                let mut src: &[u8] = &u.stored;
                let mut s = ruzstd::decoding::StreamingDecoder::new_with_decoder(&mut src, &mut fd).unwrap();
                s.read_exact(o).unwrap();
            });
            let mut fd2 = ruzstd::decoding::FrameDecoder::new();
            bench("ruzstd (decode_all)", &mut |u, o| {
                let _ = fd2.decode_all(&u.stored, o);
            });
        }
        _ => {}
    }
}
