"""llama.cpp's side of the fidelity tests (llama-cpp-python 0.3.36, built here).

  llama_ref.py quantize SRC DST FTYPE        requantize SRC with llama.cpp's quantizer
  llama_ref.py logprobs MODEL PROMPTS.json   JSON: per prompt, the token ids, the first greedy
                                             token and the top-k log-probabilities, both with
                                             the prompt evaluated as one batch and one token
                                             at a time (llama.cpp's two arithmetic paths)
"""
import ctypes
import json
import sys

import llama_cpp
import numpy as np

FTYPES = {
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q5_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0,
    "Q5_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1,
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q6_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
}


def quantize(src, dst, ftype):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama_model_quantize({src} -> {dst}, {ftype}) failed: {rc}")


def last_logits(llm):
    """The last evaluated token's logits (llama-cpp-python 0.3.36 keeps `scores` only with
    logits_all, which would change llama.cpp's batched arithmetic path)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()


def log_softmax(logits):
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def logprobs(model, prompts_file, k=5):
    prompts = json.load(open(prompts_file))
    llm = llama_cpp.Llama(model_path=model, n_ctx=2048, n_batch=512, n_threads=2,
                          n_threads_batch=2, verbose=False)
    out = []
    for text in prompts:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        batched = log_softmax(last_logits(llm))
        llm.reset()
        for t in ids:
            llm.eval([t])
        stepwise = log_softmax(last_logits(llm))
        best = np.argsort(-batched)[:k]
        out.append({
            "prompt": text,
            "tokens": [int(t) for t in ids],
            "first": int(best[0]),
            "first_stepwise": int(np.argmax(stepwise)),
            # (token, logprob batched, logprob token by token) for the batched top k.
            "top": [[int(i), float(batched[i]), float(stepwise[i])] for i in best],
        })
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "quantize":
        quantize(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "logprobs":
        logprobs(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"unknown command {cmd!r}")
