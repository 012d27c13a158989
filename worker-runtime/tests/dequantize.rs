//! Every quantized format's bit layout against an independent reading: gguf-py (the `gguf`
//! package, llama.cpp's own Python reference) dequantizes the same random blocks, and every
//! value must equal ours. Random bytes exercise every bit of the packed scales and high bits.
//!
//! Needs `WHALEFLUX_PYTHON`: a Python with `gguf==0.19.0` (`scripts/test.sh` installs it).

use std::path::PathBuf;
use std::process::Command;

use whaleflux_worker::backend::cpu::dequantize_row;
use whaleflux_worker::model::gguf::GgmlType;

fn python() -> PathBuf {
    std::env::var_os("WHALEFLUX_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "WHALEFLUX_PYTHON is not set: point it at a Python with gguf==0.19.0 \
                 (scripts/test.sh makes one)"
            )
        })
}

/// Where each format keeps its f16 factors (random bits there could be NaN or huge).
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        other => panic!("no layout for {other:?}"),
    }
}

fn random_blocks(ty: GgmlType, nb: usize, seed: u64) -> Vec<u8> {
    let bb = ty.block_bytes() as usize;
    let mut x = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
    let mut out: Vec<u8> = (0..nb * bb)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    for b in 0..nb {
        for (i, &at) in f16_fields(ty).iter().enumerate() {
            let v = half::f16::from_f32(0.001 + 0.0007 * ((b * 3 + i) % 7) as f32);
            out[b * bb + at..b * bb + at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    out
}

#[test]
fn every_format_dequantizes_like_gguf_py() {
    let types = [
        ("Q4_0", GgmlType::Q4_0),
        ("Q4_1", GgmlType::Q4_1),
        ("Q5_0", GgmlType::Q5_0),
        ("Q5_1", GgmlType::Q5_1),
        ("Q8_0", GgmlType::Q8_0),
        ("Q2_K", GgmlType::Q2_K),
        ("Q3_K", GgmlType::Q3_K),
        ("Q4_K", GgmlType::Q4_K),
        ("Q5_K", GgmlType::Q5_K),
        ("Q6_K", GgmlType::Q6_K),
    ];
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dequantize");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let nb = 16;
    let mut ours = Vec::new();
    for (i, (name, ty)) in types.iter().enumerate() {
        let bytes = random_blocks(*ty, nb, 100 + i as u64);
        std::fs::write(dir.join(format!("{name}.bin")), &bytes).expect("write");
        let n = nb * ty.block_elems() as usize;
        let mut out = vec![0f32; n];
        dequantize_row(*ty, &bytes, &mut out);
        ours.push(out);
    }
    let script = r#"
import sys
import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
folder = sys.argv[1]
for name in sys.argv[2:]:
    data = np.fromfile(f"{folder}/{name}.bin", dtype=np.uint8)
    dequantize(data, GGMLQuantizationType[name]).astype(np.float32).tofile(f"{folder}/{name}.f32")
"#;
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(&dir)
        .args(types.iter().map(|(n, _)| *n))
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "gguf-py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for ((name, _), ours) in types.iter().zip(&ours) {
        let raw = std::fs::read(dir.join(format!("{name}.f32"))).expect("gguf-py output");
        let theirs: Vec<f32> = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(theirs.len(), ours.len(), "{name}: value count");
        for (e, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                "{name}: value {e} (block {}, offset {}) is {a}, gguf-py {b}",
                e / 256,
                e % 256
            );
        }
        println!("{name}: {} values equal gguf-py's", ours.len());
    }
}
