//! GGUF reader: well-formed files of every value type round-trip; corrupt files fail with the
//! key or tensor and the offset at fault, never a panic.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use whaleflux_worker::model::gguf::{GgmlType, Gguf, Value};

/// The system allocator, counting per thread the bytes allocated and not yet freed and their
/// peak, so a test can say how much memory a parse took.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

// SAFETY: every call goes to `System` unchanged; the counting touches only thread-locals with
// const initialisers (no allocation, no destructor).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            track(l.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            track(l.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        track(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            track(new as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// `f`'s result, the most memory it held at once on this thread beyond what was held before,
/// and how long it took.
fn measured<T>(f: impl FnOnce() -> T) -> (T, usize, Duration) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let t0 = Instant::now();
    let r = f();
    let took = t0.elapsed();
    (r, (PEAK.with(Cell::get) - base).max(0) as usize, took)
}

/// A tiny GGUF writer for tests.
#[derive(Default)]
struct Writer {
    version: u32,
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
    data: Vec<u8>,
    alignment: usize,
}

fn s(buf: &mut Vec<u8>, v: &str) {
    buf.extend((v.len() as u64).to_le_bytes());
    buf.extend(v.as_bytes());
}

impl Writer {
    fn new(version: u32) -> Self {
        Self {
            version,
            alignment: 32,
            ..Default::default()
        }
    }

    fn kv(&mut self, key: &str, ty: u32, payload: &[u8]) -> &mut Self {
        s(&mut self.kv, key);
        self.kv.extend(ty.to_le_bytes());
        self.kv.extend(payload);
        self.n_kv += 1;
        self
    }

    fn kv_str(&mut self, key: &str, v: &str) -> &mut Self {
        let mut p = Vec::new();
        s(&mut p, v);
        self.kv(key, 8, &p)
    }

    /// Add a tensor with raw dims/type/offset; `data` is appended at the aligned offset.
    fn tensor_raw(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        s(&mut self.infos, name);
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(ty.to_le_bytes());
        self.infos.extend(offset.to_le_bytes());
        self.n_tensors += 1;
        self
    }

    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, bytes: &[u8]) -> &mut Self {
        while !self.data.len().is_multiple_of(self.alignment) {
            self.data.push(0);
        }
        let off = self.data.len() as u64;
        self.data.extend(bytes);
        self.tensor_raw(name, dims, ty, off)
    }

    fn build(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(self.version.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.infos);
        while !out.len().is_multiple_of(self.alignment) {
            out.push(0);
        }
        out.extend(&self.data);
        out
    }
}

fn err(bytes: Vec<u8>) -> String {
    match Gguf::from_bytes(bytes) {
        Ok(_) => panic!("corrupt file was accepted"),
        Err(e) => e.to_string(),
    }
}

fn good() -> Writer {
    let mut w = Writer::new(3);
    w.kv_str("general.architecture", "llama");
    let f: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    w.tensor("a.weight", &[4, 2], 0, &f);
    w
}

#[test]
fn reads_every_value_type_and_tensors() {
    for version in [2, 3] {
        let mut w = Writer::new(version);
        w.kv("u8", 0, &[7])
            .kv("i8", 1, &[0xFF])
            .kv("u16", 2, &300u16.to_le_bytes())
            .kv("i16", 3, &(-300i16).to_le_bytes())
            .kv("u32", 4, &70000u32.to_le_bytes())
            .kv("i32", 5, &(-70000i32).to_le_bytes())
            .kv("f32", 6, &1.5f32.to_le_bytes())
            .kv("bool", 7, &[1])
            .kv_str("str", "héllo")
            .kv("u64", 10, &(1u64 << 40).to_le_bytes())
            .kv("i64", 11, &(-5i64).to_le_bytes())
            .kv("f64", 12, &2.25f64.to_le_bytes());
        let mut arr = Vec::new();
        arr.extend(8u32.to_le_bytes());
        arr.extend(2u64.to_le_bytes());
        s(&mut arr, "a");
        s(&mut arr, "bc");
        w.kv("arr", 9, &arr);
        let mut nested = Vec::new();
        nested.extend(9u32.to_le_bytes());
        nested.extend(1u64.to_le_bytes());
        nested.extend(5u32.to_le_bytes());
        nested.extend(2u64.to_le_bytes());
        nested.extend(1i32.to_le_bytes());
        nested.extend(2i32.to_le_bytes());
        w.kv("nested", 9, &nested);
        let q8: Vec<u8> = std::iter::repeat_n(0u8, 34 * 2).collect();
        w.tensor("f32", &[4, 2], 0, &[0u8; 32]);
        w.tensor("f16", &[8], 1, &[0u8; 16]);
        w.tensor("bf16", &[8], 30, &[0u8; 16]);
        w.tensor("q8", &[32, 2], 8, &q8);
        w.tensor("q40", &[64], 2, &[0u8; 36]);
        w.tensor("q41", &[32, 1, 1, 1], 3, &[0u8; 20]);
        let g = Gguf::from_bytes(w.build()).expect("valid file");
        assert_eq!(g.version, version);
        assert_eq!(g.get("u8"), Some(&Value::U8(7)));
        assert_eq!(g.get("i8"), Some(&Value::I8(-1)));
        assert_eq!(g.get("u16"), Some(&Value::U16(300)));
        assert_eq!(g.get("i16"), Some(&Value::I16(-300)));
        assert_eq!(g.get("u32"), Some(&Value::U32(70000)));
        assert_eq!(g.get("i32"), Some(&Value::I32(-70000)));
        assert_eq!(g.get("f32"), Some(&Value::F32(1.5)));
        assert_eq!(g.get("bool"), Some(&Value::Bool(true)));
        assert_eq!(g.get_str("str").expect("str"), "héllo");
        assert_eq!(g.get_u64("u64").expect("u64"), 1 << 40);
        assert_eq!(g.get("i64"), Some(&Value::I64(-5)));
        assert_eq!(g.get("f64"), Some(&Value::F64(2.25)));
        assert_eq!(
            g.get("arr"),
            Some(&Value::Array(vec![
                Value::String("a".into()),
                Value::String("bc".into())
            ]))
        );
        assert_eq!(
            g.get("nested"),
            Some(&Value::Array(vec![Value::Array(vec![
                Value::I32(1),
                Value::I32(2)
            ])]))
        );
        let types: Vec<GgmlType> = g.tensors().iter().map(|t| t.ty).collect();
        use GgmlType::*;
        assert_eq!(types, vec![F32, F16, BF16, Q8_0, Q4_0, Q4_1]);
        let q8 = g.tensor("q8").expect("q8");
        assert_eq!((q8.rows(), q8.cols(), q8.size), (2, 32, 68));
        assert_eq!(q8.offset % 32, 0);
        assert_eq!(g.tensor_data(q8).len(), 68);
    }
}

#[test]
fn honours_custom_alignment() {
    let mut w = Writer::new(3);
    w.alignment = 64;
    w.kv("general.alignment", 4, &64u32.to_le_bytes());
    w.tensor("x", &[4], 0, &[1u8; 16]);
    w.tensor("y", &[4], 0, &[2u8; 16]);
    let g = Gguf::from_bytes(w.build()).expect("valid");
    assert_eq!(g.alignment, 64);
    let y = g.tensor("y").expect("y");
    assert_eq!(y.offset % 64, 0);
    assert_eq!(g.tensor_data(y), &[2u8; 16]);
}

#[test]
fn rejects_bad_magic_and_version() {
    let mut b = good().build();
    b[0] = b'X';
    assert!(err(b).contains("bad magic"));
    let mut w = good();
    w.version = 1;
    assert!(err(w.build()).contains("unsupported GGUF version 1"));
}

#[test]
fn truncated_anywhere_is_an_error_not_a_panic() {
    let b = good().build();
    let data_len = 32;
    for cut in 0..b.len() - data_len {
        let e = err(b[..cut].to_vec());
        assert!(
            e.contains("truncated")
                || e.contains("past the end")
                || e.contains("more than the file can hold"),
            "cut {cut}: {e}"
        );
    }
    let e = err(b[..b.len() - 1].to_vec());
    assert!(
        e.contains("tensor \"a.weight\"") && e.contains("past the end"),
        "{e}"
    );
}

#[test]
fn huge_counts_are_rejected_before_allocating() {
    let mut b = good().build();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = err(b);
    assert!(e.contains("tensor count at offset 8"), "{e}");
    let mut b = good().build();
    b[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let e = err(b);
    assert!(e.contains("metadata count at offset 16"), "{e}");
    // A string length far beyond the file.
    let mut w = Writer::new(3);
    let mut p = Vec::new();
    p.extend((1u64 << 62).to_le_bytes());
    w.kv("k", 8, &p);
    let e = err(w.build());
    assert!(e.contains("string length") && e.contains("\"k\""), "{e}");
    // An array count far beyond the file.
    let mut w = Writer::new(3);
    let mut p = Vec::new();
    p.extend(4u32.to_le_bytes());
    p.extend((1u64 << 61).to_le_bytes());
    w.kv("big.array", 9, &p);
    let e = err(w.build());
    assert!(
        e.contains("array length of metadata key \"big.array\" at offset"),
        "{e}"
    );
}

#[test]
fn bad_value_types_and_duplicates() {
    let mut w = Writer::new(3);
    w.kv("weird", 99, &[0; 8]);
    let e = err(w.build());
    assert!(
        e.contains("\"weird\"") && e.contains("unknown value type 99"),
        "{e}"
    );
    let mut w = Writer::new(3);
    w.kv("b", 7, &[2]);
    assert!(err(w.build()).contains("bool value 2"));
    let mut w = Writer::new(3);
    w.kv_str("dup", "a").kv_str("dup", "b");
    assert!(err(w.build()).contains("duplicate metadata key \"dup\""));
    let mut w = Writer::new(3);
    w.kv("s", 8, &[2, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFE]);
    assert!(err(w.build()).contains("not valid UTF-8"));
    let mut w = Writer::new(3);
    w.kv("general.alignment", 4, &3u32.to_le_bytes());
    assert!(err(w.build()).contains("general.alignment"));
}

#[test]
fn bad_tensor_descriptors() {
    let mut w = good();
    w.tensor_raw("b", &[4], 0, 1 << 40);
    let e = err(w.build());
    assert!(
        e.contains("tensor \"b\"") && e.contains("past the end"),
        "{e}"
    );
    let mut w = good();
    w.tensor_raw("c", &[4], 0, 3);
    assert!(err(w.build()).contains("not a multiple of the alignment"));
    let mut w = good();
    w.tensor_raw("ovf", &[u64::MAX / 2, 4], 0, 0);
    let e = err(w.build());
    assert!(
        e.contains("tensor \"ovf\"") && e.contains("overflows"),
        "{e}"
    );
    let mut w = good();
    w.tensor_raw("dims", &[1, 1, 1, 1, 1], 0, 0);
    assert!(err(w.build()).contains("5 dimensions"));
    let mut w = good();
    w.tensor_raw("zero", &[0], 0, 0);
    assert!(err(w.build()).contains("zero dimension"));
    let mut w = good();
    w.tensor_raw("q", &[33], 8, 0);
    assert!(err(w.build()).contains("not a multiple of the Q8_0 block size"));
    let mut w = good();
    w.tensor_raw("k", &[256], 20, 0);
    assert_eq!(
        err(w.build()),
        "unsupported tensor type IQ4_NL in tensor \"k\""
    );
    let mut w = good();
    w.tensor_raw("a.weight", &[4], 0, 0);
    assert!(err(w.build()).contains("duplicate tensor \"a.weight\""));
}

#[test]
fn garbage_never_panics() {
    let base = good().build();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..3000 {
        let mut b = base.clone();
        for _ in 0..4 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x as usize) % b.len();
            b[i] = (x >> 32) as u8;
        }
        let _ = Gguf::from_bytes(b);
    }
}

/// A byte-level BPE vocabulary of three tokens and one merge, with pre-tokenizer `pre`.
fn vocab_file(pre: &str) -> Gguf {
    let mut w = good();
    let strs = |items: &[&str]| {
        let mut b = Vec::new();
        b.extend(8u32.to_le_bytes());
        b.extend((items.len() as u64).to_le_bytes());
        for it in items {
            s(&mut b, it);
        }
        b
    };
    w.kv_str("tokenizer.ggml.model", "gpt2")
        .kv_str("tokenizer.ggml.pre", pre)
        .kv("tokenizer.ggml.tokens", 9, &strs(&["a", "b", "ab"]))
        .kv("tokenizer.ggml.merges", 9, &strs(&["a b"]));
    Gguf::from_bytes(w.build()).expect("valid")
}

#[test]
fn a_pre_tokenizer_we_do_not_know_is_refused_by_name() {
    use whaleflux_worker::model::tokenizer::ModelTokenizer;
    let tk = ModelTokenizer::from_gguf(&vocab_file("qwen2")).expect("qwen2 is known");
    assert_eq!(tk.encode("ab").expect("encode"), vec![2]);
    let e = ModelTokenizer::from_gguf(&vocab_file("deepseek-llm"))
        .err()
        .expect("an unknown pre-tokenizer is an error")
        .to_string();
    assert!(
        e.contains("tokenizer.ggml.pre") && e.contains("\"deepseek-llm\" is not supported"),
        "{e}"
    );
}

/// A metadata array claiming 2^40 items is refused at its length, naming the key and the
/// offset, before anything is reserved for it; so is one of strings or of arrays.
#[test]
fn a_metadata_array_of_2_pow_40_items_fails_at_once_without_allocating() {
    for (ity, what) in [(0u32, "u8"), (8, "string"), (9, "array")] {
        let mut w = good();
        let mut p = Vec::new();
        p.extend(ity.to_le_bytes());
        p.extend((1u64 << 40).to_le_bytes());
        p.extend([0u8; 64]);
        w.kv_str("general.name", "x").kv("huge", 9, &p);
        let bytes = w.build();
        let len = bytes.len();
        let (r, peak, took) = measured(|| Gguf::from_bytes(bytes));
        let e = r.expect_err("a 2^40-item array cannot fit").to_string();
        assert!(
            e.contains("array length of metadata key \"huge\" at offset")
                && e.contains("1099511627776, more than the file can hold"),
            "{what}: {e}"
        );
        assert!(
            peak < len + 16 * 1024,
            "{what}: parsing a {len}-byte file held {peak} bytes at once"
        );
        assert!(took < Duration::from_secs(1), "{what}: took {took:?}");
    }
}

/// A count the rest of the file could only just back (each item at its smallest encoding)
/// whose items are in fact larger reserves no more than the file's size before the items run
/// out: a count alone never sizes an allocation. An array of strings, then the metadata count.
#[test]
fn a_count_cannot_reserve_more_than_the_file() {
    let item = 1 << 20;
    let mut w = Writer::new(3);
    let mut p = Vec::new();
    p.extend(8u32.to_le_bytes());
    // Every string takes at least its 8-byte length: the count passes the bound.
    p.extend(((item as u64 + 8) / 8).to_le_bytes());
    s(&mut p, &"x".repeat(item));
    w.kv("tokenizer.ggml.tokens", 9, &p);
    let bytes = w.build();
    let len = bytes.len();
    let (r, peak, _) = measured(|| Gguf::from_bytes(bytes));
    let e = r.expect_err("the second item is missing").to_string();
    assert!(
        e.contains("tokenizer.ggml.tokens") && e.contains("truncated"),
        "{e}"
    );
    // The one string read (`len`) plus the items reserved (at most `len`).
    assert!(
        peak <= 2 * len + 16 * 1024,
        "array: parsing a {len}-byte file held {peak} bytes at once"
    );

    // One metadata entry (a long string) where the header claims as many as could fit.
    let mut w = Writer::new(3);
    w.kv_str("general.name", &"x".repeat(item));
    let mut bytes = w.build();
    let len = bytes.len();
    bytes[16..24].copy_from_slice(&((len as u64 - 24) / 13).to_le_bytes());
    let (r, peak, _) = measured(|| Gguf::from_bytes(bytes));
    let e = r.expect_err("the second entry is missing").to_string();
    // What follows the entry is the file's zero padding, then its end.
    assert!(e.contains("truncated") && e.contains("metadata"), "{e}");
    assert!(
        peak <= 2 * len + 16 * 1024,
        "metadata: parsing a {len}-byte file held {peak} bytes at once"
    );
}
