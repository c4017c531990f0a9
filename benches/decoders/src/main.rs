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
    // The reference output of every unit, to check each candidate decodes correctly.
    let reference: Vec<Vec<u8>> = units
        .iter()
        .map(|u| {
            let mut o = vec![0u8; u.len];
            match u.method {
                Compression::Zstd => {
                    let mut src: &[u8] = &u.stored;
                    let mut s = ruzstd::decoding::StreamingDecoder::new(&mut src).unwrap();
                    s.read_exact(&mut o).unwrap();
                }
                m => {
                    let mut d = flate2::Decompress::new(m == Compression::Zlib);
                    d.decompress(&u.stored, &mut o, flate2::FlushDecompress::Finish).unwrap();
                }
            }
            o
        })
        .collect();
    let mut bench = |name: &str, f: &mut dyn FnMut(&Unit, &mut [u8])| {
        let mut wrong = 0;
        for (u, r) in units.iter().zip(&reference) {
            let mut o = vec![0xa5u8; u.len];
            f(u, &mut o);
            wrong += usize::from(o != *r);
        }
        if wrong > 0 {
            println!("  {name:<28} WRONG OUTPUT for {wrong} units");
            return;
        }
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
            // Trailing bytes after the frame (qcow2 pads to sectors) make these report an error
            // after the frame is fully decoded; the timing covers the whole frame either way.
            let mut sz = structured_zstd::decoding::FrameDecoder::new();
            bench("structured-zstd (decode_all)", &mut |u, o| {
                let _ = sz.decode_all(&u.stored, o);
            });
            let mut sz2 = structured_zstd::decoding::FrameDecoder::new();
            bench("structured-zstd (streaming)", &mut |u, o| {
                let mut src: &[u8] = &u.stored;
                let mut s =
                    structured_zstd::decoding::StreamingDecoder::new_with_decoder(&mut src, &mut sz2).unwrap();
                std::io::Read::read_exact(&mut s, o).unwrap();
            });
            let mut v = Vec::with_capacity(1 << 21);
            bench("rusty_zstd (allocates)", &mut |u, o| {
                v.clear();
                let _ = rusty_zstd::decompress_into(&mut v, &u.stored);
                let n = v.len().min(o.len());
                o[..n].copy_from_slice(&v[..n]);
            });
            let mut w = Vec::with_capacity(1 << 21);
            bench("zrip (allocates)", &mut |u, o| {
                w.clear();
                let _ = zrip::decompress_into(&u.stored, &mut w);
                let n = w.len().min(o.len());
                o[..n].copy_from_slice(&w[..n]);
            });
        }
        _ => {}
    }
}
