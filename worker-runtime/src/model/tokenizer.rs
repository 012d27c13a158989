//! The model's tokenizer from its GGUF vocabulary: byte-level BPE (`tokenizer.ggml.model =
//! gpt2`) with the `tokenizers` crate and the pre-tokenizer the file names, or SentencePiece
//! (`llama`, [`super::spm`]); plus a per-token byte table for exact, UTF-8-safe incremental
//! decoding while streaming.

use std::collections::HashMap;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::gguf::{Gguf, Value};
use super::spm::{self, Spm};

/// Errors building or using the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// Required tokenizer metadata is missing or malformed.
    #[error("tokenizer metadata {key:?}: {reason}")]
    Metadata { key: String, reason: String },
    /// The `tokenizers` crate rejected the vocabulary or the input.
    #[error("tokenizer: {0}")]
    Backend(String),
}

/// The model's tokenizer.
pub struct ModelTokenizer {
    inner: Engine,
    token_bytes: Vec<Vec<u8>>,
    /// Beginning-of-sequence token.
    pub bos: Option<u32>,
    /// End-of-sequence token.
    pub eos: Option<u32>,
    /// Whether llama.cpp would add BOS when tokenizing a prompt.
    pub add_bos: bool,
    /// The textual form of every token (for `bos_token`/`eos_token` in templates).
    pub tokens: Vec<String>,
    /// Control/user-defined tokens that end generation (EOS and end-of-turn markers).
    pub stop_ids: Vec<u32>,
}

/// How text becomes ids.
enum Engine {
    /// Byte-level BPE through the `tokenizers` crate (special tokens are its added tokens).
    Bpe(Box<Tokenizer>),
    /// SentencePiece, with the special tokens that split the text before it.
    Spm {
        spm: Box<Spm>,
        specials: Vec<(String, u32)>,
    },
}

/// GPT-2's reversible byte <-> printable-char table.
fn byte_decoder() -> HashMap<char, u8> {
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
    bs.into_iter()
        .zip(cs)
        .filter_map(|(b, c)| Some((char::from_u32(c)?, b as u8)))
        .collect()
}

const GPT2_RE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// llama.cpp's `qwen2` pre-tokenizer: Llama 3's, with single digits.
const QWEN2_RE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)";
const LLAMA3_RE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl ModelTokenizer {
    /// Build from `tokenizer.ggml.*` metadata (model `gpt2`, i.e. byte-level BPE).
    pub fn from_gguf(g: &Gguf) -> Result<Self, TokenizerError> {
        let meta = |key: &str, reason: &str| TokenizerError::Metadata {
            key: key.into(),
            reason: reason.into(),
        };
        let model = g
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .ok_or_else(|| meta("tokenizer.ggml.model", "missing"))?;
        if model != "gpt2" && model != "llama" {
            return Err(meta(
                "tokenizer.ggml.model",
                &format!(
                    "{model:?} is not supported (byte-level BPE \"gpt2\" and SentencePiece \
                     \"llama\" are)"
                ),
            ));
        }
        let strs = |key: &str| -> Result<Vec<String>, TokenizerError> {
            g.get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| meta(key, "missing or not an array"))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| meta(key, "array item is not a string"))
                })
                .collect()
        };
        let tokens = strs("tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(a) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let (inner, token_bytes) = if model == "llama" {
            Self::spm(g, &tokens, &types)?
        } else {
            Self::bpe(g, &tokens, &types)?
        };
        let id = |key: &str| {
            g.get(key)
                .and_then(Value::as_u64)
                .map(|v| v as u32)
                .filter(|&v| (v as usize) < tokens.len())
        };
        let eos = id("tokenizer.ggml.eos_token_id");
        let mut stop_ids: Vec<u32> = eos.into_iter().collect();
        if let Some(e) = id("tokenizer.ggml.eot_token_id") {
            stop_ids.push(e);
        }
        for (i, t) in tokens.iter().enumerate() {
            if types.get(i) == Some(&3)
                && matches!(
                    t.as_str(),
                    "<|im_end|>" | "<|eot_id|>" | "<|endoftext|>" | "</s>"
                )
                && !stop_ids.contains(&(i as u32))
            {
                stop_ids.push(i as u32);
            }
        }
        Ok(Self {
            inner,
            token_bytes,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos,
            add_bos: g
                .get("tokenizer.ggml.add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(model == "llama"),
            tokens,
            stop_ids,
        })
    }

    /// A SentencePiece vocabulary: pieces, their scores, special tokens (control and
    /// user-defined) that split the text, `<0xXX>` byte pieces.
    fn spm(
        g: &Gguf,
        tokens: &[String],
        types: &[i64],
    ) -> Result<(Engine, Vec<Vec<u8>>), TokenizerError> {
        let scores: Vec<f32> = g
            .get("tokenizer.ggml.scores")
            .and_then(Value::as_array)
            .ok_or_else(|| TokenizerError::Metadata {
                key: "tokenizer.ggml.scores".into(),
                reason: "missing or not an array (a SentencePiece vocabulary needs them)".into(),
            })?
            .iter()
            .map(|v| v.as_f64().unwrap_or(0.0) as f32)
            .collect();
        let add_space_prefix = g
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let special = |i: usize| matches!(types.get(i), Some(3 | 4));
        let specials = tokens
            .iter()
            .enumerate()
            .filter(|(i, t)| special(*i) && !t.is_empty())
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let token_bytes = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if special(i) {
                    t.as_bytes().to_vec()
                } else {
                    spm::piece_bytes(t)
                }
            })
            .collect();
        let spm = Box::new(Spm::new(tokens, scores, add_space_prefix));
        Ok((Engine::Spm { spm, specials }, token_bytes))
    }

    /// A byte-level BPE vocabulary with its merges and the pre-tokenizer the file names.
    fn bpe(
        g: &Gguf,
        tokens: &[String],
        types: &[i64],
    ) -> Result<(Engine, Vec<Vec<u8>>), TokenizerError> {
        let meta = |key: &str, reason: &str| TokenizerError::Metadata {
            key: key.into(),
            reason: reason.into(),
        };
        let merges_raw: Vec<String> = g
            .get("tokenizer.ggml.merges")
            .and_then(Value::as_array)
            .ok_or_else(|| meta("tokenizer.ggml.merges", "missing or not an array"))?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| meta("tokenizer.ggml.merges", "array item is not a string"))
            })
            .collect::<Result<_, _>>()?;
        let mut merges = Vec::with_capacity(merges_raw.len());
        for m in &merges_raw {
            let (a, b) = m.split_once(' ').ok_or_else(|| {
                meta(
                    "tokenizer.ggml.merges",
                    &format!("merge {m:?} has no space"),
                )
            })?;
            merges.push((a.to_string(), b.to_string()));
        }
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizerError::Backend(e.to_string()))?;
        let mut tk = Tokenizer::new(bpe);
        // Without the key llama.cpp takes GPT-2's; a name it knows and we do not is refused
        // rather than tokenized some other way.
        let pre = g
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let split = |re: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
            Ok(Split::new(
                SplitPattern::Regex(re.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| TokenizerError::Backend(e.to_string()))?
            .into())
        };
        let bl_noregex: PreTokenizerWrapper = ByteLevel::new(false, true, false).into();
        let pre_tok: PreTokenizerWrapper = match pre {
            "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" => Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            "llama-bpe" | "llama3" | "smaug-bpe" => {
                Sequence::new(vec![split(LLAMA3_RE)?, bl_noregex]).into()
            }
            "qwen2" => Sequence::new(vec![split(QWEN2_RE)?, bl_noregex]).into(),
            "default" | "gpt2" | "gpt-2" => Sequence::new(vec![split(GPT2_RE)?, bl_noregex]).into(),
            other => {
                return Err(meta(
                    "tokenizer.ggml.pre",
                    &format!(
                        "pre-tokenizer {other:?} is not supported (llama-bpe, llama3, \
                         smaug-bpe, qwen2, smollm, starcoder, refact, codeshell, command-r, \
                         gpt2 and default are)"
                    ),
                ));
            }
        };
        tk.with_pre_tokenizer(Some(pre_tok));
        tk.with_decoder(Some(ByteLevel::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types)
            .filter(|(_, ty)| **ty == 3 || **ty == 4)
            .map(|(t, _)| AddedToken::from(t.clone(), true))
            .collect();
        tk.add_special_tokens(&specials);
        let dec = byte_decoder();
        let token_bytes = tokens
            .iter()
            .zip(types)
            .map(|(t, ty)| {
                if *ty == 3 || *ty == 4 {
                    t.as_bytes().to_vec()
                } else {
                    t.chars()
                        .map(|ch| dec.get(&ch).copied().unwrap_or(b'?'))
                        .collect()
                }
            })
            .collect();
        Ok((Engine::Bpe(Box::new(tk)), token_bytes))
    }

    /// Tokenize text, parsing special tokens, adding BOS when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        if self.add_bos
            && let Some(b) = self.bos
        {
            ids.push(b);
        }
        match &self.inner {
            Engine::Bpe(tk) => {
                let enc = tk
                    .encode(text, false)
                    .map_err(|e| TokenizerError::Backend(e.to_string()))?;
                ids.extend_from_slice(enc.get_ids());
            }
            Engine::Spm { spm, specials } => {
                // Runs of text between special tokens written out (the longest one wins where
                // several start at the same place).
                let (mut run_start, mut at, mut after_special) = (0, 0, true);
                while at < text.len() {
                    let hit = specials
                        .iter()
                        .filter(|(t, _)| text[at..].starts_with(t.as_str()))
                        .max_by_key(|(t, _)| t.len());
                    match hit {
                        Some((t, id)) => {
                            if run_start < at {
                                spm.encode_run(&text[run_start..at], after_special, &mut ids);
                            }
                            ids.push(*id);
                            at += t.len();
                            run_start = at;
                            after_special = true;
                        }
                        None => at += text[at..].chars().next().map_or(1, char::len_utf8),
                    }
                }
                if run_start < text.len() {
                    spm.encode_run(&text[run_start..], after_special, &mut ids);
                }
            }
        }
        Ok(ids)
    }

    /// The raw bytes a token stands for.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Decode ids to text (invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.token_bytes(i).to_vec())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }
}
