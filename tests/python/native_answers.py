"""The official `openai` client asks a graph served by the native engine a question
whose answer this model knows; run by tests/tests/native.rs with the frontend's base URL.

Greedy decoding (temperature 0) with the system prompt the example graphs pin, streamed
and not; prints the answer as `ANSWER: ...` (the Rust test compares graphs by it) and
closes with `N passed, N failed`.
"""

import sys

import openai

BASE = sys.argv[1].rstrip("/") + "/v1"
client = openai.OpenAI(base_url=BASE, api_key="unused", max_retries=0, timeout=120)
MESSAGES = [
    {"role": "system", "content": "You are a helpful AI assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
results = []


def check(name, fn):
    try:
        fn()
        results.append((name, None))
        print(f"ok    {name}")
    except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
        results.append((name, e))
        print(f"FAIL  {name}: {type(e).__name__}: {e}")


def whole():
    r = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=32, temperature=0
    )
    text = r.choices[0].message.content
    print(f"ANSWER: {text}")
    assert "Paris" in text, text
    assert r.choices[0].finish_reason == "stop", r.choices[0].finish_reason
    assert r.usage.prompt_tokens > 20, r.usage


def streamed():
    chunks = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=32, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text, text


check("a whole answer names Paris", whole)
check("a streamed answer names Paris", streamed)
failed = sum(1 for _, e in results if e is not None)
print(f"{len(results) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
