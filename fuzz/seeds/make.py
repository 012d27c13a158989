"""Writes the committed seed corpus of every fuzz target (fuzz/seeds/<target>/) and the
dictionaries (fuzz/seeds/<target>.dict). Deterministic; run from anywhere:

    python3 fuzz/seeds/make.py

The seeds follow each target's input format (see the header of fuzz/fuzz_targets/<target>.rs).
"""
import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- wire_frame: length-prefixed frames -------------------------------------------------------

def frame(kind, body=b""):
    b = bytes([kind]) + body
    return struct.pack("<I", len(b)) + b


def f32s(v):
    return struct.pack("<I", len(v)) + b"".join(struct.pack("<f", x) for x in v)


def wire():
    step = (struct.pack("<Q", 3) + struct.pack("<I", 2) + struct.pack("<QI", 1, 2)
            + struct.pack("<QI", 9, 1) + struct.pack("<I", 1) + struct.pack("<Q", 4)
            + f32s([0.5] * 6))
    frames = {
        "heartbeat": frame(0),
        "ready": frame(1),
        "step": frame(2, step),
        "logits": frame(3, struct.pack("<QI", 7, 2) + f32s([0.25, 3.0, 4.0, 5.0])),
        "reduce": frame(4, f32s([1.5, -2.0])),
        "shutdown": frame(5),
        "abort": frame(6, "stage 2 died: ünïcödé".encode()),
    }
    for name, f in frames.items():
        write("wire_frame", name, f)
    write("wire_frame", "stream", b"".join(frames.values()))


# --- handshake ------------------------------------------------------------------------------

def handshake():
    hello = b"WFLX" + bytes([1]) + struct.pack("<iII", 0, 0, 1) + bytes(range(32))
    write("handshake", "accept-hello", b"\x00" + hello + bytes(32))
    write("handshake", "accept-other-group", b"\x00" + hello[:5] + struct.pack("<i", 7) + hello[9:])
    write("handshake", "dial-reply", b"\x01" + bytes(range(64)) + b"\x01")
    # Meddled: groups, stage, rank, same secret, then flips.
    write("handshake", "clean", b"\x02" + b"\x00\x00" + b"\x01\x00\x02\x00" + b"\x01")
    write("handshake", "flip-rank", b"\x02" + b"\x00\x00\x00\x00\x01\x00\x01" + b"\x01\x0a\x01")
    write("handshake", "flip-proof", b"\x03" + b"\x05\x05\x03\x00\x00\x00\x01" + b"\x01\x32\x80")


# --- http_request ---------------------------------------------------------------------------

def http():
    comp = [
        {"model": "tiny", "prompt": "the"},
        {"model": "tiny", "prompt": ["in the"], "max_tokens": 3, "temperature": 0,
         "top_p": 0.5, "top_k": 4, "seed": 7, "stop": ["e", "\n"], "logprobs": 2},
        {"model": "tiny", "prompt": "the", "stream": True, "stream_options": {"include_usage": True},
         "max_tokens": 4, "repetition_penalty": 1.3, "n": 1},
        {"model": "other", "prompt": "x"},
        {"model": "tiny", "prompt": "", "echo": True, "frequency_penalty": 1},
    ]
    chat = [
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        {"model": "tiny", "messages": [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": [{"type": "text", "text": "the"}]},
                                       {"role": "assistant", "content": None},
                                       {"role": "developer", "content": "<|im_end|>"}],
         "stream": True, "logprobs": True, "top_logprobs": 3, "max_completion_tokens": 5},
        {"model": "tiny", "messages": [], "top_logprobs": 2},
    ]
    for i, b in enumerate(comp):
        write("http_request", f"completion-{i}", b"\x00" + json.dumps(b).encode())
    for i, b in enumerate(chat):
        write("http_request", f"chat-{i}", b"\x01" + json.dumps(b).encode())
    write("http_request", "not-json", b"\x03{\"model\": ")
    keys = ["model", "prompt", "messages", "role", "content", "type", "text", "max_tokens",
            "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
            "stream_options", "include_usage", "logprobs", "top_logprobs", "echo", "n",
            "repetition_penalty", "frequency_penalty", "presence_penalty", "tiny", "user",
            "system", "assistant", "developer", "tool", "<|im_start|>", "<|im_end|>"]
    toks = [json.dumps(k) for k in keys] + ["true", "false", "null", "1e308", "-1", "0.5",
                                            "18446744073709551615", "[", "]", "{", "}", ":", ","]
    with open(os.path.join(HERE, "http_request.dict"), "w") as f:
        for t in toks:
            f.write('"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"\n')


# --- chat_template (arbitrary-structured; any bytes are an input) ---------------------------

def chat():
    write("chat_template", "chatml", b"\x00\x00user\x00hello\x00")
    write("chat_template", "llama3", b"\x00\x01<s>\x00</s>\x00user\x00  hi  \x00assistant\x00ok")
    write("chat_template", "source",
          b"\x01{% for m in messages %}{{ m.role | upper }}: {{ m.content }}{% endfor %}\x00")
    write("chat_template", "loop", b"\x01{% for i in range(3) %}{{ i }}{% endfor %}{{ raise_exception('x') }}")
    toks = ["{%", "%}", "{{", "}}", "{#", "#}", "for", "in", "endfor", "if", "elif", "else",
            "endif", "set", "macro", "endmacro", "call", "filter", "namespace", "loop.index0",
            "messages", "message['role']", "message['content']", "bos_token", "eos_token",
            "add_generation_prompt", "raise_exception(", "range(", "|trim", "|tojson", "~", "*",
            "+", "is defined", "not", "and", "or"]
    with open(os.path.join(HERE, "chat_template.dict"), "w") as f:
        for t in toks:
            f.write('"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"\n')


# --- gguf_load ------------------------------------------------------------------------------

def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


class Gguf:
    def __init__(self):
        self.kv = []
        self.tensors = []

    def val(self, key, ty, payload):
        self.kv.append(gstr(key) + struct.pack("<I", ty) + payload)
        return self

    def s(self, key, v):
        return self.val(key, 8, gstr(v))

    def u32(self, key, v):
        return self.val(key, 4, struct.pack("<I", v))

    def f32(self, key, v):
        return self.val(key, 6, struct.pack("<f", v))

    def arr(self, key, ity, items):
        body = struct.pack("<IQ", ity, len(items))
        for it in items:
            body += gstr(it) if ity == 8 else struct.pack({5: "<i", 6: "<f", 4: "<I"}[ity], it)
        return self.val(key, 9, body)

    def tensor(self, name, dims, ty, data):
        self.tensors.append((name, dims, ty, data))
        return self

    def build(self):
        out = b"GGUF" + struct.pack("<IQQ", 3, len(self.tensors), len(self.kv)) + b"".join(self.kv)
        data = b""
        for name, dims, ty, d in self.tensors:
            data += bytes((-len(data)) % 32)
            out += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", x) for x in dims)
            out += struct.pack("<IQ", ty, len(data))
            data += d
        out += bytes((-len(out)) % 32)
        return out + data


def f32data(n, seed):
    x = seed
    out = b""
    for _ in range(n):
        x = (x * 1103515245 + 12345) % (1 << 31)
        out += struct.pack("<f", ((x % 2001) - 1000) / 4000.0)
    return out


def f16data(n, seed):
    return b"".join(struct.pack("<e", struct.unpack("<f", f32data(1, seed + i))[0]) for i in range(n))


def q8_0data(rows, cols, seed):
    """Q8_0 blocks: an f16 scale of 1/64 and 32 small int8 values each."""
    x = seed
    out = b""
    for _ in range(rows * cols // 32):
        out += struct.pack("<e", 1 / 64)
        for _ in range(32):
            x = (x * 1103515245 + 12345) % (1 << 31)
            out += struct.pack("<b", (x % 33) - 16)
    return out


def tiny_model(heads=2, hd=16, ffn=32, mat_ty=0, tied=True):
    """A llama model that loads whole and splits by the rules (whole 32-wide blocks per rank):
    one layer, `heads` heads of `hd`, one KV head, a six-token byte-level BPE vocabulary."""
    hidden, kv = heads * hd, 1
    tokens = ["a", "b", "ab", "Ġ", "<|im_start|>", "<|im_end|>"]
    g = Gguf()
    g.s("general.architecture", "llama")
    for k, v in [("block_count", 1), ("context_length", 32), ("embedding_length", hidden),
                 ("feed_forward_length", ffn), ("attention.head_count", heads),
                 ("attention.head_count_kv", kv)]:
        g.u32("llama." + k, v)
    g.f32("llama.rope.freq_base", 10000.0).f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    g.s("tokenizer.ggml.model", "gpt2").s("tokenizer.ggml.pre", "smollm")
    g.arr("tokenizer.ggml.tokens", 8, tokens)
    g.arr("tokenizer.ggml.token_type", 5, [1, 1, 1, 1, 3, 3])
    g.arr("tokenizer.ggml.merges", 8, ["a b"])
    g.u32("tokenizer.ggml.bos_token_id", 4).u32("tokenizer.ggml.eos_token_id", 5)
    g.s("tokenizer.chat_template",
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    v = len(tokens)
    seed = iter(range(1, 100))
    g.tensor("token_embd.weight", [hidden, v], 0, f32data(hidden * v, next(seed)))
    mats = [("attn_q", hidden, heads * hd), ("attn_k", hidden, kv * hd), ("attn_v", hidden, kv * hd),
            ("attn_output", heads * hd, hidden), ("ffn_gate", hidden, ffn), ("ffn_up", hidden, ffn),
            ("ffn_down", ffn, hidden)]
    g.tensor("blk.0.attn_norm.weight", [hidden], 0, f32data(hidden, next(seed)))
    g.tensor("blk.0.ffn_norm.weight", [hidden], 0, f32data(hidden, next(seed)))
    for name, cols, rows in mats:
        data = {0: lambda: f32data(cols * rows, next(seed)),
                1: lambda: f16data(cols * rows, next(seed)),
                8: lambda: q8_0data(rows, cols, next(seed))}[mat_ty]()
        g.tensor(f"blk.0.{name}.weight", [cols, rows], mat_ty, data)
    g.tensor("output_norm.weight", [hidden], 0, f32data(hidden, next(seed)))
    if not tied:
        g.tensor("output.weight", [hidden, v], 1, bytes(2 * hidden * v))
    return g.build()


def every_value_type():
    g = Gguf()
    g.val("u8", 0, b"\x07").val("i8", 1, b"\xff").val("u16", 2, struct.pack("<H", 300))
    g.val("i16", 3, struct.pack("<h", -300)).u32("u32", 70000).val("i32", 5, struct.pack("<i", -7))
    g.f32("f32", 1.5).val("bool", 7, b"\x01").s("str", "héllo")
    g.val("u64", 10, struct.pack("<Q", 1 << 40)).val("i64", 11, struct.pack("<q", -5))
    g.val("f64", 12, struct.pack("<d", 2.25))
    g.arr("strs", 8, ["a", "bc"])
    g.val("nested", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 5, 2) + struct.pack("<ii", 1, 2))
    g.u32("general.alignment", 32)
    g.tensor("f32", [4, 2], 0, bytes(32)).tensor("f16", [8], 1, bytes(16))
    g.tensor("q8", [32, 2], 8, bytes(68)).tensor("q4k", [256], 12, bytes(144))
    return g.build()


def gguf():
    write("gguf_load", "raw-every-value-type", b"\x00" + every_value_type())
    # Raw mode: the first byte is even; (byte / 2) % 3 + 1 is the TP, (byte / 8) % 3 + 1 the PP,
    # bit 7 asks for f32 weights.
    write("gguf_load", "raw-tiny-model", b"\x00" + tiny_model(mat_ty=1))
    write("gguf_load", "raw-tiny-model-q8-untied-tp2", b"\x86" + tiny_model(
        heads=2, hd=32, ffn=64, mat_ty=8, tied=False))
    # Structured mode (odd first byte): any bytes describe a model (see ModelSpec).
    write("gguf_load", "spec-zeros", b"\x01" + bytes(64))
    write("gguf_load", "spec-counting", b"\x01" + bytes(range(256)))
    write("gguf_load", "spec-qwen2", b"\x03" + bytes([1, 1, 0, 0, 1, 1]) + bytes(40))
    keys = ["general.architecture", "general.alignment", "llama", "qwen2", ".block_count",
            ".context_length", ".embedding_length", ".feed_forward_length",
            ".attention.head_count", ".attention.head_count_kv", ".rope.freq_base",
            ".rope.scaling.type", ".rope.scaling.factor", ".vocab_size", "linear",
            ".attention.layer_norm_rms_epsilon", "tokenizer.ggml.model", "tokenizer.ggml.pre",
            "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores",
            "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id", "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template", "gpt2", "smollm",
            "token_embd.weight", "output.weight", "output_norm.weight", "rope_freqs.weight",
            "blk.0.", "attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
            "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
            "ffn_down.weight", "attn_q.bias", "GGUF"]
    with open(os.path.join(HERE, "gguf_load.dict"), "w") as f:
        for t in keys:
            f.write('"' + t + '"\n')


if __name__ == "__main__":
    for t in ["wire_frame", "handshake", "http_request", "chat_template", "gguf_load"]:
        shutil.rmtree(os.path.join(HERE, t), ignore_errors=True)
    wire()
    handshake()
    http()
    chat()
    gguf()
