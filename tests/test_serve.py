"""The OpenAI-compatible server (`python -m lserve_jax.serve`): uvicorn on a thread over an Engine,
driven with httpx and the official `openai` client."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lserve_jax.engine import Engine
from lserve_jax.sampling import SamplingParams
from lserve_jax.serve import build_server
from lserve_jax.server.loop import EngineLoop, QueueFull, Submission

from .tiny import TINY, TINY_SPARSE, tiny_params


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server on a thread; `url` is its base address."""

    def __init__(self, engine, **kw):
        self.engine = engine
        port = _free_port()
        self.server = build_server(engine, host="127.0.0.1", port=port, log_level="warning", **kw)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


def tiny_engine(word_tokenizer) -> Engine:
    return Engine(tiny_params(TINY), TINY, tokenizer=word_tokenizer, sparse=TINY_SPARSE, max_slots=4)


@pytest.fixture(scope="module")
def tiny_server(word_tokenizer):
    srv = Running(tiny_engine(word_tokenizer), model_name="tiny")
    yield srv
    srv.close()


def words(ids) -> str:
    return " ".join(f"w{i:03d}" for i in ids)


def idle_and_all_pages_free(engine, timeout=10.0) -> bool:
    alloc = engine.scheduler.allocator
    deadline = time.time() + timeout
    while time.time() < deadline:
        if engine.scheduler.reclaimable_pages() == alloc.num_pages - 1 and not engine.scheduler.requests:
            return True
        time.sleep(0.05)
    return False


# -- the tiny model ------------------------------------------------------------------------------

def test_concurrent_requests_match_offline_generate(tiny_server, word_tokenizer):
    """8 requests at once (4 slots: some wait) each get exactly what generate gives them alone."""
    cases = [([5 + i, 17, 40 + 3 * i, 9] * (1 + i % 3), 6 + 3 * i, 0.0 if i < 6 else 0.8) for i in range(8)]
    reference = tiny_engine(word_tokenizer)
    expected = [reference.generate([words(p)], SamplingParams(max_new_tokens=m, temperature=t, seed=7 + i))[0]
                for i, (p, m, t) in enumerate(cases)]

    def post(i):
        p, m, t = cases[i]
        r = httpx.post(f"{tiny_server.url}/v1/completions", timeout=60,
                       json={"prompt": words(p), "max_tokens": m, "temperature": t, "seed": 7 + i})
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(post, range(8)))
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g["object"] == "text_completion" and g["id"].startswith("cmpl-"), g
        assert g["choices"][0]["text"] == e.text, i
        assert g["choices"][0]["finish_reason"] == "length"  # the tiny model has no EOS
        assert g["usage"] == {"prompt_tokens": len(cases[i][0]), "completion_tokens": len(e.token_ids),
                              "total_tokens": len(cases[i][0]) + len(e.token_ids),
                              "prompt_tokens_details": {"cached_tokens": 0}}  # no full page shared
    assert idle_and_all_pages_free(tiny_server.engine)


def test_streaming_completion_and_stop_string(tiny_server, word_tokenizer):
    prompt = words([3, 1, 4, 1, 5, 9, 2, 6])
    full = httpx.post(f"{tiny_server.url}/v1/completions", timeout=60,
                      json={"prompt": prompt, "max_tokens": 12, "temperature": 0}).json()
    text = full["choices"][0]["text"]
    chunks = []
    with httpx.stream("POST", f"{tiny_server.url}/v1/completions", timeout=60,
                      json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith("data: ")
                chunks.append(line[len("data: "):])
    assert chunks[-1] == "[DONE]"
    data = [json.loads(c) for c in chunks[:-1]]
    assert "".join(d["choices"][0]["text"] for d in data if d["choices"]) == text
    assert data[-2]["choices"][0]["finish_reason"] == "length"
    assert data[-1]["choices"] == [] and data[-1]["usage"] == full["usage"]
    # a stop string: the third generated word; the text ends before it, finish_reason "stop"
    stop = text.split()[2]
    cut = httpx.post(f"{tiny_server.url}/v1/completions", timeout=60,
                     json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "stop": [stop]}).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == text[: text.index(stop)]


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"prompt": "w001 w002", "n": 2}, 400, "n=1"),
    ({"prompt": "w001 w002", "temperature": "hot"}, 400, "'temperature' must be a number"),
    ({"prompt": "w001 w002", "max_tokens": 0}, 400, "'max_tokens' must be >= 1"),
    ({"prompt": "w001 w002", "top_p": 2.0}, 400, "top_p"),
    ({"prompt": "w001 w002", "stop": 5}, 400, "'stop'"),
    ({"prompt": ""}, 400, "empty prompt"),
    ({"prompt": words(range(1, 101)) + " " + words(range(1, 31))}, 400, "limit is 128"),  # 130 > 128 context
    ({"prompt": "w001", "max_completion_tokens": 1.5}, 400, "'max_completion_tokens' must be an integer"),
    ({"prompt": [[1, 2], [3]]}, 400, "one prompt per request"),
])
def test_errors_in_the_openai_schema(tiny_server, body, status, needle):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{tiny_server.url}/v1/completions", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert needle in err["message"], err["message"]


def test_unknown_route_and_chat_without_template(tiny_server):
    r = httpx.get(f"{tiny_server.url}/v1/nope")
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]
    r = httpx.post(f"{tiny_server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "w001"}]})
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
    r = httpx.post(f"{tiny_server.url}/v1/chat/completions", json={"messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_client_disconnect_aborts_and_frees_pages(tiny_server, monkeypatch):
    engine = tiny_server.engine
    real_step = engine.step

    def slow_step():  # so the request is surely still running when the client leaves
        time.sleep(0.02)
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)
    with httpx.stream("POST", f"{tiny_server.url}/v1/completions", timeout=60,
                      json={"prompt": words([7, 8, 9]), "max_tokens": 120, "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(g.startswith("data: {") for g in got)
        assert engine.scheduler.allocator.free_pages < engine.scheduler.allocator.num_pages - 1
    assert idle_and_all_pages_free(engine)
    metrics = httpx.get(f"{tiny_server.url}/metrics").text
    assert 'lserve_requests_finished_total{reason="abort"} 1.0' in metrics


def test_health_models_and_metrics(tiny_server):
    assert httpx.get(f"{tiny_server.url}/health").json() == {"status": "ok"}
    models = httpx.get(f"{tiny_server.url}/v1/models").json()
    assert models["data"][0]["id"] == "tiny"
    text = httpx.get(f"{tiny_server.url}/metrics").text
    for name in ("lserve_requests_running", "lserve_requests_waiting", "lserve_kv_pages_used",
                 "lserve_kv_pages_total", "lserve_time_to_first_token_seconds_bucket",
                 "lserve_time_per_output_token_seconds_bucket", "lserve_generation_tokens_total"):
        assert f"\n{name}" in text, name


def test_prefix_cache_in_usage_and_metrics(tiny_server):
    """The same 40-token prompt twice: the second reuses its 2 full 16-token pages (usage's
    cached_tokens, the hit counter in /metrics) and gives the same text."""
    from prometheus_client.parser import text_string_to_metric_families

    def hits():
        fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{tiny_server.url}/metrics").text)}
        return sum(s.value for s in fams["lserve_prefix_cache_hit_tokens"].samples if s.name.endswith("_total"))

    before = hits()
    body = {"prompt": words(list(range(60, 100))), "max_tokens": 5, "temperature": 0}
    first = httpx.post(f"{tiny_server.url}/v1/completions", json=body, timeout=60).json()
    second = httpx.post(f"{tiny_server.url}/v1/completions", json=body, timeout=60).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert hits() - before == 32


def test_queue_full(word_tokenizer):
    """Past max_queue waiting requests, submit refuses (the route answers 429 with Retry-After)."""
    import asyncio

    loop = EngineLoop(tiny_engine(word_tokenizer), max_queue=2)  # not started: nothing is admitted
    ev = asyncio.new_event_loop()
    try:
        for i in range(2):
            loop.submit(Submission(f"r{i}", [1, 2], SamplingParams(max_new_tokens=2), ev))
        with pytest.raises(QueueFull, match="max-queue"):
            loop.submit(Submission("r2", [1, 2], SamplingParams(max_new_tokens=2), ev))
    finally:
        ev.close()


# -- the default model, through the openai client -------------------------------------------------

@pytest.mark.slow
def test_openai_client_chat_on_the_default_model():
    import openai

    import lserve_jax

    engine = lserve_jax.load(max_seq_len=256, max_slots=2, progress=False)
    question = "What is the capital of France?"
    (offline,) = engine.generate([question], SamplingParams(max_new_tokens=16), chat=True)
    srv = Running(engine, model_name="smollm2")
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": question}]
        r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0)
        text = r.choices[0].message.content
        assert "Paris" in text and text == offline.text
        assert r.id.startswith("chatcmpl-") and r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens == len(engine.tokenizer.encode_chat(question))
        assert r.usage.completion_tokens == len(offline.token_ids)
        stream = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        parts, usage = [], None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        assert "".join(parts) == text
        assert usage.completion_tokens == r.usage.completion_tokens
        assert [m.id for m in client.models.list().data] == ["smollm2"]
    finally:
        srv.close()


@pytest.mark.slow
def test_sigterm_aborts_streams_and_exits_0():
    """`python -m lserve_jax.serve` on the default model: SIGTERM mid-stream ends the stream with
    finish_reason "abort" and [DONE], and the process exits 0."""
    import signal
    import subprocess
    import sys

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lserve_jax.serve", "--max-seq-len", "256", "--max-slots", "2",
                             "--port", str(port), "--log-level", "warning"])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)
        lines = []
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"prompt": "Once upon a time", "max_tokens": 200, "stream": True,
                                "ignore_eos": True, "temperature": 0}) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 3:
                    proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][len("data: "):])["choices"][0]["finish_reason"] == "abort"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
