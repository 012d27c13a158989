//! SentencePiece vocabularies as GGUF carries them (`tokenizer.ggml.model = llama`: Llama 2,
//! Mistral): pieces with scores, no merges. Tokenization is llama.cpp's: a leading space where
//! the text starts or follows a special token, spaces as `▁`, then adjacent symbols merged
//! while some pair forms a piece, highest score first (leftmost on ties), and characters that
//! are no piece written as their UTF-8 bytes (`<0xXX>` pieces).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// A SentencePiece vocabulary.
pub struct Spm {
    ids: HashMap<String, u32>,
    scores: Vec<f32>,
    bytes: [Option<u32>; 256],
    add_space_prefix: bool,
}

/// A candidate merge of the symbols at `left` and `right`.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Bytes of the merged text (stale entries are recognised by it).
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bigram {
    /// The heap's top is the highest score, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// A run of the text: `start..start + len` bytes, linked to its neighbours.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    /// From the pieces (`tokenizer.ggml.tokens`), their scores and whether a space goes before
    /// the text (`tokenizer.ggml.add_space_prefix`, true unless the file says otherwise).
    pub fn new(tokens: &[String], scores: Vec<f32>, add_space_prefix: bool) -> Self {
        let mut bytes = [None; 256];
        let mut ids = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            ids.insert(t.clone(), i as u32);
            if let Some(b) = byte_piece(t) {
                bytes[b as usize] = Some(i as u32);
            }
        }
        Self {
            ids,
            scores,
            bytes,
            add_space_prefix,
        }
    }

    /// Tokenize one run of text between special tokens; `after_special` is true for the
    /// first run and for runs that follow a special token (they get the space prefix).
    pub fn encode_run(&self, run: &str, after_special: bool, out: &mut Vec<u32>) {
        let mut text = String::with_capacity(run.len() + 3);
        if self.add_space_prefix && after_special {
            text.push('▁');
        }
        text.extend(run.chars().map(|c| if c == ' ' { '▁' } else { c }));
        let mut symbols: Vec<Symbol> = Vec::new();
        for (start, ch) in text.char_indices() {
            let i = symbols.len();
            symbols.push(Symbol {
                start,
                len: ch.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                symbols[i - 1].next = Some(i);
            }
        }
        let mut queue = BinaryHeap::new();
        let bigram = |symbols: &[Symbol], left: usize, right: usize| -> Option<Bigram> {
            let (l, r) = (symbols[left], symbols[right]);
            let piece = &text[l.start..r.start + r.len];
            let id = *self.ids.get(piece)?;
            Some(Bigram {
                score: self.scores.get(id as usize).copied().unwrap_or(0.0),
                left,
                right,
                size: piece.len(),
            })
        };
        for i in 1..symbols.len() {
            queue.extend(bigram(&symbols, i - 1, i));
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            symbols[b.left].len += r.len;
            symbols[b.right].len = 0;
            symbols[b.left].next = r.next;
            if let Some(n) = r.next {
                symbols[n].prev = Some(b.left);
            }
            if let Some(p) = l.prev {
                queue.extend(bigram(&symbols, p, b.left));
            }
            if let Some(n) = r.next {
                queue.extend(bigram(&symbols, b.left, n));
            }
        }
        let mut at = (!symbols.is_empty()).then_some(0);
        while let Some(i) = at {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                // A character that is no piece: its UTF-8 bytes.
                None => out.extend(piece.bytes().filter_map(|b| self.bytes[b as usize])),
            }
            at = s.next;
        }
    }
}

/// The byte a `<0xXX>` piece stands for.
pub fn byte_piece(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// The bytes a (normal) piece stands for: `▁` is a space.
pub fn piece_bytes(t: &str) -> Vec<u8> {
    match byte_piece(t) {
        Some(b) => vec![b],
        None => t.replace('▁', " ").into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> Spm {
        let pieces = [
            "<unk>", "<0x41>", "<0xC3>", "<0xA9>", "▁", "h", "e", "l", "o", "▁h", "he", "ll",
            "llo", "▁hello", "hello", "▁w",
        ];
        let scores = (0..pieces.len()).map(|i| -(i as f32)).collect();
        let tokens: Vec<String> = pieces.iter().map(|s| s.to_string()).collect();
        Spm::new(&tokens, scores, true)
    }

    #[test]
    fn merges_by_score_and_falls_back_to_bytes() {
        let v = vocab();
        let mut out = Vec::new();
        v.encode_run("hello", true, &mut out);
        // "▁hello" is reachable through "▁h" + "e" ... only if every step is a piece; here
        // "▁he" is not, so the best merges give "▁h", "e", "llo".
        assert_eq!(out, vec![9, 6, 12]);
        out.clear();
        v.encode_run("é", false, &mut out);
        assert_eq!(out, vec![2, 3], "é has no piece: its two UTF-8 bytes");
        assert_eq!(byte_piece("<0x41>"), Some(0x41));
        assert_eq!(byte_piece("<0x4>"), None);
        assert_eq!(piece_bytes("▁hello"), b" hello");
    }
}
