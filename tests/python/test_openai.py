"""The official `openai` client against a graph served by `dynamo graph up`.

Run by tests/tests/serve.rs with the frontend's base URL as the only argument; prints one
line per check and a closing `N passed, N failed` line, and exits non-zero on a failure.
"""

import sys

import openai

BASE = sys.argv[1].rstrip("/") + "/v1"
client = openai.OpenAI(base_url=BASE, api_key="unused", max_retries=0, timeout=60)
MODEL = "smollm2"
SYSTEM = {"role": "system", "content": "You are a helpful AI assistant."}
results = []


def check(name, fn):
    try:
        fn()
        results.append((name, None))
        print(f"ok    {name}")
    except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
        results.append((name, e))
        print(f"FAIL  {name}: {type(e).__name__}: {e}")


def models():
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL], ids


def chat_whole():
    r = client.chat.completions.create(
        model=MODEL,
        messages=[SYSTEM, {"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
    )
    assert r.object == "chat.completion", r
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason
    assert r.usage.completion_tokens <= 16 and r.usage.prompt_tokens > 10, r.usage


def chat_stream():
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to ten."}],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, finish, usage, chunks = "", None, None, 0
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert chunks >= 3, chunks
    assert finish == "length", finish
    assert usage is not None and usage.completion_tokens == 24, usage
    assert text, "no text streamed"


def completions():
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, extra_body={"ignore_eos": True})
    assert r.object == "text_completion"
    assert r.usage.completion_tokens == 8, r.usage
    assert r.choices[0].text


def completions_stream():
    n = 0
    for chunk in client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, stream=True, extra_body={"ignore_eos": True}):
        n += sum(1 for c in chunk.choices if c.text)
    assert 1 <= n <= 5, n


def unknown_model():
    try:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])
    except openai.NotFoundError as e:
        assert e.status_code == 404
        assert e.body["code"] == "model_not_found", e.body
        return
    raise AssertionError("expected a 404")


def bad_parameter():
    try:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=7)
    except openai.BadRequestError as e:
        assert e.status_code == 400
        assert e.body["param"] == "temperature", e.body
        return
    raise AssertionError("expected a 400")


def seeded_is_repeatable():
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Say something."}], max_tokens=8, seed=7, temperature=0.8)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b, (a, b)


for name, fn in [
    ("models", models),
    ("chat, whole", chat_whole),
    ("chat, streamed with usage", chat_stream),
    ("completions, whole", completions),
    ("completions, streamed", completions_stream),
    ("unknown model is NotFoundError", unknown_model),
    ("bad parameter is BadRequestError", bad_parameter),
    ("same seed, same answer", seeded_is_repeatable),
]:
    check(name, fn)

failed = sum(1 for _, e in results if e is not None)
print(f"{len(results) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
