//! What the fuzz targets share: a GGUF writer, a tiny llama model described by fuzzer input
//! ([`ModelSpec`], structure-aware through `arbitrary`), and the whole load path a worker runs
//! on a GGUF file ([`check_load`]), which must end in a value or a typed error, never a panic.

use std::sync::{Arc, LazyLock, OnceLock};

use arbitrary::Arbitrary;
use whaleflux_worker::backend::Backend;
use whaleflux_worker::backend::cpu::CpuBackend;
use whaleflux_worker::engine::{KvCache, LlamaModel, SeqInput};
use whaleflux_worker::model::chat::{ChatTemplate, Message};
use whaleflux_worker::model::config::LlamaConfig;
use whaleflux_worker::model::gguf::Gguf;
use whaleflux_worker::model::tokenizer::ModelTokenizer;
use whaleflux_worker::shard::{self, LoadOptions, ShardSpec};

/// GGUF metadata value types.
pub mod ty {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// Largest tensor data the writer emits (a descriptor asking for more gets no data, so the
/// reader sees a tensor that ends past the file).
const MAX_TENSOR_BYTES: u64 = 1 << 20;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// One encoded metadata value: its type tag and payload.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub ty: u32,
    pub payload: Vec<u8>,
}

impl Encoded {
    pub fn u32(v: u32) -> Self {
        Self {
            ty: ty::U32,
            payload: v.to_le_bytes().to_vec(),
        }
    }
    pub fn f32(v: f32) -> Self {
        Self {
            ty: ty::F32,
            payload: v.to_le_bytes().to_vec(),
        }
    }
    pub fn bool(v: bool) -> Self {
        Self {
            ty: ty::BOOL,
            payload: vec![u8::from(v)],
        }
    }
    pub fn str(v: &str) -> Self {
        let mut payload = Vec::new();
        put_str(&mut payload, v);
        Self {
            ty: ty::STRING,
            payload,
        }
    }
    pub fn strs<S: AsRef<str>>(items: &[S]) -> Self {
        let mut payload = ty::STRING.to_le_bytes().to_vec();
        payload.extend((items.len() as u64).to_le_bytes());
        for s in items {
            put_str(&mut payload, s.as_ref());
        }
        Self {
            ty: ty::ARRAY,
            payload,
        }
    }
    pub fn i32s(items: &[i32]) -> Self {
        let mut payload = ty::I32.to_le_bytes().to_vec();
        payload.extend((items.len() as u64).to_le_bytes());
        for v in items {
            payload.extend(v.to_le_bytes());
        }
        Self {
            ty: ty::ARRAY,
            payload,
        }
    }
    pub fn f32s(items: &[f32]) -> Self {
        let mut payload = ty::F32.to_le_bytes().to_vec();
        payload.extend((items.len() as u64).to_le_bytes());
        for v in items {
            payload.extend(v.to_le_bytes());
        }
        Self {
            ty: ty::ARRAY,
            payload,
        }
    }
}

/// One tensor as the writer will lay it out.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub name: String,
    /// ggml dims: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    /// ggml type id.
    pub ty: u32,
    pub data: Vec<u8>,
}

/// A GGUF v3 file under construction.
#[derive(Debug, Clone, Default)]
pub struct Writer {
    pub kv: Vec<(String, Encoded)>,
    pub tensors: Vec<Tensor>,
}

/// (block elements, block bytes) of the ggml types the engine supports.
pub fn ggml_block(ty: u32) -> Option<(u64, u64)> {
    Some(match ty {
        0 => (1, 4),
        1 | 30 => (1, 2),
        2 => (32, 18),
        3 => (32, 20),
        6 => (32, 22),
        7 => (32, 24),
        8 => (32, 34),
        10 => (256, 84),
        11 => (256, 110),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        _ => return None,
    })
}

/// The supported ggml type ids, for picking one by index.
pub const GGML_TYPES: [u32; 13] = [0, 1, 30, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14];

/// Deterministic weights: small f32 values, or bytes for other encodings with every f16
/// scale a small finite number (so a model that loads computes finite logits).
pub fn tensor_data(dims: &[u64], ty: u32, seed: u64) -> Vec<u8> {
    let elems = dims
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .unwrap_or(u64::MAX);
    let Some((be, bb)) = ggml_block(ty) else {
        return Vec::new();
    };
    let bytes = (elems / be).saturating_mul(bb);
    if bytes > MAX_TENSOR_BYTES {
        return Vec::new();
    }
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    match ty {
        0 => (0..elems)
            .flat_map(|_| (((next() % 2001) as f32 - 1000.0) / 4000.0).to_le_bytes())
            .collect(),
        1 | 30 => (0..elems)
            .flat_map(|_| {
                let v = ((next() % 2001) as f32 - 1000.0) / 4000.0;
                if ty == 1 {
                    half::f16::from_f32(v).to_le_bytes()
                } else {
                    half::bf16::from_f32(v).to_le_bytes()
                }
            })
            .collect(),
        _ => {
            // Every quantized block layout here starts (or, for Q6_K, ends) with f16 scales;
            // bytes drawn below 0x3C keep any f16 built from them finite and small.
            (0..bytes).map(|_| (next() % 0x3C) as u8).collect()
        }
    }
}

impl Writer {
    /// Set (or replace) a metadata key.
    pub fn set(&mut self, key: &str, v: Encoded) -> &mut Self {
        match self.kv.iter_mut().find(|(k, _)| k == key) {
            Some((_, old)) => *old = v,
            None => self.kv.push((key.to_string(), v)),
        }
        self
    }

    /// Add a tensor of `dims` and ggml type `ty` with deterministic data.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: u32) -> &mut Self {
        let seed = self.tensors.len() as u64 + 1;
        self.tensors.push(Tensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            ty,
            data: tensor_data(dims, ty, seed),
        });
        self
    }

    /// The file: header, metadata, tensor infos, then each tensor's data at an aligned offset.
    pub fn build(&self) -> Vec<u8> {
        const ALIGN: usize = 32;
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut out, k);
            out.extend(v.ty.to_le_bytes());
            out.extend(&v.payload);
        }
        let mut data = Vec::new();
        for t in &self.tensors {
            while !data.len().is_multiple_of(ALIGN) {
                data.push(0);
            }
            put_str(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.ty.to_le_bytes());
            out.extend((data.len() as u64).to_le_bytes());
            data.extend(&t.data);
        }
        while !out.len().is_multiple_of(ALIGN) {
            out.push(0);
        }
        out.extend(data);
        out
    }
}

/// GPT-2's byte-to-printable-character table (byte-level BPE vocabularies spell bytes so).
pub fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!'..=b'~').map(u32::from).collect();
    bs.extend(0xA1u32..=0xAC);
    bs.extend(0xAEu32..=0xFF);
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..=255u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec!['?'; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        out[b as usize] = char::from_u32(c).unwrap_or('?');
    }
    out
}

/// A ChatML template like SmolLM2's.
pub const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The tokenizer of a tiny model.
#[derive(Arbitrary, Debug, Clone)]
pub enum TokenizerKind {
    /// Byte-level BPE: the 256 byte tokens, a few merges, ChatML specials; the pre-tokenizer
    /// picked by index from the names the loader knows (or one it does not).
    Gpt2 { pre: u8 },
    /// SentencePiece: `<unk>`, `<s>`, `</s>`, the 256 byte pieces, a few scored pieces.
    Llama,
    /// Any other `tokenizer.ggml.model` string.
    Other(String),
}

/// A metadata value of any shape, to put where the loader expects something else.
#[derive(Arbitrary, Debug, Clone)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(u8),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
    U8s(Vec<u8>),
}

impl MetaValue {
    fn encode(&self) -> Encoded {
        let raw = |ty: u32, payload: Vec<u8>| Encoded { ty, payload };
        match self {
            Self::U8(v) => raw(ty::U8, vec![*v]),
            Self::I8(v) => raw(ty::I8, v.to_le_bytes().to_vec()),
            Self::U16(v) => raw(ty::U16, v.to_le_bytes().to_vec()),
            Self::I16(v) => raw(ty::I16, v.to_le_bytes().to_vec()),
            Self::U32(v) => raw(ty::U32, v.to_le_bytes().to_vec()),
            Self::I32(v) => raw(ty::I32, v.to_le_bytes().to_vec()),
            Self::F32(v) => raw(ty::F32, v.to_le_bytes().to_vec()),
            // Any byte: the reader must refuse all but 0 and 1.
            Self::Bool(v) => raw(ty::BOOL, vec![*v]),
            Self::Str(s) => Encoded::str(s),
            Self::U64(v) => raw(ty::U64, v.to_le_bytes().to_vec()),
            Self::I64(v) => raw(ty::I64, v.to_le_bytes().to_vec()),
            Self::F64(v) => raw(ty::F64, v.to_le_bytes().to_vec()),
            Self::Strs(v) => Encoded::strs(v),
            Self::I32s(v) => Encoded::i32s(v),
            Self::F32s(v) => Encoded::f32s(v),
            Self::U8s(v) => {
                let mut p = ty::U8.to_le_bytes().to_vec();
                p.extend((v.len() as u64).to_le_bytes());
                p.extend(v);
                raw(ty::ARRAY, p)
            }
        }
    }
}

/// A change to the well-formed file a [`ModelSpec`] describes.
#[derive(Arbitrary, Debug, Clone)]
pub enum Edit {
    /// Remove metadata entry `index % len`.
    DropKey(u8),
    /// Replace the value of entry `index % len`.
    SetKey(u8, MetaValue),
    /// Add (or replace) a key of any name.
    AddKey(String, MetaValue),
    /// Remove tensor `index % len`.
    DropTensor(u8),
    /// Give tensor `index % len` another ggml type (any id), with data to match.
    Retype(u8, u32),
    /// Give tensor `index % len` other dims (any count, any values), with data to match.
    Reshape(u8, Vec<u64>),
    /// Give tensor `index % len` another name.
    Rename(u8, String),
}

/// A tiny llama-family model, described by the fuzzer.
#[derive(Arbitrary, Debug, Clone)]
pub struct ModelSpec {
    /// `general.architecture`: llama, qwen2, or one the loader does not know.
    pub arch: u8,
    pub layers: u8,
    pub heads: u8,
    pub kv_heads: u8,
    pub head_dim: u8,
    pub ffn: u8,
    pub context: u16,
    pub tokenizer: TokenizerKind,
    pub extra_tokens: Vec<String>,
    pub template: Option<String>,
    /// Index into [`GGML_TYPES`] of the block matrices, embedding and output head.
    pub types: [u8; 3],
    pub tied: bool,
    pub bias: bool,
    pub rope_freqs: bool,
    pub edits: Vec<Edit>,
    /// Tensor- and pipeline-parallel split to load as well.
    pub tp: u8,
    pub pp: u8,
    /// Load the f32 reference weights instead of the stored encoding.
    pub f32_weights: bool,
}

impl ModelSpec {
    /// The model's shape before edits: (arch, layers, heads, kv_heads, head_dim, ffn). All
    /// zeros is a model of one layer, 2 heads of 16, 1 KV head and FFN 32 that loads whole and
    /// at TP 1 (the split rules want whole 32-wide quantization blocks per rank).
    fn shape(&self) -> (&'static str, u64, u64, u64, u64, u64) {
        let arch = ["llama", "qwen2", "llama", "mamba"][usize::from(self.arch % 4)];
        let heads = [2u64, 1, 3, 4][usize::from(self.heads % 4)];
        let kv = [1, heads, 2, 3][usize::from(self.kv_heads % 4)];
        let head_dim = [16u64, 32, 2, 4, 8, 64][usize::from(self.head_dim % 6)];
        let ffn = [32u64, 64, 8, 16, 256][usize::from(self.ffn % 5)];
        let layers = [1u64, 2, 0, 3][usize::from(self.layers % 4)];
        (arch, layers, heads, kv, head_dim, ffn)
    }

    /// The file this spec describes.
    pub fn build(&self) -> Vec<u8> {
        let (arch, layers, heads, kv, hd, ffn) = self.shape();
        let hidden = heads * hd;
        let mut w = Writer::default();
        w.set("general.architecture", Encoded::str(arch));
        let k = |s: &str| format!("{arch}.{s}");
        w.set(&k("block_count"), Encoded::u32(layers as u32))
            .set(
                &k("context_length"),
                Encoded::u32(16 + u32::from(self.context % 1024)),
            )
            .set(&k("embedding_length"), Encoded::u32(hidden as u32))
            .set(&k("feed_forward_length"), Encoded::u32(ffn as u32))
            .set(&k("attention.head_count"), Encoded::u32(heads as u32))
            .set(&k("attention.head_count_kv"), Encoded::u32(kv as u32))
            .set(&k("rope.freq_base"), Encoded::f32(10_000.0))
            .set(&k("attention.layer_norm_rms_epsilon"), Encoded::f32(1e-5));
        let mut tokens: Vec<String>;
        let mut types: Vec<i32>;
        match &self.tokenizer {
            TokenizerKind::Gpt2 { pre } => {
                tokens = byte_chars().iter().map(|c| c.to_string()).collect();
                types = vec![1; tokens.len()];
                let pres = [
                    "default",
                    "gpt2",
                    "smollm",
                    "llama-bpe",
                    "qwen2",
                    "starcoder",
                    "deepseek-llm",
                ];
                w.set("tokenizer.ggml.model", Encoded::str("gpt2"));
                w.set(
                    "tokenizer.ggml.pre",
                    Encoded::str(pres[usize::from(*pre) % pres.len()]),
                );
                let merges = ["Ġ t", "h e", "Ġt he", "i n"];
                for m in merges {
                    tokens.push(m.replace(' ', ""));
                    types.push(1);
                }
                w.set("tokenizer.ggml.merges", Encoded::strs(&merges));
            }
            TokenizerKind::Llama => {
                tokens = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
                types = vec![2, 3, 3];
                for b in 0..=255u8 {
                    tokens.push(format!("<0x{b:02X}>"));
                    types.push(6);
                }
                for p in ["▁", "▁t", "he", "▁the", "in"] {
                    tokens.push(p.into());
                    types.push(1);
                }
                w.set("tokenizer.ggml.model", Encoded::str("llama"));
            }
            TokenizerKind::Other(name) => {
                tokens = vec!["a".into(), "b".into()];
                types = vec![1, 1];
                w.set("tokenizer.ggml.model", Encoded::str(name));
            }
        }
        for t in ["<|im_start|>", "<|im_end|>"] {
            tokens.push(t.into());
            types.push(3);
        }
        for t in self.extra_tokens.iter().take(8) {
            tokens.push(t.clone());
            types.push(1 + (t.len() % 6) as i32);
        }
        let vocab = tokens.len() as u64;
        let scores: Vec<f32> = (0..tokens.len()).map(|i| -(i as f32)).collect();
        w.set("tokenizer.ggml.tokens", Encoded::strs(&tokens))
            .set("tokenizer.ggml.token_type", Encoded::i32s(&types))
            .set("tokenizer.ggml.scores", Encoded::f32s(&scores))
            .set("tokenizer.ggml.bos_token_id", Encoded::u32(1))
            .set(
                "tokenizer.ggml.eos_token_id",
                Encoded::u32(vocab as u32 - 1),
            )
            .set("tokenizer.ggml.add_bos_token", Encoded::bool(false));
        if let Some(t) = &self.template {
            w.set("tokenizer.chat_template", Encoded::str(t));
        } else {
            w.set("tokenizer.chat_template", Encoded::str(CHATML));
        }
        let pick = |i: usize| GGML_TYPES[usize::from(self.types[i]) % GGML_TYPES.len()];
        let (mat, emb, out) = (pick(0), pick(1), pick(2));
        w.tensor("token_embd.weight", &[hidden, vocab], emb);
        for l in 0..layers {
            let n = |s: &str| format!("blk.{l}.{s}");
            w.tensor(&n("attn_norm.weight"), &[hidden], 0)
                .tensor(&n("attn_q.weight"), &[hidden, heads * hd], mat)
                .tensor(&n("attn_k.weight"), &[hidden, kv * hd], mat)
                .tensor(&n("attn_v.weight"), &[hidden, kv * hd], mat)
                .tensor(&n("attn_output.weight"), &[heads * hd, hidden], mat)
                .tensor(&n("ffn_norm.weight"), &[hidden], 0)
                .tensor(&n("ffn_gate.weight"), &[hidden, ffn], mat)
                .tensor(&n("ffn_up.weight"), &[hidden, ffn], mat)
                .tensor(&n("ffn_down.weight"), &[ffn, hidden], mat);
            if self.bias {
                w.tensor(&n("attn_q.bias"), &[heads * hd], 0)
                    .tensor(&n("attn_k.bias"), &[kv * hd], 0)
                    .tensor(&n("attn_v.bias"), &[kv * hd], 0);
            }
        }
        w.tensor("output_norm.weight", &[hidden], 0);
        if !self.tied {
            w.tensor("output.weight", &[hidden, vocab], out);
        }
        if self.rope_freqs {
            w.tensor("rope_freqs.weight", &[hd / 2], 0);
        }
        for e in self.edits.iter().take(8) {
            apply(&mut w, e);
        }
        w.build()
    }
}

fn apply(w: &mut Writer, e: &Edit) {
    let ix = |i: u8, len: usize| (len > 0).then(|| usize::from(i) % len);
    match e {
        Edit::DropKey(i) => {
            if let Some(i) = ix(*i, w.kv.len()) {
                w.kv.remove(i);
            }
        }
        Edit::SetKey(i, v) => {
            if let Some(i) = ix(*i, w.kv.len()) {
                w.kv[i].1 = v.encode();
            }
        }
        Edit::AddKey(k, v) => {
            w.set(k, v.encode());
        }
        Edit::DropTensor(i) => {
            if let Some(i) = ix(*i, w.tensors.len()) {
                w.tensors.remove(i);
            }
        }
        Edit::Retype(i, ty) => {
            if let Some(i) = ix(*i, w.tensors.len()) {
                let t = &mut w.tensors[i];
                t.ty = *ty;
                t.data = tensor_data(&t.dims, *ty, i as u64);
            }
        }
        Edit::Reshape(i, dims) => {
            if let Some(i) = ix(*i, w.tensors.len()) {
                let t = &mut w.tensors[i];
                t.dims = dims.iter().take(6).copied().collect();
                t.data = tensor_data(&t.dims, t.ty, i as u64);
            }
        }
        Edit::Rename(i, name) => {
            if let Some(i) = ix(*i, w.tensors.len()) {
                w.tensors[i].name = name.clone();
            }
        }
    }
}

/// One CPU backend (a single thread) for every forward pass the targets run.
pub fn backend() -> Arc<dyn Backend> {
    static BE: OnceLock<Arc<dyn Backend>> = OnceLock::new();
    BE.get_or_init(|| Arc::new(CpuBackend::new(1).expect("a one-thread CPU backend")))
        .clone()
}

/// Messages every chat template renders in [`check_load`].
pub fn sample_messages() -> Vec<Message> {
    vec![
        Message {
            role: "system".into(),
            content: "Be brief.".into(),
        },
        Message {
            role: "user".into(),
            content: "What is 2+2? <|im_end|> ünïcödé".into(),
        },
    ]
}

/// With `WHALEFLUX_FUZZ_VERBOSE` set, [`check_load`] says how far each input got (to check
/// that seeds reach the model: `gguf_load -runs=0 DIR`).
static VERBOSE: LazyLock<bool> =
    LazyLock::new(|| std::env::var_os("WHALEFLUX_FUZZ_VERBOSE").is_some());

fn note<T, E: std::fmt::Display>(what: &str, r: &Result<T, E>) {
    if *VERBOSE {
        match r {
            Ok(_) => eprintln!("{what}: ok"),
            Err(e) => eprintln!("{what}: {e}"),
        }
    }
}

/// The whole load path of a worker on `bytes`: the reader, the tokenizer, the chat template,
/// the config, the whole model (then one forward pass: a model that loads must run), and every
/// rank of a `tp` x `pp` split. Errors are fine; a panic is a bug.
pub fn check_load(bytes: Vec<u8>, tp: usize, pp: usize, f32_weights: bool) {
    let g = Gguf::from_bytes(bytes);
    note("gguf", &g);
    let Ok(g) = g else {
        return;
    };
    for t in g.tensors() {
        assert_eq!(g.tensor_data(t).len() as u64, t.size, "{}", t.name);
        assert!(g.tensor(&t.name).is_some());
    }
    for (k, _) in g.metadata() {
        assert!(g.get(k).is_some(), "{k}");
    }
    let tk = ModelTokenizer::from_gguf(&g);
    note("tokenizer", &tk);
    if let Ok(tk) = tk {
        for text in [
            "",
            "Hello, world! 123",
            "<|im_start|>user\n héllo  \t\n<|im_end|>",
        ] {
            if let Ok(ids) = tk.encode(text) {
                for &id in &ids {
                    assert!((id as usize) < tk.vocab_size(), "id {id} out of the vocab");
                }
                let _ = tk.decode(&ids);
            }
        }
        let _ = tk.token_bytes(u32::MAX);
        let name = |id: Option<u32>| {
            id.and_then(|i| tk.tokens.get(i as usize).cloned())
                .unwrap_or_default()
        };
        let t = ChatTemplate::from_gguf(&g, name(tk.bos), name(tk.eos));
        note("chat template", &t);
        if let Ok(t) = t {
            note("chat render", &t.render(&sample_messages()));
        }
    }
    let cfg = LlamaConfig::from_gguf(&g);
    note("config", &cfg);
    let Ok(cfg) = cfg else {
        return;
    };
    let opts = if f32_weights {
        LoadOptions::f32()
    } else {
        LoadOptions::default()
    };
    let m = LlamaModel::load_with(&g, ShardSpec::whole(cfg.n_layers), opts);
    note("whole model", &m);
    if let Ok(m) = m {
        let be = backend();
        let mut cache = KvCache::default();
        let tokens = [0u32, (cfg.vocab as u32).saturating_sub(1)];
        let logits = m.forward(
            be.as_ref(),
            &mut [SeqInput {
                tokens: &tokens,
                cache: &mut cache,
            }],
        );
        assert_eq!(logits.len(), 1);
        assert_eq!(logits[0].len(), cfg.vocab);
        let more = m.forward(
            be.as_ref(),
            &mut [SeqInput {
                tokens: &tokens[..1],
                cache: &mut cache,
            }],
        );
        assert_eq!(more[0].len(), cfg.vocab);
    }
    let plan = shard::fixed_plan("fuzz", cfg.n_layers, tp, pp);
    for stage in 0..plan.stages.len() {
        for rank in 0..tp {
            let r = whaleflux_worker::engine::group::load_rank_with(&g, &plan, stage, rank, opts);
            note(&format!("TP {tp} x PP {pp}: stage {stage} rank {rank}"), &r);
        }
    }
}
