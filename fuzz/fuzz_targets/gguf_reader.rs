//! Fuzz the GGUF reader: any byte string must parse or fail with an error, never panic or
//! allocate without bound; whatever parses must give in-bounds tensor data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use whaleflux_worker::model::gguf::Gguf;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = Gguf::from_bytes(data.to_vec()) {
        for t in g.tensors() {
            assert_eq!(g.tensor_data(t).len() as u64, t.size);
        }
        for (k, _) in g.metadata() {
            assert!(g.get(k).is_some());
        }
    }
});
