"""Copy a llama GGUF file and add a `rope_freqs.weight` tensor, as Llama 3.1's converter writes
its llama3 RoPE scaling: per-frequency divisors from (factor, low/high frequency factors, the
original context). Uses gguf-py (`gguf`), llama.cpp's own GGUF package.

  with_rope_freqs.py SRC DST FACTOR ORIGINAL_CONTEXT
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


def main(src, dst, factor, original_context):
    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(dst, arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    base = float(r.fields[f"{arch}.rope.freq_base"].contents())
    heads = int(r.fields[f"{arch}.attention.head_count"].contents())
    hidden = int(r.fields[f"{arch}.embedding_length"].contents())
    w.add_tensor("rope_freqs.weight", llama3_factors(base, hidden // heads, factor, original_context))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
