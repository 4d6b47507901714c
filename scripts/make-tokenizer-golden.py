#!/usr/bin/env python3
"""Makes the golden files the preprocessor's tests compare against.

Token ids come from an independent reference, llama.cpp (through llama-cpp-python), so
our tokenizer, built from the same GGUF metadata with the Hugging Face `tokenizers`
crate, is checked against another implementation, not against itself. The chat
template golden is rendered with Python's jinja2 the way `transformers` renders chat
templates (sandboxed, trim_blocks, lstrip_blocks), and its ids come from llama.cpp too.

Setup (llama-cpp-python builds llama.cpp from source, several minutes on 2 cores):

    python3 -m venv /tmp/golden-venv
    CMAKE_ARGS="-DGGML_NATIVE=OFF" /tmp/golden-venv/bin/pip install llama-cpp-python==0.3.36
    /tmp/golden-venv/bin/python scripts/make-tokenizer-golden.py "$(scripts/fetch-model.sh)"

Writes nodes/preprocessor/tests/data/{tokenizer,chat_template}_golden.json.
"""

import hashlib
import json
import os
import sys
from importlib.metadata import version

import jinja2.sandbox
from llama_cpp import Llama

OUT_DIR = os.path.join(os.path.dirname(__file__), "..", "nodes", "preprocessor", "tests", "data")

# Every class of text a byte-level BPE with a digits pre-tokenizer can get wrong.
PROMPTS = [
    "",
    "Hello",
    "Hello, world!",
    " Hello",
    "  two leading spaces",
    "trailing space ",
    "The quick brown fox jumps over the lazy dog.",
    "1234567890",
    "3.14159 and 2,718 and -42",
    "Phone: +1 (555) 123-4567",
    "Year 2024, 10000 items, agent 007",
    "tabs\tand\t\ttabs",
    "line1\nline2\n\nline4",
    "\n\n\n",
    "   \n   \n",
    "a    b     c",
    "\r\nWindows line\r\n",
    "def add(a, b):\n    return a + b\n",
    'fn main() {\n    println!("{}", 1 + 2);\n}',
    '{"key": [1, 2, {"x": null}], "y": "z"}',
    '<div class="a">&amp; &lt;</div>',
    "I love 🦀 and 🚀!",
    "👩‍👩‍👧‍👦 family",
    "Flags: 🇫🇷🇯🇵",
    "你好，世界！",
    "こんにちは、世界。カタカナ",
    "안녕하세요",
    "Café, naïve, résumé, Übermäßig",
    "L'Étoile de la Marseillaise",
    "Καλημέρα κόσμε",
    "Привет, мир",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "∑ x² ≤ ∞, α+β=γ",
    "I'm, you're, it's, we'll, they'd, I've",
    "ALL CAPS and MiXeD cAsE",
    "!!!???...;;;:::---___",
    "https://example.com/path?q=1&r=two#frag",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|im_end|>more",
    "<|im_start|partial",
    "Once upon a time, in a land far away, there lived 3 dragons named Ember, "
    "Frost & Gale; each guarded 1,000,000 coins.",
]

SYSTEM_PROMPT = "You are a helpful AI assistant."

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Sky colour?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And grass?  \n"},
    ],
    [{"role": "user", "content": "Écris « bonjour » 👋\n\nthen 2+2=?"}],
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(name, header, key, items):
    """Writes `header` plus `key: items` with one item per line: reviewable diffs."""
    body = json.dumps(header, ensure_ascii=False, indent=1)[:-2]
    lines = ",\n".join("  " + json.dumps(i, ensure_ascii=False) for i in items)
    with open(os.path.join(OUT_DIR, name), "w", encoding="utf-8") as f:
        f.write(f'{body},\n "{key}": [\n{lines}\n ]\n}}\n')


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} MODEL.gguf")
    model = sys.argv[1]
    llm = Llama(model_path=model, vocab_only=True, verbose=False)

    def tokenize(text):
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    source = {
        "model": os.path.basename(model),
        "model_sha256": sha256(model),
        "reference": f"llama-cpp-python {version('llama-cpp-python')} "
        "Llama(vocab_only=True).tokenize(text, add_bos=False, special=True)",
    }
    os.makedirs(OUT_DIR, exist_ok=True)

    cases = [{"text": t, "ids": tokenize(t)} for t in PROMPTS]
    write_json("tokenizer_golden.json", {"source": source}, "cases", cases)

    meta = llm.metadata
    template_src = meta["tokenizer.chat_template"]
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(template_src)
    bos = llm.detokenize([llm.token_bos()], special=True).decode()
    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    rendered = []
    for messages in CONVERSATIONS:
        # The preprocessor's default system prompt goes first when there is none.
        full = messages
        if not any(m["role"] == "system" for m in messages):
            full = [{"role": "system", "content": SYSTEM_PROMPT}] + messages
        text = template.render(
            messages=full, add_generation_prompt=True, bos_token=bos, eos_token=eos
        )
        rendered.append({"messages": messages, "rendered": text, "ids": tokenize(text)})
    source["renderer"] = f"jinja2 {version('jinja2')} sandboxed, trim_blocks, lstrip_blocks"
    header = {"source": source, "system_prompt": SYSTEM_PROMPT}
    write_json("chat_template_golden.json", header, "conversations", rendered)
    print(f"wrote {len(cases)} tokenizer cases and {len(rendered)} conversations to {OUT_DIR}")


if __name__ == "__main__":
    main()
