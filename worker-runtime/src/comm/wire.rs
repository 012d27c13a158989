//! The byte format of [`Msg`] on TCP: a frame is a little-endian `u32` length and that many
//! bytes; the first byte says what the frame is. Numbers are little-endian.

use super::{Msg, Step};

/// Frame kind of a heartbeat (keeps an idle link alive; never surfaces as a message).
pub const HEARTBEAT: u8 = 0;
/// Largest frame accepted (a step of a long prefill at a wide hidden size fits).
pub const MAX_FRAME: usize = 1 << 30;

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_f32s(out: &mut Vec<u8>, v: &[f32]) {
    put_u32(out, v.len() as u32);
    out.reserve(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// Encode `msg` as a whole frame (length prefix included).
pub fn encode(msg: &Msg) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    match msg {
        Msg::Ready => out.push(1),
        Msg::Step(s) => {
            out.push(2);
            put_u64(&mut out, s.id);
            put_u32(&mut out, s.seqs.len() as u32);
            for &(id, n) in &s.seqs {
                put_u64(&mut out, id);
                put_u32(&mut out, n);
            }
            put_u32(&mut out, s.free.len() as u32);
            for &id in &s.free {
                put_u64(&mut out, id);
            }
            put_f32s(&mut out, &s.hidden);
        }
        Msg::Logits { id, vocab, data } => {
            out.push(3);
            put_u64(&mut out, *id);
            put_u32(&mut out, *vocab);
            put_f32s(&mut out, data);
        }
        Msg::Reduce(v) => {
            out.push(4);
            put_f32s(&mut out, v);
        }
        Msg::Shutdown => out.push(5),
        Msg::Abort(reason) => {
            out.push(6);
            out.extend_from_slice(reason.as_bytes());
        }
        Msg::Formed => out.push(7),
    }
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_le_bytes());
    out
}

/// A heartbeat frame.
pub fn heartbeat() -> [u8; 5] {
    [1, 0, 0, 0, HEARTBEAT]
}

struct Reader<'a> {
    b: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.b.len() < n {
            return Err(format!(
                "frame ends early ({} bytes left, {n} needed)",
                self.b.len()
            ));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn count(&mut self, each: usize) -> Result<usize, String> {
        let n = self.u32()? as usize;
        if n.saturating_mul(each) > self.b.len() {
            return Err(format!("count {n} exceeds the frame"));
        }
        Ok(n)
    }
    fn f32s(&mut self) -> Result<Vec<f32>, String> {
        let n = self.count(4)?;
        let b = self.take(n * 4)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

/// Decode a frame body (without the length prefix). `Ok(None)` is a heartbeat.
pub fn decode(body: &[u8]) -> Result<Option<Msg>, String> {
    let (&kind, rest) = body.split_first().ok_or("empty frame")?;
    let mut r = Reader { b: rest };
    let msg = match kind {
        HEARTBEAT => return Ok(None),
        1 => Msg::Ready,
        2 => {
            let id = r.u64()?;
            let n = r.count(12)?;
            let mut seqs = Vec::with_capacity(n);
            for _ in 0..n {
                seqs.push((r.u64()?, r.u32()?));
            }
            let n = r.count(8)?;
            let mut free = Vec::with_capacity(n);
            for _ in 0..n {
                free.push(r.u64()?);
            }
            let hidden = r.f32s()?;
            Msg::Step(Step {
                id,
                seqs,
                free,
                hidden,
            })
        }
        3 => {
            let id = r.u64()?;
            let vocab = r.u32()?;
            let data = r.f32s()?;
            Msg::Logits { id, vocab, data }
        }
        4 => Msg::Reduce(r.f32s()?),
        5 => Msg::Shutdown,
        6 => {
            let reason = String::from_utf8_lossy(r.b).into_owned();
            r.b = &[];
            Msg::Abort(reason)
        }
        7 => Msg::Formed,
        k => return Err(format!("unknown frame kind {k}")),
    };
    if !r.b.is_empty() {
        return Err(format!(
            "{} stray bytes after a {} frame",
            r.b.len(),
            msg.kind()
        ));
    }
    Ok(Some(msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips_and_garbage_is_an_error() {
        let msgs = [
            Msg::Ready,
            Msg::Formed,
            Msg::Shutdown,
            Msg::Abort("stage 2 died".into()),
            Msg::Reduce(vec![1.5, -2.0]),
            Msg::Logits {
                id: 7,
                vocab: 2,
                data: vec![0.25, 3.0, 4.0, 5.0],
            },
            Msg::Step(Step {
                id: 3,
                seqs: vec![(1, 2), (9, 1)],
                free: vec![4],
                hidden: vec![0.5; 6],
            }),
        ];
        for m in msgs {
            let f = encode(&m);
            assert_eq!(
                u32::from_le_bytes([f[0], f[1], f[2], f[3]]) as usize,
                f.len() - 4
            );
            assert_eq!(decode(&f[4..]), Ok(Some(m)));
        }
        assert_eq!(decode(&heartbeat()[4..]), Ok(None));
        assert!(decode(&[2, 1, 2]).is_err());
        assert!(decode(&[4, 255, 255, 255, 255]).is_err());
        assert!(decode(&[9]).is_err());
        assert!(decode(&[7, 0]).is_err());
        assert!(decode(&[]).is_err());
    }
}
