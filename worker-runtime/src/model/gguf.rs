//! GGUF v2/v3 reader: memory-maps a file and validates every count, length, offset and size
//! before trusting it, so a corrupt or hostile file yields an error naming the key or tensor and
//! the byte offset instead of a panic or a huge allocation.

use std::collections::HashMap;
use std::path::Path;

use memmap2::Mmap;
use thiserror::Error;

/// `"GGUF"` read as a little-endian u32.
const MAGIC: u32 = 0x4655_4747;
/// Default data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Dimensions a ggml tensor can have.
const MAX_DIMS: u32 = 4;

/// Everything that can go wrong while reading a GGUF file.
#[derive(Debug, Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the GGUF magic.
    #[error("not a GGUF file: bad magic {0:#010x} at offset 0")]
    BadMagic(u32),
    /// Only versions 2 and 3 are understood.
    #[error("unsupported GGUF version {0} at offset 4 (supported: 2, 3)")]
    Version(u32),
    /// The file ended before a field was complete.
    #[error("truncated file: {what} needs {need} bytes at offset {offset}, file has {len}")]
    Truncated {
        what: String,
        offset: u64,
        need: u64,
        len: u64,
    },
    /// A count or length is larger than the rest of the file could possibly hold.
    #[error("{what} at offset {offset} is {count}, more than the file can hold")]
    CountTooLarge {
        what: String,
        offset: u64,
        count: u64,
    },
    /// A metadata value has an unknown type tag.
    #[error("metadata key {key:?} at offset {offset}: unknown value type {ty}")]
    BadValueType { key: String, offset: u64, ty: u32 },
    /// A string is not valid UTF-8.
    #[error("{what} at offset {offset} is not valid UTF-8")]
    Utf8 { what: String, offset: u64 },
    /// A key or tensor name appears twice.
    #[error("duplicate {what} {name:?} at offset {offset}")]
    Duplicate {
        what: &'static str,
        name: String,
        offset: u64,
    },
    /// A tensor descriptor is inconsistent.
    #[error("tensor {tensor:?} at offset {offset}: {reason}")]
    BadTensor {
        tensor: String,
        offset: u64,
        reason: String,
    },
    /// A tensor uses a ggml type this engine cannot compute with.
    #[error("unsupported tensor type {ty} in tensor {tensor:?}")]
    UnsupportedType { ty: String, tensor: String },
    /// `general.alignment` is not a power of two.
    #[error("metadata key \"general.alignment\" is {0}, must be a non-zero power of two")]
    BadAlignment(u64),
    /// A metadata key the caller needs is absent or has the wrong type.
    #[error("metadata key {key:?}: {reason}")]
    Metadata { key: String, reason: String },
}

/// The ggml tensor types this engine supports (named as ggml and every GGUF tool name them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl GgmlType {
    /// Map a ggml type id; unknown or unsupported ids return their name for the error message.
    pub fn from_id(id: u32) -> Result<Self, String> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            30 => Self::BF16,
            other => {
                let name = match other {
                    9 => "Q8_1",
                    15 => "Q8_K",
                    16 => "IQ2_XXS",
                    17 => "IQ2_XS",
                    18 => "IQ3_XXS",
                    19 => "IQ1_S",
                    20 => "IQ4_NL",
                    21 => "IQ3_S",
                    22 => "IQ2_S",
                    23 => "IQ4_XS",
                    24 => "I8",
                    25 => "I16",
                    26 => "I32",
                    27 => "I64",
                    28 => "F64",
                    29 => "IQ1_M",
                    _ => return Err(format!("{other}")),
                };
                return Err(name.to_string());
            }
        })
    }

    /// Elements per block.
    pub fn block_elems(self) -> u64 {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => 32,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K => 256,
        }
    }

    /// Whether this is a K-quant (super-blocks of 256, multiplied against ggml's Q8_K blocks).
    pub fn is_k_quant(self) -> bool {
        self.block_elems() == 256
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q2_K => 84,
            Self::Q3_K => 110,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
        }
    }

    /// Bytes needed for `elems` elements (which must be a multiple of the block size).
    pub fn row_bytes(self, elems: u64) -> Option<u64> {
        (elems / self.block_elems()).checked_mul(self.block_bytes())
    }
}

/// One metadata value, of any GGUF value type.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// Any integer value as u64 (negative values are rejected).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value as i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Any float value as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The string, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The items, if this is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The boolean, if this is a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file and what shape it has.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// ggml dims: `dims[0]` is the contiguous (column) dimension.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Byte size of the data.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements in one row (`dims[0]`).
    pub fn cols(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Number of rows (product of `dims[1..]`).
    pub fn rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }
}

enum Backing {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

/// A parsed GGUF file; tensor data stays in the mapping until a shard view copies it out.
pub struct Gguf {
    backing: Backing,
    /// GGUF format version (2 or 3).
    pub version: u32,
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    /// Data alignment in bytes.
    pub alignment: u64,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
                need: n,
                len: self.buf.len() as u64,
            });
        }
        // n <= remaining, which fits in usize.
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let off = self.pos as u64;
        let len = self.u64(&|| format!("length of {}", what()))?;
        if len > self.remaining() {
            return Err(GgufError::CountTooLarge {
                what: format!("string length of {}", what()),
                offset: off,
                count: len,
            });
        }
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::Utf8 {
            what: what(),
            offset: off + 8,
        })
    }
}

/// How many of `n` items of `T` to reserve room for when `remaining` bytes of the file are
/// left. A count that passed its bound is backed by at least its items' smallest encodings,
/// but an item can take far more memory than that (a `u8` array item is one byte of the file
/// and a 32-byte [`Value`]): reserve no more than the rest of the file's size, so a count,
/// which may still be a lie, cannot allocate far more than the file up front. Past that a
/// vector grows only as items are actually read.
fn capacity<T>(n: u64, remaining: u64) -> usize {
    n.min(remaining / std::mem::size_of::<T>().max(1) as u64) as usize
}

/// Smallest encoded size of a value of type `ty`, used to bound counts before allocating.
fn min_value_size(ty: u32) -> u64 {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        _ => 8,
    }
}

fn read_value(c: &mut Cursor<'_>, ty: u32, key: &str, depth: u32) -> Result<Value, GgufError> {
    let w = || format!("value of metadata key {key:?}");
    Ok(match ty {
        0 => Value::U8(c.array::<1>(&w)?[0]),
        1 => Value::I8(i8::from_le_bytes(c.array(&w)?)),
        2 => Value::U16(u16::from_le_bytes(c.array(&w)?)),
        3 => Value::I16(i16::from_le_bytes(c.array(&w)?)),
        4 => Value::U32(u32::from_le_bytes(c.array(&w)?)),
        5 => Value::I32(i32::from_le_bytes(c.array(&w)?)),
        6 => Value::F32(f32::from_le_bytes(c.array(&w)?)),
        7 => {
            let off = c.pos as u64;
            match c.array::<1>(&w)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(GgufError::Metadata {
                        key: key.to_string(),
                        reason: format!("bool value {b} at offset {off} is neither 0 nor 1"),
                    });
                }
            }
        }
        8 => Value::String(c.string(&w)?),
        9 => {
            let off = c.pos as u64;
            let ity = c.u32(&|| format!("array type of metadata key {key:?}"))?;
            if ity > 12 {
                return Err(GgufError::BadValueType {
                    key: key.to_string(),
                    offset: off,
                    ty: ity,
                });
            }
            if ity == 9 && depth >= 4 {
                return Err(GgufError::Metadata {
                    key: key.to_string(),
                    reason: format!("arrays nested too deep at offset {off}"),
                });
            }
            let coff = c.pos as u64;
            let n = c.u64(&|| format!("array length of metadata key {key:?}"))?;
            let max = c.remaining() / min_value_size(ity);
            if n > max {
                return Err(GgufError::CountTooLarge {
                    what: format!("array length of metadata key {key:?}"),
                    offset: coff,
                    count: n,
                });
            }
            let mut items = Vec::with_capacity(capacity::<Value>(n, c.remaining()));
            for _ in 0..n {
                items.push(read_value(c, ity, key, depth + 1)?);
            }
            Value::Array(items)
        }
        10 => Value::U64(u64::from_le_bytes(c.array(&w)?)),
        11 => Value::I64(i64::from_le_bytes(c.array(&w)?)),
        12 => Value::F64(f64::from_le_bytes(c.array(&w)?)),
        other => {
            return Err(GgufError::BadValueType {
                key: key.to_string(),
                offset: c.pos as u64 - 4,
                ty: other,
            });
        }
    })
}

impl Gguf {
    /// Memory-map and parse a GGUF file.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only; like every mmap reader we rely on the file not being
        // truncated underneath us while the process runs.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(Backing::Mmap(map))
    }

    /// Parse a GGUF image held in memory (tests, fuzzing).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(Backing::Owned(bytes))
    }

    fn parse(backing: Backing) -> Result<Self, GgufError> {
        let buf: &[u8] = match &backing {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        };
        let mut c = Cursor { buf, pos: 0 };
        let magic = c.u32(&|| "magic".to_string())?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = c.u32(&|| "version".to_string())?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version(version));
        }
        let tc_off = c.pos as u64;
        let n_tensors = c.u64(&|| "tensor count".to_string())?;
        let kc_off = c.pos as u64;
        let n_kv = c.u64(&|| "metadata count".to_string())?;
        // Each key-value needs at least 8 (key length) + 4 (type) + 1 bytes.
        if n_kv > c.remaining() / 13 {
            return Err(GgufError::CountTooLarge {
                what: "metadata count".into(),
                offset: kc_off,
                count: n_kv,
            });
        }
        // Each tensor info needs at least 8 + 4 + 8 + 4 + 8 bytes.
        if n_tensors > c.remaining() / 32 {
            return Err(GgufError::CountTooLarge {
                what: "tensor count".into(),
                offset: tc_off,
                count: n_tensors,
            });
        }
        let mut metadata = Vec::with_capacity(capacity::<(String, Value)>(n_kv, c.remaining()));
        let mut meta_index = HashMap::new();
        for i in 0..n_kv {
            let off = c.pos as u64;
            let key = c.string(&|| format!("key of metadata entry {i}"))?;
            let ty = c.u32(&|| format!("value type of metadata key {key:?}"))?;
            let value = read_value(&mut c, ty, &key, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::Duplicate {
                    what: "metadata key",
                    name: key,
                    offset: off,
                });
            }
            metadata.push((key, value));
        }
        let alignment = match meta_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => {
                let a = metadata[i].1.as_u64().unwrap_or(0);
                if a == 0 || !a.is_power_of_two() {
                    return Err(GgufError::BadAlignment(a));
                }
                a
            }
        };
        let mut raw = Vec::with_capacity(capacity::<(u64, TensorInfo)>(n_tensors, c.remaining()));
        let mut tensor_index = HashMap::new();
        for i in 0..n_tensors {
            let off = c.pos as u64;
            let name = c.string(&|| format!("name of tensor {i}"))?;
            let bad = |reason: String| GgufError::BadTensor {
                tensor: name.clone(),
                offset: off,
                reason,
            };
            let nd = c.u32(&|| format!("dimension count of tensor {name:?}"))?;
            if nd == 0 || nd > MAX_DIMS {
                return Err(bad(format!("{nd} dimensions (must be 1..={MAX_DIMS})")));
            }
            let mut dims = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                dims.push(c.u64(&|| format!("dimensions of tensor {name:?}"))?);
            }
            let ty_id = c.u32(&|| format!("type of tensor {name:?}"))?;
            let rel = c.u64(&|| format!("data offset of tensor {name:?}"))?;
            let ty = GgmlType::from_id(ty_id).map_err(|ty| GgufError::UnsupportedType {
                ty,
                tensor: name.clone(),
            })?;
            if dims.contains(&0) {
                return Err(bad(format!("zero dimension in {dims:?}")));
            }
            let elems = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&e| e <= i64::MAX as u64)
                .ok_or_else(|| bad(format!("element count of dims {dims:?} overflows")))?;
            if dims[0] % ty.block_elems() != 0 {
                return Err(bad(format!(
                    "row length {} is not a multiple of the {ty:?} block size {}",
                    dims[0],
                    ty.block_elems()
                )));
            }
            let size = ty
                .row_bytes(elems)
                .ok_or_else(|| bad("byte size overflows".into()))?;
            if rel % alignment != 0 {
                return Err(bad(format!(
                    "data offset {rel} is not a multiple of the alignment {alignment}"
                )));
            }
            if tensor_index.insert(name.clone(), raw.len()).is_some() {
                return Err(GgufError::Duplicate {
                    what: "tensor",
                    name,
                    offset: off,
                });
            }
            raw.push((
                off,
                TensorInfo {
                    name,
                    dims,
                    ty,
                    offset: rel,
                    size,
                },
            ));
        }
        let pos = c.pos as u64;
        let data_start = pos.div_ceil(alignment) * alignment;
        let file_len = buf.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        for (off, mut t) in raw {
            let start = data_start.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.size));
            match (start, end) {
                (Some(s), Some(e)) if e <= file_len => t.offset = s,
                _ => {
                    return Err(GgufError::BadTensor {
                        offset: off,
                        reason: format!(
                            "data at offset {} + {} bytes ends past the end of the file ({file_len} bytes)",
                            data_start.saturating_add(t.offset),
                            t.size
                        ),
                        tensor: t.name,
                    });
                }
            }
            tensors.push(t);
        }
        Ok(Self {
            backing,
            version,
            metadata,
            meta_index,
            tensors,
            tensor_index,
            alignment,
        })
    }

    fn bytes(&self) -> &[u8] {
        match &self.backing {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// A required integer metadata value.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.get(key).ok_or_else(|| GgufError::Metadata {
            key: key.into(),
            reason: "missing".into(),
        })?;
        v.as_u64().ok_or_else(|| GgufError::Metadata {
            key: key.into(),
            reason: format!("expected an unsigned integer, found {v:?}"),
        })
    }

    /// A required string metadata value.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.get(key).ok_or_else(|| GgufError::Metadata {
            key: key.into(),
            reason: "missing".into(),
        })?;
        v.as_str().ok_or_else(|| GgufError::Metadata {
            key: key.into(),
            reason: "expected a string".into(),
        })
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// One tensor info by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor (bounds were validated at parse time).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        &self.bytes()[t.offset as usize..(t.offset + t.size) as usize]
    }
}
