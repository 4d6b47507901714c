"""The official `openai` client asks a graph served by the native engine a question
whose answer this model knows; run by tests/tests/native.rs with the frontend's base URL.

Greedy decoding (temperature 0) with the system prompt the example graphs pin, streamed
and not, with and without log-probabilities; prints the answer as `ANSWER: ...` (the Rust
test compares graphs by it) and closes with `N passed, N failed`.
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


def logprobs_whole():
    r = client.chat.completions.create(
        model="smollm2",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens, (len(content), r.usage)
    for t in content:
        assert t.logprob <= 0.0, t
        tops = [a.logprob for a in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True), t
        # Greedy: the chosen token is the most likely one.
        assert t.top_logprobs[0].token == t.token, t
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6, t
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token, t
    # Every generated token is listed, the end-of-turn token too; the others spell the text.
    text = "".join(t.token for t in content if not t.token.startswith("<|"))
    assert text == r.choices[0].message.content, (text, r.choices[0].message.content)
    # A model this small is sure of the capital.
    paris = [t for t in content if "Paris" in t.token]
    assert paris and paris[0].logprob > -1.0, content


def logprobs_streamed_and_completions():
    chunks = client.chat.completions.create(
        model="smollm2",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    tokens, usage = [], None
    for c in chunks:
        if c.usage:
            usage = c.usage
        if c.choices and c.choices[0].logprobs:
            tokens.extend(c.choices[0].logprobs.content)
    assert usage and len(tokens) == usage.completion_tokens, (len(tokens), usage)
    assert all(t.top_logprobs == [] for t in tokens)
    r = client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4, lp
    assert all(len(t) == 2 for t in lp.top_logprobs), lp
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset), lp


check("a whole answer names Paris", whole)
check("a streamed answer names Paris", streamed)
check("log-probabilities of a whole answer", logprobs_whole)
check("log-probabilities streamed, and on completions", logprobs_streamed_and_completions)
failed = sum(1 for _, e in results if e is not None)
print(f"{len(results) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
