//! Per-sequence key/value cache. On the serving path keys and values are stored as f16 — half
//! the memory of f32 and exactly what llama.cpp keeps (its default `type_k`/`type_v`), so
//! attention reads the same numbers. The f32 reference path stores f32, so nothing on it is
//! rounded to half precision. The element type is the model's ([`KvType`]), fixed when a
//! sequence is first reserved. Each layer holds one row of `kv_dim` values per position.

use half::f16;

/// Element type of cached keys and values; a model picks one when it loads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KvType {
    /// Half precision, as llama.cpp caches them (the serving path).
    #[default]
    F16,
    /// Single precision (the f32 reference path).
    F32,
}

/// One layer's keys and values, position-major (`kv_dim` per position), in the cache's type.
#[derive(Debug, Clone, Copy)]
pub enum KvLayer<'a> {
    /// An f16 cache.
    F16 {
        /// Keys.
        k: &'a [f16],
        /// Values.
        v: &'a [f16],
    },
    /// An f32 cache.
    F32 {
        /// Keys.
        k: &'a [f32],
        /// Values.
        v: &'a [f32],
    },
}

/// Per-sequence key/value cache for the layers of this stage.
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    store: Store,
    kv_dim: usize,
    len: usize,
}

#[derive(Debug, Clone)]
enum Store {
    F16(Vec<LayerKv<f16>>),
    F32(Vec<LayerKv<f32>>),
}

impl Default for Store {
    fn default() -> Self {
        Store::F16(Vec::new())
    }
}

#[derive(Debug, Default, Clone)]
struct LayerKv<T> {
    k: Vec<T>,
    v: Vec<T>,
}

impl<T: Copy + Default> LayerKv<T> {
    fn grow(layers: &mut Vec<Self>, n: usize, want: usize) {
        layers.resize_with(n, Self::default);
        for l in layers {
            l.k.resize(want, T::default());
            l.v.resize(want, T::default());
        }
    }
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Element type of the keys and values.
    pub fn kv_type(&self) -> KvType {
        match self.store {
            Store::F16(_) => KvType::F16,
            Store::F32(_) => KvType::F32,
        }
    }

    /// Bytes of key/value storage in use (for the KV-cache metrics).
    pub fn bytes(&self) -> usize {
        fn sum<T>(ls: &[LayerKv<T>]) -> usize {
            ls.iter()
                .map(|l| (l.k.len() + l.v.len()) * std::mem::size_of::<T>())
                .sum()
        }
        match &self.store {
            Store::F16(ls) => sum(ls),
            Store::F32(ls) => sum(ls),
        }
    }

    fn layer_count(&self) -> usize {
        match &self.store {
            Store::F16(ls) => ls.len(),
            Store::F32(ls) => ls.len(),
        }
    }

    /// Make room for `extra` more positions in each of `layers` layers of `kv_dim` values of
    /// type `ty`. The first call fixes the row width and the type.
    ///
    /// # Panics
    /// If `kv_dim` or `ty` differ from what the cache was first sized with.
    pub fn reserve(&mut self, layers: usize, kv_dim: usize, extra: usize, ty: KvType) {
        if self.layer_count() == 0 {
            self.kv_dim = kv_dim;
            self.store = match ty {
                KvType::F16 => Store::F16(Vec::new()),
                KvType::F32 => Store::F32(Vec::new()),
            };
        }
        assert_eq!(self.kv_dim, kv_dim, "KV cache row width changed");
        assert_eq!(self.kv_type(), ty, "KV cache element type changed");
        let want = (self.len + extra) * kv_dim;
        match &mut self.store {
            Store::F16(ls) => LayerKv::grow(ls, layers, want),
            Store::F32(ls) => LayerKv::grow(ls, layers, want),
        }
    }

    /// Store position `pos`'s key and value rows of `layer` (rounded to f16 in an f16 cache).
    pub fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let r = pos * self.kv_dim..(pos + 1) * self.kv_dim;
        match &mut self.store {
            Store::F16(ls) => {
                let l = &mut ls[layer];
                for (dst, src) in l.k[r.clone()].iter_mut().zip(k) {
                    *dst = f16::from_f32(*src);
                }
                for (dst, src) in l.v[r].iter_mut().zip(v) {
                    *dst = f16::from_f32(*src);
                }
            }
            Store::F32(ls) => {
                let l = &mut ls[layer];
                l.k[r.clone()].copy_from_slice(&k[..self.kv_dim]);
                l.v[r].copy_from_slice(&v[..self.kv_dim]);
            }
        }
    }

    /// Keys and values of `layer`, position-major (`kv_dim` per position).
    pub fn layer(&self, layer: usize) -> KvLayer<'_> {
        match &self.store {
            Store::F16(ls) => KvLayer::F16 {
                k: &ls[layer].k,
                v: &ls[layer].v,
            },
            Store::F32(ls) => KvLayer::F32 {
                k: &ls[layer].k,
                v: &ls[layer].v,
            },
        }
    }

    /// Count `n` newly written positions as held.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_through_f16_and_grow() {
        let mut c = KvCache::default();
        c.reserve(2, 4, 1, KvType::F16);
        c.write(1, 0, &[1.0, 2.5, -3.0, 0.1], &[4.0, 5.0, 6.0, 7.0]);
        c.advance(1);
        c.reserve(2, 4, 2, KvType::F16);
        c.write(1, 2, &[9.0; 4], &[8.0; 4]);
        c.advance(2);
        let KvLayer::F16 { k, v } = c.layer(1) else {
            panic!("an f16 cache");
        };
        assert_eq!(k.len(), 12);
        assert_eq!(k[1].to_f32(), 2.5);
        assert_eq!(k[3].to_f32(), f16::from_f32(0.1).to_f32());
        assert_eq!(v[8].to_f32(), 8.0);
        assert_eq!(c.len(), 3);
        // Two layers × (k + v) × 3 positions × 4 values × 2 bytes.
        assert_eq!(c.bytes(), 2 * 2 * 3 * 4 * 2);
    }

    #[test]
    fn an_f32_cache_keeps_rows_exactly() {
        let mut c = KvCache::default();
        c.reserve(1, 3, 2, KvType::F32);
        assert_eq!(c.kv_type(), KvType::F32);
        c.write(0, 1, &[0.1, 1e-9, 70000.0], &[-0.3, 2.0, 1.0 / 3.0]);
        c.advance(2);
        let KvLayer::F32 { k, v } = c.layer(0) else {
            panic!("an f32 cache");
        };
        assert_eq!(&k[3..], &[0.1, 1e-9, 70000.0]);
        assert_eq!(&v[3..], &[-0.3, 2.0, 1.0 / 3.0]);
        // One layer × (k + v) × 2 positions × 3 values × 4 bytes.
        assert_eq!(c.bytes(), 2 * 2 * 3 * 4);
    }

    #[test]
    #[should_panic(expected = "element type changed")]
    fn a_cache_keeps_the_type_it_was_first_sized_with() {
        let mut c = KvCache::default();
        c.reserve(1, 3, 1, KvType::F16);
        c.reserve(1, 3, 1, KvType::F32);
    }
}
