"""The official `openai` client asks a graph whose worker is an external engine server
(tests/tests/engines.rs) what the capital of France is: greedy, whole and streamed, with
the token counts in `usage`. Prints `ANSWER: ...` and closes with `N passed, N failed`.
"""

import sys

import openai

BASE = sys.argv[1].rstrip("/") + "/v1"
client = openai.OpenAI(base_url=BASE, api_key="unused", max_retries=0, timeout=120)
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
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
    assert r.usage.prompt_tokens > 20, r.usage
    assert 0 < r.usage.completion_tokens <= 32, r.usage
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage


def streamed():
    chunks = list(
        client.chat.completions.create(
            model="smollm2",
            messages=MESSAGES,
            max_tokens=32,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text, text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1, "not streamed"
    usage = [c.usage for c in chunks if c.usage]
    assert usage and usage[-1].completion_tokens > 0, usage


def length():
    r = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=3, temperature=0
    )
    assert r.choices[0].finish_reason == "length", r.choices[0].finish_reason
    assert r.usage.completion_tokens <= 3, r.usage


def concurrent():
    # Two at once: the engine serves them in turn; neither may cut the other off.
    from concurrent.futures import ThreadPoolExecutor

    def one(_):
        return client.chat.completions.create(
            model="smollm2", messages=MESSAGES, max_tokens=32, temperature=0
        ).choices[0].message.content

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(one, range(2)))
    assert all("Paris" in a for a in answers), answers


check("a whole answer names Paris, with usage", whole)
check("a streamed answer names Paris, with usage", streamed)
check("max_tokens ends the answer with finish_reason length", length)
check("two concurrent requests both answer", concurrent)
failed = sum(1 for _, e in results if e is not None)
print(f"{len(results) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
