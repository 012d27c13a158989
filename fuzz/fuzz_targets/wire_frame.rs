//! Fuzz the peer wire format: arbitrary bytes read as a TCP peer's stream of length-prefixed
//! frames, the way a connection's reader thread reads them. Every frame decodes or fails with
//! an error; whatever decodes encodes back to a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use whaleflux_worker::comm::wire::{self, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while rest.len() >= 4 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        rest = &rest[4..];
        // The reader refuses these before reading the body.
        if len == 0 || len > MAX_FRAME || len > rest.len() {
            break;
        }
        let (body, tail) = rest.split_at(len);
        rest = tail;
        match wire::decode(body) {
            Ok(None) => assert_eq!(&wire::heartbeat()[4..], &body[..1]),
            Ok(Some(msg)) => {
                let frame = wire::encode(&msg);
                let n = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
                assert_eq!(
                    n,
                    frame.len() - 4,
                    "length prefix of a re-encoded {}",
                    msg.kind()
                );
                let again = wire::decode(&frame[4..])
                    .unwrap_or_else(|e| panic!("a re-encoded {} does not decode: {e}", msg.kind()))
                    .unwrap_or_else(|| {
                        panic!("a re-encoded {} decodes as a heartbeat", msg.kind())
                    });
                // Compared as bytes: NaN payloads are equal bytes but unequal floats.
                assert_eq!(wire::encode(&again), frame, "{} round trip", msg.kind());
            }
            Err(e) => assert!(!e.is_empty()),
        }
    }
});
