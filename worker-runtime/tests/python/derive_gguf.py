"""Derive test models from a llama GGUF file with gguf-py (`gguf`), llama.cpp's own GGUF package.

  derive_gguf.py rope-freqs SRC DST FACTOR ORIGINAL_CONTEXT
      add a `rope_freqs.weight` tensor, as Llama 3.1's converter writes its llama3 RoPE
      scaling: per-frequency divisors from (factor, low/high frequency factors, the original
      context)
  derive_gguf.py qwen2 SRC DST
      the same weights as a `qwen2` file: metadata under `qwen2.`, the `qwen2` pre-tokenizer,
      and random Q/K/V biases (seeded); llama.cpp runs it with Qwen2's NeoX-style RoPE
  derive_gguf.py spm SRC DST
      the same weights with a SentencePiece vocabulary (`tokenizer.ggml.model = llama`, as
      Llama 2 and Mistral files have): the byte-level BPE pieces as text with `▁` for spaces,
      scored by rank, 256 `<0xXX>` byte pieces in place of ids 3..259, no merges
  derive_gguf.py window SRC DST LAYERS [WINDOW]
      the first LAYERS blocks only, and with WINDOW a sliding attention window
      (`llama.attention.sliding_window`, as Mistral's config has)
"""
import math
import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter


def llama3_factors(base, head_dim, factor, original_context, low=1.0, high=4.0):
    """Divisors per rotary pair, by the llama3 rule: short wavelengths unchanged, long ones
    divided by `factor`, a smooth ramp between."""
    low_wavelen = original_context / low
    high_wavelen = original_context / high
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / (base ** (i / head_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original_context / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def copy(src, dst, arch=None, rename=lambda key: key, overrides=None, drop=(),
         keep=lambda tensor: True):
    """A writer holding `src`'s metadata (keys renamed, values overridden, some dropped) and
    the tensors `keep` admits."""
    r = GGUFReader(src)
    arch = arch or r.fields["general.architecture"].contents()
    w = GGUFWriter(dst, arch)
    overrides = overrides or {}
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        key = rename(name)
        w.add_key_value(key, overrides.get(key, field.contents()), vtype, sub_type=sub)
    for t in r.tensors:
        if keep(t.name):
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    return r, w


def finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def rope_freqs(src, dst, factor, original_context):
    r, w = copy(src, dst)
    arch = r.fields["general.architecture"].contents()
    base = float(r.fields[f"{arch}.rope.freq_base"].contents())
    heads = int(r.fields[f"{arch}.attention.head_count"].contents())
    hidden = int(r.fields[f"{arch}.embedding_length"].contents())
    factors = llama3_factors(base, hidden // heads, factor, original_context)
    w.add_tensor("rope_freqs.weight", factors)
    finish(w)


def qwen2(src, dst):
    rename = lambda key: "qwen2." + key[len("llama."):] if key.startswith("llama.") else key
    r, w = copy(src, dst, "qwen2", rename, {"tokenizer.ggml.pre": "qwen2"})
    layers = int(r.fields["llama.block_count"].contents())
    hidden = int(r.fields["llama.embedding_length"].contents())
    heads = int(r.fields["llama.attention.head_count"].contents())
    kv_heads = int(r.fields["llama.attention.head_count_kv"].contents())
    kv = hidden // heads * kv_heads
    rng = np.random.default_rng(7)
    for layer in range(layers):
        for name, n in (("attn_q", hidden), ("attn_k", kv), ("attn_v", kv)):
            bias = rng.normal(0.0, 0.5, n).astype(np.float32)
            w.add_tensor(f"blk.{layer}.{name}.bias", bias)
    finish(w)


def gpt2_byte_decoder():
    """GPT-2's printable character -> byte table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def spm(src, dst):
    r = GGUFReader(src)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    dec = gpt2_byte_decoder()
    pieces, kinds, seen = [], [], set()
    for i, (t, kind) in enumerate(zip(tokens, types)):
        if 3 <= i < 259:
            piece, kind = f"<0x{i - 3:02X}>", 6
        elif kind == 3:
            piece, kind = t, 3
        else:
            try:
                piece = bytes(dec[c] for c in t).decode("utf-8").replace(" ", "\u2581")
                kind = 1
            except (KeyError, UnicodeDecodeError):
                piece = None
            if piece is None or piece in seen:
                piece, kind = f"<unused{i}>", 5
        seen.add(piece)
        pieces.append(piece)
        kinds.append(kind)
    overrides = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": pieces,
        "tokenizer.ggml.token_type": kinds,
    }
    _, w = copy(src, dst, overrides=overrides,
                drop=("tokenizer.ggml.merges", "tokenizer.ggml.pre", "tokenizer.chat_template",
                      "tokenizer.ggml.add_space_prefix"))
    scores = [-float(i) for i in range(len(pieces))]
    w.add_key_value("tokenizer.ggml.scores", scores, GGUFValueType.ARRAY,
                    sub_type=GGUFValueType.FLOAT32)
    w.add_key_value("tokenizer.ggml.add_space_prefix", True, GGUFValueType.BOOL)
    finish(w)


def window(src, dst, layers, size=None):
    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    keep = lambda name: not name.startswith("blk.") or int(name.split(".")[1]) < layers
    _, w = copy(src, dst, overrides={f"{arch}.block_count": layers}, keep=keep)
    if size is not None:
        w.add_key_value(f"{arch}.attention.sliding_window", size, GGUFValueType.UINT32)
    finish(w)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "rope-freqs":
        rope_freqs(args[0], args[1], float(args[2]), float(args[3]))
    elif cmd == "qwen2":
        qwen2(args[0], args[1])
    elif cmd == "spm":
        spm(args[0], args[1])
    elif cmd == "window":
        window(args[0], args[1], int(args[2]), int(args[3]) if len(args) > 3 else None)
    else:
        sys.exit(f"unknown command {cmd!r}")
