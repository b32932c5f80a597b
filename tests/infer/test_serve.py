"""`toolkit serve`: the real server on a free loopback port, driven over HTTP.

Two kinds of backend. The HTTP layer, validation, adapter registry, hot-swap and the continuous-batching
scheduler (queueing, 503, cancel, load/unload between steps) are checked with a scripted backend whose
pure-Python batch engine makes every token from its own slot's adapter set (so any cross-talk between rows
changes the text) and fails a step that runs an unloaded adapter. The model path is checked with `toolkit
serve` as a subprocess on the tiny GGUF (--weights float) with adapters made in code (oracle: `toolkit.generate`
alone with the same set and seed, exact text), with the official `openai` client, and once on the real SmolLM2.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import sys
import time
from pathlib import Path

import pytest

for _dep in ("fastapi", "uvicorn", "httpx"):  # the `serve` extra and the test client (pyproject)
    pytest.importorskip(_dep)
import httpx  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from serve_helpers import ScriptedBackend, process_server, thread_server  # noqa: E402

from toolkit.infer.server_protocol import StopMatcher  # noqa: E402
from toolkit.infer.serve import ServeConfig, build  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(_torch_threads):
    """The oracles run in this process while the server process computes: one thread each avoids the
    oversubscription that makes 2+2 threads on this 2-core machine several times slower."""
    import torch

    torch.set_num_threads(1)
    yield


# ---- pure pieces ----------------------------------------------------------------------------------------


def test_stop_matcher_holds_back_partial_stops():
    m = StopMatcher(["END", "\n\n"])
    out = []
    for piece in ["Hel", "lo E", "N", "x wor", "ld\n", "\nmore"]:
        text, stopped = m.feed(piece)
        out.append(text)
        if stopped:
            break
    # "E" and "EN" are held until "x" shows they are not "END"; "\n" until the second "\n" stops it
    assert out == ["Hel", "lo ", "", "ENx wor", "ld", ""] and stopped
    m2 = StopMatcher(["abc"])
    assert m2.feed("xxab") == ("xx", False) and m2.flush() == "ab"
    assert StopMatcher([]).feed("anything") == ("anything", False)


# ---- scripted backend: HTTP layer, registry, scheduling -------------------------------------------------


def make_adapters(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in names:
        p = folder / n
        p.write_bytes(b"LORA" + n.encode())
        paths.append(p)
    return paths


@pytest.fixture()
def scripted(tmp_path):
    """A server over ScriptedBackend with adapters a (scale 1) and b (scale 0.5), adapter dir with c and d."""
    a, b = make_adapters(tmp_path / "cli", ["a.gguf", "b.gguf"])
    make_adapters(tmp_path / "dir", ["c.gguf", "d.gguf"])
    (tmp_path / "dir" / "junk.gguf").write_bytes(b"JUNK")
    (tmp_path / "secret.gguf").write_bytes(b"LORAsecret")
    os.symlink(tmp_path / "secret.gguf", tmp_path / "dir" / "link.gguf")
    backend = ScriptedBackend()
    cfg = ServeConfig(model="scripted", lora=[str(a)], lora_scaled=[[str(b), "0.5"]],
                      adapter_dir=str(tmp_path / "dir"), max_queue=64, parallel=4)
    app, engine = build(cfg, backend=backend)
    with thread_server(app) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, backend, engine
    engine.stop()


def expected(backend, prompt: str, scales: dict[str, float], seed, n: int) -> str:
    return backend.expected(list(prompt.encode()), scales, seed, n)


def assert_error(r: httpx.Response, status: int, words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert words in err["message"], err
    assert err["code"] == status


def test_bad_requests_are_4xx_json_and_server_keeps_serving(scripted):
    c, backend, _ = scripted
    ok = {"prompt": "hi", "max_tokens": 3, "seed": 1}
    assert_error(c.post("/v1/completions", content=b'{"prompt": "hi",'), 400, "not valid JSON")
    assert_error(c.post("/v1/completions", content=b"\xff\xfe"), 400, "not valid JSON")
    assert_error(c.post("/v1/completions", json={**ok, "max_tokens": -1}), 400, "max_tokens")
    assert_error(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                      "max_tokens": -5}), 400, "max_tokens")
    assert_error(c.post("/v1/completions", json={**ok, "lora": [{"id": 7, "scale": 1.0}]}), 400, "unknown adapter id 7")
    assert_error(c.post("/v1/completions", json={**ok, "lora": [{"id": 0, "scale": 1}, {"id": 0, "scale": 2}]}),
                 400, "twice")
    assert_error(c.post("/v1/completions", json={**ok, "prompt": "x" * 64}), 400, "64 tokens; the context size is 64")
    assert_error(c.post("/v1/completions", json={**ok, "prompt": [1, 2, 999]}), 400, "vocabulary")
    assert_error(c.post("/v1/completions", json={**ok, "n": 2}), 400, "n=1")
    assert_error(c.post("/v1/completions", json={**ok, "stop": ["a", "b", "c", "d", "e"]}), 400, "stop")
    assert_error(c.post("/v1/completions", json={**ok, "temperature": -1}), 400, "temperature")
    assert_error(c.post("/v1/completions", json={"max_tokens": 3}), 400, "prompt")
    assert_error(c.post("/v1/chat/completions", json={"messages": []}), 400, "messages")
    assert_error(c.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}), 400, "role")
    assert_error(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                      "tools": [{"type": "function"}]}), 400, "tool")
    assert_error(c.post("/v1/completions", content=b"[" * 10 + b"]" * 10), 400, "")
    assert_error(c.post("/v1/completions", content=b'{"prompt": "' + b"x" * (9 << 20) + b'"}'), 413, "bytes")

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(9):
            yield b"x" * (1 << 20)
        yield b'"}'

    assert_error(c.post("/v1/completions", content=chunked()), 413, "bytes")
    assert_error(c.post("/lora-adapters", json=[{"id": 9, "scale": 1}]), 400, "unknown adapter id 9")
    assert_error(c.post("/lora-adapters", json={"id": 0}), 400, "")
    assert_error(c.get("/v1/nothing"), 404, "Not Found")
    # and the server still serves, with the right text
    r = c.post("/v1/completions", json=ok)
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == expected(backend, "hi", {"lora0": 1.0, "lora1": 0.5}, 1, 3)


def test_completion_and_chat_shapes_and_streaming(scripted):
    c, backend, _ = scripted
    body = {"prompt": "hello", "max_tokens": 6, "seed": 3, "lora": [{"id": 1, "scale": 2.0}]}
    r = c.post("/v1/completions", json=body).json()
    want = expected(backend, "hello", {"lora1": 2.0}, 3, 6)
    assert r["object"] == "text_completion" and r["choices"][0]["text"] == want
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11,
                          "prompt_tokens_details": {"cached_tokens": 0}}
    # streaming: the deltas add up to the same text, then a finish chunk, then [DONE]
    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and len(chunks) >= 3
    # chat: template rendered by the backend, message shape, stop sequence cuts the text
    msgs = [{"role": "user", "content": "hey"}]
    full = backend.expected(backend.chat_prompt(msgs), {"lora0": 1.0, "lora1": 0.5}, 5, 12)
    stop = full[4:6]
    cut = full[: full.index(stop)]
    r = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 12, "seed": 5, "stop": stop}).json()
    assert r["choices"][0]["message"] == {"role": "assistant", "content": cut}
    assert r["choices"][0]["finish_reason"] == "stop"
    assert len(backend.batches[0].cancelled) == 1  # the stop string freed the slot before max_tokens
    with c.stream("POST", "/v1/chat/completions", json={"messages": msgs, "max_tokens": 12, "seed": 5, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == full
    assert events[-1]["usage"]["completion_tokens"] == 12 and events[-1]["choices"] == []


def test_a_stop_in_the_first_token_frees_the_slot_before_it_decodes(scripted):
    """The scheduler handles the prefill half's events before the decode half runs: a request whose first token
    completes its stop string never decodes (and its first token reaches the client one decode pass sooner)."""
    c, backend, _ = scripted
    first = expected(backend, "hello", {"lora0": 1.0, "lora1": 0.5}, 9, 1)
    before = backend.tokens
    r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 8, "seed": 9, "stop": first}).json()
    assert r["choices"][0]["text"] == "" and r["choices"][0]["finish_reason"] == "stop"
    assert backend.tokens - before == 1  # a step run whole would have made its second token too


def test_concurrent_requests_with_different_adapter_sets_do_not_cross(scripted):
    c, backend, _ = scripted
    sets = [None, [], [{"id": 0, "scale": 1.0}], [{"id": 1, "scale": 0.25}],
            [{"id": 0, "scale": 0.5}, {"id": 1, "scale": -1.0}]]
    names = {0: "lora0", 1: "lora1"}
    globals_ = {"lora0": 1.0, "lora1": 0.5}
    jobs = [(f"p{i}", sets[i % len(sets)], i) for i in range(30)]

    def one(job):
        prompt, lora, seed = job
        body = {"prompt": prompt, "max_tokens": 8, "seed": seed}
        if lora is not None:
            body["lora"] = lora
        return c.post("/v1/completions", json=body).json()["choices"][0]["text"]

    backend.threads.clear()  # (the start-up warm-up ran on the thread that built the server)
    with cf.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, jobs))
    for (prompt, lora, seed), text in zip(jobs, got, strict=True):
        scales = globals_ if lora is None else {names[x["id"]]: x["scale"] for x in lora if x["scale"] != 0}
        assert text == expected(backend, prompt, scales, seed, 8), (prompt, lora)
    # one model thread did all the work, and requests with different sets shared steps (4 slots)
    assert backend.threads == {"toolkit-serve-model"}
    assert max(backend.batch_sizes) == 4 and backend.batches[0].active == []


def test_global_scales_and_lora_adapters_routes(scripted):
    c, backend, _ = scripted
    info = c.get("/lora-adapters").json()
    assert [(a["id"], Path(a["path"]).name, a["scale"]) for a in info] == [(0, "a.gguf", 1.0), (1, "b.gguf", 0.5)]
    assert c.post("/lora-adapters", json=[{"id": 1, "scale": 0.2}]).json() == {"success": True}
    assert [a["scale"] for a in c.get("/lora-adapters").json()] == [0.0, 0.2]  # unlisted adapters go to 0
    r = c.post("/v1/completions", json={"prompt": "g", "max_tokens": 4, "seed": 9}).json()
    assert r["choices"][0]["text"] == expected(backend, "g", {"lora1": 0.2}, 9, 4)
    # a request's own list wins for that request only
    r = c.post("/v1/completions", json={"prompt": "g", "max_tokens": 4, "seed": 9, "lora": [{"id": 0, "scale": 1}]})
    assert r.json()["choices"][0]["text"] == expected(backend, "g", {"lora0": 1.0}, 9, 4)
    assert [a["scale"] for a in c.get("/lora-adapters").json()] == [0.0, 0.2]
    assert c.post("/lora-adapters", json=[]).json() == {"success": True}
    r = c.post("/v1/completions", json={"prompt": "g", "max_tokens": 4, "seed": 9}).json()
    assert r["choices"][0]["text"] == expected(backend, "g", {}, 9, 4)


def test_load_and_unload_only_inside_adapter_dir(scripted, tmp_path):
    c, backend, _ = scripted
    for name, status in [("../secret.gguf", 403), (str(tmp_path / "secret.gguf"), 403), ("link.gguf", 403),
                         ("..", 403), ("", 403), ("sub/c.gguf", 403), ("missing.gguf", 404)]:
        assert_error(c.post("/lora-adapters/load", json={"name": name}), status, "")
    assert_error(c.post("/lora-adapters/load", json={"path": "/etc/passwd"}), 400, "")
    assert_error(c.post("/lora-adapters/load", json={"name": "junk.gguf"}), 400, "cannot load adapter 'junk.gguf'")
    r = c.post("/lora-adapters/load", json={"name": "c.gguf", "scale": 0.75}).json()
    assert r["id"] == 3 and Path(r["path"]) == (tmp_path / "dir" / "c.gguf").resolve()  # id 2 went to junk
    assert "lora3" in backend.loaded
    assert [a["id"] for a in c.get("/lora-adapters").json()] == [0, 1, 3]
    r = c.post("/v1/completions", json={"prompt": "z", "max_tokens": 5, "seed": 1, "lora": [{"id": 3, "scale": 2}]})
    assert r.json()["choices"][0]["text"] == expected(backend, "z", {"lora3": 2.0}, 1, 5)
    # unloading while a request still uses it: the id disappears at once, the weights when that request ends
    backend.delay = 0.02
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(c.post, "/v1/completions",
                          json={"prompt": "z", "max_tokens": 40, "seed": 2, "lora": [{"id": 3, "scale": 1}]})
        time.sleep(0.3)
        assert c.post("/lora-adapters/unload", json={"id": 3}).json()["success"] is True
        assert "lora3" in backend.loaded and 3 not in [a["id"] for a in c.get("/lora-adapters").json()]
        assert_error(c.post("/v1/completions", json={"prompt": "z", "lora": [{"id": 3, "scale": 1}]}), 400, "id 3")
        text = fut.result().json()["choices"][0]["text"]
    assert text == expected(backend, "z", {"lora3": 1.0}, 2, 40)
    for _ in range(100):
        if "lora3" not in backend.loaded:
            break
        time.sleep(0.02)
    assert backend.unloaded == ["lora3"]
    assert_error(c.post("/lora-adapters/unload", json={"id": 3}), 404, "unknown adapter id 3")


def test_client_disconnect_frees_its_slot():
    """One slot: a streaming client that leaves after its first token frees the slot (BatchEngine.cancel) for
    the next request, which would otherwise wait the 3 s the abandoned 150 tokens take."""
    backend = ScriptedBackend(delay=0.02)
    backend.n_ctx = 1000
    app, engine = build(ServeConfig(model="scripted", parallel=1), backend=backend)
    with thread_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "q", "max_tokens": 150, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    break  # leave after the first token
        t0 = time.time()
        r = c.post("/v1/completions", json={"prompt": "q", "max_tokens": 2, "seed": 0})
        assert r.json()["choices"][0]["text"] == expected(backend, "q", {}, 0, 2)
        assert time.time() - t0 < 1.5  # observed ~0.1-0.5 s (disconnect noticed, slot 0 freed and reused)
        assert backend.batches[0].cancelled == [0]
        health = c.get("/health").json()
        assert health["cancelled"] == 1 and health["slots_busy"] == 0 and health["status"] == "ok"
        assert backend.tokens < 60  # the abandoned request stopped long before its 150 tokens
    engine.stop()


def test_client_that_gives_up_waiting_is_not_served(scripted):
    """A non-streaming client that times out while queued/generating: its job is dropped, not computed."""
    c, backend, _ = scripted
    backend.delay, backend.n_ctx = 0.02, 1000  # room for the 200 tokens asked below
    backend.tokens = 0
    with pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json={"prompt": "w", "max_tokens": 200}, timeout=0.5)  # 4 s of work
    time.sleep(1.5)
    seen = backend.tokens
    time.sleep(0.5)
    # generation had started, and stopped within ~1 s of the client leaving (all 200 would take 4 s)
    assert 0 < seen == backend.tokens < 200, (seen, backend.tokens)
    r = c.post("/v1/completions", json={"prompt": "w", "max_tokens": 3, "seed": 1}, timeout=30)
    assert r.json()["choices"][0]["text"] == expected(backend, "w", {"lora0": 1.0, "lora1": 0.5}, 1, 3)


def test_model_loads_warms_up_and_runs_on_one_thread(monkeypatch, tmp_path):
    """serve.build loads the model, reads the startup adapters and runs every step on the engine's own thread (the
    main thread never starts torch's parallel work, which would give OpenMP a second pool of workers that slows the
    model thread's steps); a load error is raised on the caller's thread as before."""
    import threading

    from toolkit.errors import ToolkitError
    from toolkit.infer import server_backend
    from toolkit.infer.server_engine import Engine

    seen = {}

    class Loaded(ScriptedBackend):
        def load_adapter(self, path, name):
            seen["adapter"] = threading.current_thread().name
            super().load_adapter(path, name)

    def load(path, **kw):
        seen["load"] = threading.current_thread().name
        if path == "broken.gguf":
            raise ToolkitError("not a GGUF file", path)
        return Loaded()

    monkeypatch.setattr(server_backend.ModelBackend, "load", staticmethod(load))
    lora = make_adapters(tmp_path, ["a.gguf"])[0]
    app, engine = build(ServeConfig(model="m.gguf", parallel=2, lora=[str(lora)], compile=False))
    try:
        step_thread = engine.call(lambda: threading.current_thread().name).result(timeout=30)
        assert seen == {"load": Engine.THREAD_NAME, "adapter": Engine.THREAD_NAME}
        assert step_thread == Engine.THREAD_NAME != threading.current_thread().name
    finally:
        engine.stop()
    with pytest.raises(ToolkitError, match="not a GGUF file"):
        build(ServeConfig(model="broken.gguf", compile=False))


def test_full_queue_answers_503_json(tmp_path):
    """2 slots + 2 waiting: of 10 simultaneous requests (each 0.5 s of work) the rest get 503 at once."""
    backend = ScriptedBackend(delay=0.05)
    app, engine = build(ServeConfig(model="scripted", parallel=2, max_queue=2), backend=backend)
    with thread_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        with cf.ThreadPoolExecutor(10) as pool:
            futs = [pool.submit(c.post, "/v1/completions", json={"prompt": "b", "max_tokens": 10, "seed": i})
                    for i in range(10)]
            rs = [f.result() for f in futs]
        ok = [r for r in rs if r.status_code == 200]
        busy = [r for r in rs if r.status_code == 503]
        assert len(ok) + len(busy) == 10 and len(ok) >= 4 and busy, [r.status_code for r in rs]
        for r in busy:
            assert_error(r, 503, "busy")
            assert r.json()["error"]["type"] == "server_error"
        for r in ok:
            assert r.json()["choices"][0]["text"] in {expected(backend, "b", {}, i, 10) for i in range(10)}
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["rejected"] == len(busy) and health["queued"] == 0
        # and it serves again once the burst is over
        assert c.post("/v1/completions", json={"prompt": "b", "max_tokens": 2}).status_code == 200
    engine.stop()


def test_api_key_guards_every_endpoint():
    backend = ScriptedBackend()
    app, engine = build(ServeConfig(model="scripted", api_key="s3cret"), backend=backend)
    with thread_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        calls = [("GET", "/health", None), ("GET", "/v1/models", None), ("GET", "/lora-adapters", None),
                 ("POST", "/lora-adapters", []), ("POST", "/lora-adapters/load", {"name": "x"}),
                 ("POST", "/lora-adapters/unload", {"id": 0}), ("GET", "/nope", None),
                 ("POST", "/v1/completions", {"prompt": "a", "max_tokens": 1}),
                 ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 1})]
        for method, path, body in calls:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = c.request(method, path, json=body, headers=headers)
                assert_error(r, 401, "API key")
        good = {"Authorization": "Bearer s3cret"}
        assert c.get("/health", headers=good).status_code == 200
        r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "seed": 4}, headers=good)
        assert r.json()["choices"][0]["text"] == expected(backend, "a", {}, 4, 2)
    engine.stop()


# ---- the real model: `toolkit serve` as a subprocess -----------------------------------------------------

SAMPLING = {"temperature": 1.3, "top_k": 0, "top_p": 1.0, "min_p": 0.0}  # wide sampling: adapters show


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """`toolkit serve` on the tiny GGUF: a (id 0, scale 1), b (id 1, --lora-scaled 0.5), c in --adapter-dir."""
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from serve_helpers import make_random_adapter
    from tiny import make_tiny_gguf

    d = tmp_path_factory.mktemp("serve")
    base = make_tiny_gguf(d / "tiny.gguf")
    (d / "dir").mkdir()
    paths = {"a": make_random_adapter(base, d / "a.gguf", seed=1, std=0.3),
             "b": make_random_adapter(base, d / "b.gguf", seed=2, std=0.3, rank=8, alpha=4.0),
             "c": make_random_adapter(base, d / "dir" / "c.gguf", seed=3, std=0.3, targets=("attn_k", "ffn_gate"))}
    args = ["-m", str(base), "--lora", str(paths["a"]), "--lora-scaled", str(paths["b"]), "0.5",
            "--adapter-dir", str(d / "dir"), "-t", "1", "--device", "cpu", "--weights", "float", "--no-compile",
            "--parallel", "8"]
    with process_server(args) as url:
        yield url, base, paths


def solo(base: Path, paths: dict, scales: dict[str, float], prompt, max_tokens: int, seed: int, **kw) -> str:
    """The oracle: toolkit.generate alone in this process, with exactly this adapter set."""
    import toolkit
    from toolkit.infer.generate import generate

    key = str(base)
    if key not in _MODELS:
        model, tok = toolkit.load(base, device="cpu", weights="float")
        for name, p in paths.items():
            model.load_adapter(p, name=name, scale=0.0)
        _MODELS[key] = (model, tok)
    model, tok = _MODELS[key]
    model.set_adapters(scales)
    return generate(model, tok, prompt, max_tokens, seed=seed, **kw)


_MODELS: dict[str, tuple] = {}


def test_tiny_concurrent_adapter_sets_equal_generation_alone(tiny_server):
    url, base, paths = tiny_server
    c = httpx.Client(base_url=url, timeout=120)
    r = c.post("/lora-adapters/load", json={"name": "c.gguf"}).json()
    assert r["id"] == 2 and r["scale"] == 0.0
    ids = {"a": 0, "b": 1, "c": 2}
    sets = [None, {}, {"a": 1.0}, {"b": 0.7}, {"a": 0.5, "b": -1.0}, {"c": 1.0}, {"a": 1.0, "c": 2.0}]
    prompts = ["Hello there", "The quick brown fox", "Once upon a time", "1, 2, 3,"]
    jobs = [(prompts[i % len(prompts)], sets[i % len(sets)], 100 + i, i % 3 == 0) for i in range(14)]

    def one(job):
        prompt, scales, seed, chat = job
        body = {"max_tokens": 10, "seed": seed, **SAMPLING}
        if scales is not None:
            body["lora"] = [{"id": ids[n], "scale": s} for n, s in scales.items()]
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
            return c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        return c.post("/v1/completions", json={**body, "prompt": prompt}).json()["choices"][0]["text"]

    with cf.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, jobs))

    import toolkit

    _, tok = toolkit.load(base, device="cpu")
    texts = set()
    for (prompt, scales, seed, chat), text in zip(jobs, got, strict=True):
        scales = {"a": 1.0, "b": 0.5} if scales is None else scales
        p = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}])) if chat else prompt
        assert text == solo(base, paths, scales, p, 10, seed, **SAMPLING), (prompt, scales, seed, chat)
        texts.add((prompt, chat, text))
    # the adapter sets really change the text (else the check above could not catch cross-talk)
    assert len(texts) > len({(p, ch) for p, _, _, ch in jobs}) + 3
    c.post("/lora-adapters/unload", json={"id": 2})
    assert [a["id"] for a in c.get("/lora-adapters").json()] == [0, 1]


def test_tiny_streaming_equals_non_streaming_and_errors_keep_serving(tiny_server):
    url, base, paths = tiny_server
    c = httpx.Client(base_url=url, timeout=120)
    body = {"prompt": "The quick brown fox", "max_tokens": 16, "seed": 7, "lora": [{"id": 0, "scale": 0.8}], **SAMPLING}
    whole = c.post("/v1/completions", json=body).json()
    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == whole["choices"][0]["text"]
    assert whole["choices"][0]["text"] == solo(base, paths, {"a": 0.8}, body["prompt"], 16, 7, **SAMPLING)
    # the tiny model's context is 256 tokens
    r = c.post("/v1/completions", json={"prompt": list(range(300)), "max_tokens": 1})
    assert_error(r, 400, "context size is 256")
    assert_error(c.post("/v1/completions", json={**body, "max_tokens": -3}), 400, "max_tokens")
    assert_error(c.post("/v1/completions", json={**body, "lora": [{"id": 5, "scale": 1}]}), 400, "unknown adapter id 5")
    assert_error(c.post("/v1/completions", content=b"{nope"), 400, "JSON")
    assert_error(c.post("/lora-adapters/load", json={"name": "../a.gguf"}), 403, "")
    r = c.post("/v1/completions", json={**body, "max_tokens": 0}).json()
    assert r["choices"][0]["text"] == "" and r["usage"]["completion_tokens"] == 0
    assert r["choices"][0]["finish_reason"] == "length"
    # max_tokens larger than the room left is cut at the context end
    r = c.post("/v1/completions", json={"prompt": list(range(1, 251)), "max_tokens": 50, "ignore_eos": True}).json()
    assert r["usage"]["completion_tokens"] == 6 and r["choices"][0]["finish_reason"] == "length"
    assert c.post("/v1/completions", json=body).json()["choices"][0]["text"] == whole["choices"][0]["text"]


def test_tiny_prompt_cache_reuses_a_slot_and_reports_cached_tokens(tiny_server):
    """A request whose prompt starts with a finished one's tokens (same adapters) prefills only the rest and says
    so in usage.prompt_tokens_details.cached_tokens (OpenAI's field); "cache_prompt": false prefills it all. The
    text equals the oracle's either way."""
    url, base, paths = tiny_server
    c = httpx.Client(base_url=url, timeout=120)
    body = {"prompt": "A long time ago in a galaxy far", "max_tokens": 6, "seed": 11,
            "lora": [{"id": 1, "scale": 0.9}], **SAMPLING}
    want = solo(base, paths, {"b": 0.9}, body["prompt"], 6, 11, **SAMPLING)
    first = c.post("/v1/completions", json=body).json()
    n = first["usage"]["prompt_tokens"]
    again = c.post("/v1/completions", json=body).json()
    fresh = c.post("/v1/completions", json={**body, "cache_prompt": False}).json()
    other = c.post("/v1/completions", json={**body, "lora": [{"id": 1, "scale": 0.8}]}).json()
    assert [r["choices"][0]["text"] for r in (first, again, fresh)] == [want] * 3
    assert other["choices"][0]["text"] == solo(base, paths, {"b": 0.8}, body["prompt"], 6, 11, **SAMPLING)
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": n - 1}  # the last one gives the logits
    assert fresh["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert other["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # other scales: other keys and values


def test_tiny_equals_toolkit_infer_command(tiny_server):
    """The issue's oracle verbatim: `toolkit infer` (its Python entry, same flags) alone with that set and seed."""
    import io

    from toolkit.infer.cli import InferConfig, infer

    url, base, paths = tiny_server
    c = httpx.Client(base_url=url, timeout=120)
    flags = dict(temp=1.3, top_k=0, top_p=1.0, min_p=0.0, device="cpu", weights="float")
    cases = [("Hello there", [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.3}], [str(paths["a"])],
              [[str(paths["b"]), "0.3"]], False),
             ("Once upon a time", [{"id": 1, "scale": 2.0}], [], [[str(paths["b"]), "2.0"]], True),
             ("1, 2, 3,", [], [], [], False)]
    for i, (prompt, lora, cli_lora, cli_scaled, chat) in enumerate(cases):
        body = {"max_tokens": 12, "seed": 40 + i, "lora": lora, "temperature": 1.3, "top_k": 0, "top_p": 1.0,
                "min_p": 0.0}
        if chat:
            got = c.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": prompt}]})
            got = got.json()["choices"][0]["message"]["content"]
        else:
            got = c.post("/v1/completions", json={**body, "prompt": prompt}).json()["choices"][0]["text"]
        cfg = InferConfig(model=str(base), prompt=prompt, n_predict=12, seed=40 + i, chat=chat, lora=cli_lora,
                          lora_scaled=cli_scaled, **flags)
        assert got == infer(cfg, out=io.StringIO()), (prompt, lora)


def test_official_openai_client(tiny_server):
    openai = pytest.importorskip("openai")
    url, base, paths = tiny_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny.gguf"]
    r = client.completions.create(model="tiny.gguf", prompt="Hello there", max_tokens=8, seed=11,
                                  extra_body={"lora": [{"id": 1, "scale": 1.0}], **SAMPLING})
    assert r.choices[0].text == solo(base, paths, {"b": 1.0}, "Hello there", 8, 11, **SAMPLING)
    assert r.usage.completion_tokens == 8
    msgs = [{"role": "user", "content": "Once upon a time"}]
    chunks = list(client.chat.completions.create(model="tiny.gguf", messages=msgs, max_tokens=8, seed=12,
                                                 stream=True, temperature=1.3, top_p=1.0,
                                                 extra_body={"top_k": 0, "min_p": 0.0}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    import toolkit

    _, tok = toolkit.load(base, device="cpu")
    ids = tok.encode(tok.apply_chat_template(msgs))
    assert text == solo(base, paths, {"a": 1.0, "b": 0.5}, ids, 8, 12, **SAMPLING)
    assert chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="x", prompt="hi", max_tokens=-1)


def test_openai_16_streams_over_4_adapter_sets_equal_solo(tiny_server):
    """16 concurrent streaming requests (official client) over 4 adapter sets, batched in 8 slots: each text
    equals toolkit.generate alone with that set, greedy (--weights float: a row in a batch is the same math as
    alone; logits within 1e-4 relative, far below the tiny model's top-2 gaps at these prompts)."""
    openai = pytest.importorskip("openai")
    url, base, paths = tiny_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    sets = [{}, {"a": 1.0}, {"b": 1.0}, {"a": 0.5, "b": -1.0}]
    prompts = ["Hello there", "The quick brown fox", "Once upon a time", "1, 2, 3,", "A B C"]
    before = httpx.get(url + "/health").json()

    def one(i: int) -> str:
        lora = [{"id": {"a": 0, "b": 1}[n], "scale": s} for n, s in sets[i % 4].items()]
        chunks = client.completions.create(model="tiny.gguf", prompt=prompts[i % 5], max_tokens=12 + i % 3,
                                           temperature=0, stream=True, extra_body={"lora": lora})
        return "".join(ch.choices[0].text for ch in chunks if ch.choices)

    with cf.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(16)))
    after = httpx.get(url + "/health").json()
    for i, text in enumerate(got):
        assert text == solo(base, paths, sets[i % 4], prompts[i % 5], 12 + i % 3, 0, temperature=0), i
    assert len({(i % 5, t) for i, t in enumerate(got)}) > 5  # the sets change the text
    # the 16 requests shared steps: fewer decode steps than tokens
    steps, tokens = after["steps"] - before["steps"], after["generated_tokens"] - before["generated_tokens"]
    assert tokens == sum(12 + i % 3 for i in range(16)) and steps < tokens / 2, (steps, tokens)


def test_tiny_adapters_load_and_unload_while_requests_run(tiny_server):
    """While streams with a and c run, c is loaded again under a new id, used and unloaded, and the first c is
    unloaded although streams still use it: every text equals its solo answer (loads and unloads happen
    between steps) and the first c's weights stay until its last request ends."""
    url, base, paths = tiny_server
    c = httpx.Client(base_url=url, timeout=120)
    c1 = c.post("/lora-adapters/load", json={"name": "c.gguf"}).json()["id"]
    body = {"max_tokens": 120, "temperature": 0, "ignore_eos": True}  # long enough to overlap the loads
    jobs = [("Once upon a time", {0: 1.0}), ("Hello there", {c1: 1.0}), ("1, 2, 3,", {0: 0.5, c1: 0.5})] * 2

    def one(prompt: str, lora: dict[int, float]) -> tuple[str, float, float]:
        t0 = time.time()
        refs = [{"id": k, "scale": v} for k, v in lora.items()]
        with c.stream("POST", "/v1/completions", json={**body, "prompt": prompt, "lora": refs, "stream": True}) as s:
            text = "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in s.iter_lines()
                           if ln.startswith("data: {"))
        return text, t0, time.time()

    with cf.ThreadPoolExecutor(6) as pool:
        futs = [pool.submit(one, *j) for j in jobs]
        while httpx.get(url + "/health").json()["slots_busy"] < 6:  # all six are in the batch
            time.sleep(0.005)
        t_mid = time.time()
        c2 = c.post("/lora-adapters/load", json={"name": "c.gguf"}).json()["id"]
        c_text = one("The quick brown fox", {c2: 2.0})[0]
        assert c.post("/lora-adapters/unload", json={"id": c1}).json()["success"]
        assert c.post("/lora-adapters/unload", json={"id": c2}).json()["success"]
        got = [f.result() for f in futs]
    assert c_text == solo(base, paths, {"c": 2.0}, "The quick brown fox", 120, 0, temperature=0, ignore_eos=True)
    names = {0: "a", c1: "c"}
    for (prompt, lora), (text, _, _) in zip(jobs, got, strict=True):
        scales = {names[k]: v for k, v in lora.items()}
        assert text == solo(base, paths, scales, prompt, 120, 0, temperature=0, ignore_eos=True), (prompt, scales)
    assert any(t0 < t_mid < t1 for _, t0, t1 in got)  # the load happened while requests ran
    assert [a["id"] for a in c.get("/lora-adapters").json()] == [0, 1]
    assert_error(c.post("/v1/completions", json={**body, "prompt": "x", "lora": [{"id": c1, "scale": 1}]}), 400,
                 f"id {c1}")


def test_api_key_on_the_command_line(tiny_server):
    _, base, paths = tiny_server
    with process_server(["-m", str(base), "--api-key", "k3y", "--device", "cpu", "-t", "1", "--weights", "float",
                         "--no-compile"]) as url2:
        assert_error(httpx.get(url2 + "/health"), 401, "API key")
        assert_error(httpx.get(url2 + "/v1/models", headers={"Authorization": "Bearer nope"}), 401, "API key")
        r = httpx.post(url2 + "/v1/completions", headers={"Authorization": "Bearer k3y"}, timeout=60,
                       json={"prompt": "Hello there", "max_tokens": 4, "seed": 1, "lora": [], **SAMPLING})
        assert r.json()["choices"][0]["text"] == solo(base, paths, {}, "Hello there", 4, 1, **SAMPLING)


def test_cli_errors_are_one_line(tmp_path, tiny_server, capsys):
    """Bad input to `toolkit serve` (through the CLI entry point): exit 1, one line naming the problem."""
    from toolkit.cli import main

    _, base, paths = tiny_server
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    for args, words in [(["-m", str(tmp_path / "missing.gguf")], "missing.gguf"),
                        (["-m", str(base), "--lora", str(bad)], "bad.gguf"),
                        (["-m", str(base), "--lora-scaled", str(paths["a"]), "x"], "not a number"),
                        (["-m", str(base), "--adapter-dir", str(tmp_path / "nodir")], "--adapter-dir"),
                        (["-m", str(base), "--parallel", "0"], "--parallel"),
                        # TEST-NET-1: no local interface has it, so bind fails (no packet leaves the machine)
                        (["-m", str(base), "--host", "192.0.2.1"], "cannot listen")]:
        assert main(["serve", "--port", "0", "--device", "cpu", "--no-compile", *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("toolkit: error:") and words in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_smollm2_chat_with_and_without_adapter(smollm2_path, tmp_path):
    from serve_helpers import make_random_adapter

    adapter = make_random_adapter(smollm2_path, tmp_path / "smol-lora.gguf", rank=8, std=0.02, seed=5)
    with process_server(["-m", str(smollm2_path), "--lora", str(adapter), "--lora-init-without-apply",
                         "--device", "cpu", "-t", "1", "--no-compile", "--weights", "packed"]) as url:
        c = httpx.Client(base_url=url, timeout=300)
        assert c.get("/lora-adapters").json()[0]["scale"] == 0.0
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        bodies = [{"messages": msgs, "max_tokens": 8, "temperature": 0},
                  {"messages": msgs, "max_tokens": 8, "temperature": 0, "lora": [{"id": 0, "scale": 1.0}]}]
        with cf.ThreadPoolExecutor(2) as pool:
            got = [r.json()["choices"][0]["message"]["content"] for r in
                   pool.map(lambda b: c.post("/v1/chat/completions", json=b), bodies)]
    assert "Paris" in got[0]
    import toolkit
    from toolkit.infer.generate import generate

    # torch's kernels (bf16 activations): served rows equal this 1-D path here. With the default ggml weights
    # (libggml, 8-bit activations, as llama.cpp) this prompt's greedy answer sits on near-ties (llama.cpp's own
    # logits: 0.10 apart at its first and eighth tokens), which the batch's float rounding flips now and then
    model, tok = toolkit.load(smollm2_path, device="cpu", weights="packed")
    ids = tok.encode(tok.apply_chat_template(msgs))
    assert got[0] == generate(model, tok, ids, 8, temperature=0)
    model.load_adapter(adapter, scale=1.0)
    assert got[1] == generate(model, tok, ids, 8, temperature=0)
    assert got[1] != got[0]
