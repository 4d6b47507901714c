#!/usr/bin/env python3
"""Makes the golden greedy outputs the native engine's tests compare against.

The reference is llama.cpp itself, through the llama-cpp-python 0.3.36 bindings, on
the same GGUF the engine loads (SmolLM2-135M-Instruct Q4_1). For 8 chat prompts
(ChatML, fixed system prompt) it records the prompt token ids (tokenized by llama.cpp,
so the consumer needs no tokenizer) and the greedy continuation of 32 tokens with EOS
ignored (generation goes on after <|im_end|>): per step the chosen id, its logit, and
the margin to the runner-up logit, plus the top-10 (id, logit) at the first 4 steps.

Usage (the bindings are loaded against the llama.cpp that scripts/llamacpp.sh builds,
so nothing is compiled twice; the first run builds it, ~10 min on 2 cores):

    scripts/llamacpp.sh python scripts/make-native-golden.py [GGUF]

GGUF defaults to $DYNAMO_MODEL_GGUF, else the output of scripts/fetch-model.sh.
A plain `pip install llama-cpp-python==0.3.36` works too (same llama.cpp commit),
but its default build flags differ, so logits may differ in the last digits.

Writes nodes/native/tests/data/llamacpp_greedy.json.
"""

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys

import numpy as np
import llama_cpp
from llama_cpp import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "nodes", "native", "tests", "data", "llamacpp_greedy.json")

SYSTEM = "You are a helpful AI assistant."
N_GEN = 32
N_TOP = 10
TOP_STEPS = 4
THREADS = 1

LONG_TEXT = (
    "The city library announced on Monday that it will extend its opening hours starting next "
    "month. From the first of the month, the main branch will open at eight in the morning "
    "instead of ten, and it will close at nine in the evening on weekdays. On Saturdays the "
    "library will stay open until six, and on Sundays it will open from noon until five. The "
    "director said the change follows a survey of more than two thousand residents, most of whom "
    "asked for earlier mornings and later evenings so that they could visit before or after work. "
    "To pay for the longer hours, the library will hire six new part-time staff members and will "
    "move some of its budget from printed newspapers to digital subscriptions, which are cheaper "
    "and, according to the survey, more popular. The children's section will also get a new "
    "reading corner with soft chairs, and there will be a homework club every weekday afternoon "
    "from three to five, run by volunteers from the local high school. Some residents were "
    "worried that the quiet study rooms would become crowded, so the library will introduce an "
    "online booking system for them, with a limit of three hours per person per day. The director "
    "thanked the city council for its support and said that she hopes the new schedule will bring "
    "more families, students and older residents into the building. A small celebration with music "
    "and free coffee is planned for the first morning of the new hours."
)

# (name, [(role, content), ...]); the system message is prepended to each.
PROMPTS = [
    ("capital", [("user", "What is the capital of France?")]),
    ("two_sentences", [("user", "I have a small balcony that gets sun all afternoon. "
                                "Which vegetables could I grow there in pots during the summer?")]),
    ("list", [("user", "List five common fruits, one per line.")]),
    ("code_digits", [("user", "What does this Python code print?\n\n"
                              "x = [3, 14, 15, 92]\nprint(sum(x) * 2, len(x))")]),
    ("long_300", [("user", LONG_TEXT + "\n\nSummarize the announcement above in one sentence.")]),
    ("multi_turn", [
        ("user", "Hi! My name is Alice and I live in Lisbon."),
        ("assistant", "Hello Alice! It's nice to meet you. How can I help you today?"),
        ("user", "Which city do I live in, and what is my name?"),
    ]),
    ("unicode", [("user", "Translate \"good morning, café owner\" into Spanish and French. 🙂")]),
    ("short", [("user", "Hi")]),
]


def chatml(messages):
    text = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    for role, content in messages:
        text += f"<|im_start|>{role}\n{content}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def last_logits(llm):
    """Logits of the last evaluated position, read straight from llama.cpp.

    With logits_all=False, Llama.eval() does NOT fill llm.scores (it is left as
    allocated), so read llama_get_logits_ith(ctx, -1): the last output of the last
    llama_decode, which is the last token of the batch (the only one with logits on).
    """
    n_vocab = llm.n_vocab()
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    if not ptr:
        raise RuntimeError("llama_get_logits_ith returned NULL")
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float32).copy()


def top_k(logits, k):
    # Stable: ties by lower id first, like argmax.
    order = np.lexsort((np.arange(len(logits)), -logits))[:k]
    return [[int(i), float(logits[i])] for i in order]


def run_prompt(llm, prompt_ids):
    llm.reset()
    llm.eval(prompt_ids)
    greedy, top10 = [], []
    for step in range(N_GEN):
        logits = last_logits(llm)
        best = int(np.argmax(logits))
        second = float(np.max(np.delete(logits, best)))
        greedy.append({"id": best, "logit": float(logits[best]), "margin": float(logits[best]) - second})
        if step < TOP_STEPS:
            top10.append(top_k(logits, N_TOP))
        llm.eval([best])  # EOS ignored: keep going after <|im_end|>
    return greedy, top10


def check_logits_path(model, prompt_ids, got):
    """Cross-check last_logits() against a logits_all=True context (llm.scores rows)."""
    ref = Llama(model_path=model, n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS,
                n_batch=512, logits_all=True, verbose=False)
    ref.eval(prompt_ids)
    row = np.array(ref.scores[ref.n_tokens - 1], dtype=np.float32)
    diff = float(np.max(np.abs(row - got)))
    ref.close()
    return diff, int(np.argmax(row))


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DYNAMO_MODEL_GGUF")
    if not model:
        model = subprocess.check_output([os.path.join(HERE, "fetch-model.sh")], text=True).strip()
    model = os.path.abspath(model)

    llm = Llama(model_path=model, n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS,
                n_batch=512, logits_all=False, verbose=False)

    out_prompts = []
    for name, messages in PROMPTS:
        text = chatml(messages)
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        greedy, top10 = run_prompt(llm, ids)
        out_prompts.append({"name": name, "prompt_ids": ids, "greedy": greedy, "top10": top10})
        gen_text = llm.detokenize([g["id"] for g in greedy], special=True).decode("utf-8", "replace")
        min_margin = min(g["margin"] for g in greedy)
        print(f"{name:14s} prompt {len(ids):3d} tok, min margin {min_margin:.4f}: {gen_text!r}",
              file=sys.stderr)

    # The logits path: the first generated position of the first prompt, computed
    # again in a logits_all=True context, must agree.
    first = out_prompts[0]
    llm.reset()
    llm.eval(first["prompt_ids"])
    mine = last_logits(llm)
    diff, ref_best = check_logits_path(model, first["prompt_ids"], mine)
    print(f"logits check: max |get_logits_ith(-1) - scores[n-1] (logits_all)| = {diff:.3g}, "
          f"argmax {int(np.argmax(mine))} vs {ref_best}", file=sys.stderr)
    if ref_best != first["greedy"][0]["id"] or diff > 1e-2:
        sys.exit("logits path check failed")

    sysinfo = llama_cpp.llama_print_system_info().decode().strip()
    vendor_commit = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
    made_with = (
        f"llama-cpp-python {llama_cpp.__version__} (vendored llama.cpp {vendor_commit[:9]}, ggml 0.25.3), "
        f"libllama from {os.environ.get('LLAMA_CPP_LIB_PATH', 'the llama_cpp package')} "
        f"(scripts/llamacpp.sh: Release, GGML_NATIVE=ON, no OpenMP); system_info: {sysinfo}; "
        f"CPU: {cpu_name()}; numpy {np.__version__}, Python {platform.python_version()}; "
        f"Llama(n_ctx=2048, n_threads=1, n_threads_batch=1, n_batch=512, logits_all=False), "
        f"prompt evaluated in one llm.eval() batch, then one token per llm.eval(); logits from "
        f"llama_get_logits_ith(ctx, -1); greedy = argmax (lowest id on ties), EOS ignored, {N_GEN} tokens; "
        f"command: scripts/llamacpp.sh python scripts/make-native-golden.py; "
        f"date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}"
    )
    doc = {
        "made_with": made_with,
        "model": os.path.basename(model),
        "model_sha256": sha256_file(model),
        "system_prompt": SYSTEM,
        "threads": THREADS,
        "n_gen": N_GEN,
        "prompts": out_prompts,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {os.path.normpath(OUT)}", file=sys.stderr)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
