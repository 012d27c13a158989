//! Fuzz the whole GGUF load path: the reader, the tokenizer, the chat template, the config, the
//! whole model (and a forward pass of what loads), and every rank of a TP x PP split. Any input
//! must load or fail with a typed error, never panic or allocate without bound.
//!
//! The first byte picks the mode: even, the rest is the file itself (byte-level mutations of
//! real files); odd, the rest describes a tiny model and edits to it ([`ModelSpec`]), which
//! reaches deep into the loader much faster than flipping bytes of a file.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use whaleflux_worker_fuzz::{ModelSpec, check_load};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        check_load(
            rest.to_vec(),
            1 + usize::from(mode / 2 % 3),
            1 + usize::from(mode / 8 % 3),
            mode & 0x80 != 0,
        );
    } else if let Ok(spec) = ModelSpec::arbitrary_take_rest(Unstructured::new(rest)) {
        check_load(
            spec.build(),
            1 + usize::from(spec.tp % 4),
            1 + usize::from(spec.pp % 3),
            spec.f32_weights,
        );
    }
});
