"""Serving benchmark: the sparse engine against the dense engine on the same request lists.

    python bench/serve.py                                   # H200: llama3-8b shape, random bf16 weights
    python bench/serve.py --shape tiny --scale 0.01         # CPU smoke run (what the tests run)
    python bench/serve.py --long 1048576 --engines sparse   # one 1M-token prompt: TTFT, peak memory

Workloads (fixed seeds, greedy, ignore EOS; prompt lengths scaled by --scale):
  doc     document QA, prefill-heavy: prompts from {8K, 16K, 32K, 64K, 128K}, 256 output tokens
  gen     long generation, decode-heavy: prompts from {16K, 32K, 64K}, 1,024 output tokens
  prefix  8 questions about one 64K document (run with and without the prefix cache)
Each runs all at once (offline) and with Poisson arrivals at each --rates (requests/s); with
--http the requests go through the OpenAI-compatible server (`lserve_jax.serve`, in this process
on a thread) as streaming /v1/completions calls, and the times are the client's (`--http both`:
each run in process and then through the server, on the same warm engine). Per run:
output and total tokens/s, TTFT and TPOT p50/p99, peak pages in use, peak running sequences,
prefix-cache hit tokens. Both engines get the same memory for their KV pages (--pool-gib; the
sparse engine's pages hold only its retrieval heads, so the same bytes are more pages: the
streaming heads' small pool is counted in its share) and the same slots. Warm-up compiles the
programs the request lists use (persistent compilation cache: --compile-cache), outside the times.

--long N: one request of an N-token prompt (16 output tokens) per engine, chunked prefill, the
engine sized for it alone: TTFT and the device's peak memory (run one engine per process for a
clean peak: it is the process's). The result says so when it does not fit.

JSON: <out>/serve-<date>.json with a `summary` (serve_doc_throughput_speedup_vs_dense,
serve_gen_throughput_speedup_vs_dense, serve_gen_tpot_p50_speedup_vs_dense,
prefix_cache_ttft_speedup); a table on stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

from common import (SHAPES, environment, log, model_config, param_bytes, sparse_layout, write_json)  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lserve_jax.cache import init_cache  # noqa: E402
from lserve_jax.config import ModelConfig, SparseConfig  # noqa: E402
from lserve_jax.engine import Engine  # noqa: E402
from lserve_jax.heads import HeadLayout  # noqa: E402
from lserve_jax.kv8 import KV_DTYPES, calibration_ids, is_kv8, key_centers, with_key_centers  # noqa: E402
from lserve_jax.params import init_params  # noqa: E402
from lserve_jax.sampling import SamplingParams  # noqa: E402

TINY = dict(architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1 << 20, eos_token_ids=())

WORKLOADS = {  # name: (prompt lengths drawn from, output tokens, requests)
    "doc": ((8192, 16384, 32768, 65536, 131072), 256, 32),
    "gen": ((16384, 32768, 65536), 1024, 32),
}
PREFIX_DOC, PREFIX_QUESTIONS, PREFIX_Q_TOKENS, PREFIX_OUT = 65536, 8, 64, 64


def requests_for(name: str, scale: float, vocab: int, n: int | None, page: int, seed: int = 0):
    """[(prompt ids, max_new_tokens)] of a workload, prompt lengths scaled (at least two pages)."""
    rng = np.random.default_rng(seed)
    if name == "prefix":
        doc = rng.integers(1, vocab, max(2 * page, int(PREFIX_DOC * scale))).tolist()
        out = max(2, int(PREFIX_OUT * max(scale, 1 / 16)))
        return [(doc + rng.integers(1, vocab, PREFIX_Q_TOKENS).tolist(), out) for _ in range(n or PREFIX_QUESTIONS)]
    lengths, out, count = WORKLOADS[name]
    out = max(2, int(out * max(scale, 1 / 64)))
    return [(rng.integers(1, vocab, max(2 * page, int(rng.choice(lengths) * scale))).tolist(), out)
            for _ in range(n or count)]


def cache_bytes(cfg, layout, sparse, dtype, num_pages: int, num_stream_pages: int = 1, kv_dtype=None) -> int:
    """Bytes of a one-row cache with these pools (shapes only: nothing is allocated)."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, layout, sparse, batch=1, num_pages=num_pages,
                                               max_pages_per_seq=1, dtype=dtype, num_stream_pages=num_stream_pages,
                                               kv_dtype=kv_dtype))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def pages_for_bytes(cfg, layout, sparse, dtype, pool_bytes: int, num_stream_pages: int, kv_dtype=None) -> int:
    """The page count (scratch page included) whose pool, with the streaming pool beside it,
    takes `pool_bytes`: the same memory buys a sparse layout (and 8-bit KV) more pages."""
    base = cache_bytes(cfg, layout, sparse, dtype, 2, 1, kv_dtype)
    page = cache_bytes(cfg, layout, sparse, dtype, 3, 1, kv_dtype) - base
    stream = cache_bytes(cfg, layout, sparse, dtype, 2, num_stream_pages, kv_dtype) - base
    return max(2, int((pool_bytes - stream) // page) + 1)


def default_pool_bytes(cfg, sparse, dtype, max_seq: int, params) -> int:
    """Four max-length sequences of the dense layout, at most 55% of what the device has left
    after the weights (the rest: activations, the streaming pool, compiled programs)."""
    dense = HeadLayout.dense(cfg.num_layers, cfg.num_kv_heads)
    page = cache_bytes(cfg, dense, sparse, dtype, 3) - cache_bytes(cfg, dense, sparse, dtype, 2)
    want = 4 * (max_seq // sparse.page_size) * page
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        want = min(want, int(0.55 * (stats["bytes_limit"] - param_bytes(params))))
    return want


def peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def percentile(xs, q):
    return float(np.percentile(xs, q)) if xs else None


def run(engine: Engine, reqs, rate: float | None, seed: int = 1) -> dict:
    """Serves `reqs` (all at t=0 when rate is None, else Poisson arrivals) to the end."""
    rng = np.random.default_rng(seed)
    arrivals = np.zeros(len(reqs)) if rate is None else np.cumsum(rng.exponential(1 / rate, len(reqs)))
    sched = engine.scheduler
    hits0 = sched.prefix_hit_total
    first, last, count, added = {}, {}, {}, {}
    peak_pages = peak_running = 0
    t0 = time.perf_counter()
    i = 0
    while i < len(reqs) or engine.has_unfinished():
        now = time.perf_counter() - t0
        while i < len(reqs) and arrivals[i] <= now:
            ids, out = reqs[i]
            rid = engine.add_request(ids, SamplingParams(max_new_tokens=out, ignore_eos=True), request_id=f"r{i}")
            added[rid] = time.perf_counter()
            i += 1
        if not engine.has_unfinished():
            time.sleep(min(0.01, max(0.0, arrivals[i] - now)))
            continue
        outs = engine.step()
        t = time.perf_counter()
        for o in outs:
            if o.new_token_ids:
                first.setdefault(o.request_id, t)
                last[o.request_id] = t
                count[o.request_id] = len(o.token_ids)
        alloc = sched.allocator
        peak_pages = max(peak_pages, alloc.num_pages - 1 - sched.reclaimable_pages())
        peak_running = max(peak_running, sum(1 for r in sched.running() if r.prefill_done))
    wall = time.perf_counter() - t0
    ttft = [first[r] - added[r] for r in added]
    tpot = [(last[r] - first[r]) / (count[r] - 1) for r in added if count.get(r, 0) > 1]
    out_tokens = sum(count.values())
    prompt_tokens = sum(len(ids) for ids, _ in reqs)
    return {"requests": len(reqs), "rate": rate, "wall_s": wall, "output_tokens": out_tokens,
            "output_tok_s": out_tokens / wall, "total_tok_s": (out_tokens + prompt_tokens) / wall,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
            "peak_pages": peak_pages, "peak_running": peak_running,
            "prefix_hit_tokens": sched.prefix_hit_total - hits0}


def word_tokenizer(vocab: int, folder: str):
    """A word-level tokenizer over the vocabulary (id i <-> "wi"): every token has text, so the
    server streams one delta per token of a random-weight model."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    from lserve_jax.tokenizer import Tokenizer

    tok = HFTokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i for i in range(1, vocab)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = os.path.join(folder, "bench-tokenizer.json")
    tok.save(path)
    return Tokenizer(path)


def run_http(engine: Engine, reqs, rate: float | None, seed: int = 1) -> dict:
    """`run` through the HTTP server: one streaming /v1/completions call per request, at its
    arrival time, on a thread of its own; TTFT and TPOT from the client's clock."""
    import socket
    import threading

    import httpx

    from lserve_jax.serve import build_server

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = build_server(engine, host="127.0.0.1", port=port, log_level="warning", max_queue=1 << 16)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/completions"
    rng = np.random.default_rng(seed)
    arrivals = np.zeros(len(reqs)) if rate is None else np.cumsum(rng.exponential(1 / rate, len(reqs)))
    sched = engine.scheduler
    hits0 = sched.prefix_hit_total
    res: dict[int, dict] = {}
    peak = {"pages": 0, "running": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["pages"] = max(peak["pages"], sched.allocator.num_pages - 1 - sched.reclaimable_pages())
            peak["running"] = max(peak["running"], sum(1 for r in sched.running() if r.prefill_done))
            time.sleep(0.01)

    def call(i, ids, out):
        body = {"prompt": ids, "max_tokens": out, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        first = last = None
        n = 0
        with httpx.stream("POST", url, json=body, timeout=None) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
                elif chunk.get("choices") and chunk["choices"][0].get("text"):
                    last = time.perf_counter()
                    first = first or last
        res[i] = {"ttft": first - t0, "tpot": (last - first) / (n - 1) if n > 1 else None, "tokens": n}

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    calls = []
    for i, (ids, out) in enumerate(reqs):
        time.sleep(max(0.0, arrivals[i] - (time.perf_counter() - t0)))
        calls.append(threading.Thread(target=call, args=(i, ids, out)))
        calls[-1].start()
    for c in calls:
        c.join()
    wall = time.perf_counter() - t0
    stop.set()
    server.should_exit = True
    thread.join(30)
    ttft = [r["ttft"] for r in res.values()]
    tpot = [r["tpot"] for r in res.values() if r["tpot"] is not None]
    out_tokens = sum(r["tokens"] for r in res.values())
    prompt_tokens = sum(len(ids) for ids, _ in reqs)
    return {"requests": len(reqs), "rate": rate, "wall_s": wall, "output_tokens": out_tokens,
            "output_tok_s": out_tokens / wall, "total_tok_s": (out_tokens + prompt_tokens) / wall,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
            "peak_pages": peak["pages"], "peak_running": peak["running"],
            "prefix_hit_tokens": sched.prefix_hit_total - hits0, "http": True}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES) + ["tiny"])
    p.add_argument("--sparsity", type=float, default=0.5, help="static sparsity of the head pattern")
    p.add_argument("--scale", type=float, default=1.0, help="prompt (and output) lengths times this")
    p.add_argument("--workloads", default="doc,gen,prefix")
    p.add_argument("--requests", type=int, help="requests per workload (default: the workload's)")
    p.add_argument("--rates", default="0.5,2", help="Poisson arrival rates in requests/s ('' for offline only)")
    p.add_argument("--max-slots", type=int, default=32)
    p.add_argument("--pool-gib", type=float,
                   help="GiB of KV pages per engine (default: 4 max-length dense sequences, at most 55%% of "
                        "the device memory the weights leave)")
    p.add_argument("--long", type=int, metavar="N", help="instead of the workloads: one N-token prompt per engine")
    p.add_argument("--compile-cache", default=os.path.join("/tmp", "lserve-jax-compile-cache"),
                   help="persistent compilation cache folder ('' for none): engines of the same shapes "
                        "compile once")
    p.add_argument("--prefill-chunk", default="auto", help="tokens per prefill chunk, 'auto' or 'none'")
    p.add_argument("--decode-steps", default="auto",
                   help="decode steps per dispatch for both engines ('auto': the engine's, 4 on a GPU)")
    p.add_argument("--kv-dtype", default="auto", choices=("auto", "int8", "fp8_e4m3"),
                   help="how both engines store K and V (8-bit: the same --pool-gib holds about twice the pages)")
    p.add_argument("--engines", default="sparse,dense",
                   help="which engines run (one call can take one engine; --tag keeps the JSONs apart)")
    p.add_argument("--tag", default="", help="suffix of the JSON name: serve-<date><tag>.json")
    p.add_argument("--http", nargs="?", const="on", default="off", choices=("off", "on", "both"),
                   help="through the OpenAI-compatible server (streaming calls); 'both': every run in process "
                        "and then through the server on the same warm engine (one warm-up; two JSONs, "
                        "serve-<date><tag>.json and serve-http-<date><tag>.json)")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON results")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="no run: combine the runs of these result files (e.g. one per engine) into one "
                        "JSON with the summary, written to --out")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.tag)
    if args.http != "off":  # before any warm-up: the server's packages (a GPU image may lack them)
        missing = [m for m in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(m) is None]
        if missing:
            p.error(f"--http needs {', '.join(missing)} (pip install {' '.join(missing)})")
    if args.long is not None and args.long < 1:
        p.error(f"--long takes a positive number of prompt tokens, got {args.long}")
    if args.pool_gib is not None and not args.pool_gib > 0:
        p.error(f"--pool-gib must be positive, got {args.pool_gib}")
    steps = args.decode_steps
    if steps != "auto":
        if not steps.isdigit() or int(steps) < 1:
            p.error(f"--decode-steps takes a positive number of steps or 'auto', got {steps!r}")
        args.decode_steps = int(steps)

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    engines = [e for e in args.engines.split(",") if e]
    if not engines or set(engines) - {"sparse", "dense"}:
        p.error(f"--engines takes sparse and/or dense, got {args.engines!r}")
    cfg = ModelConfig(**TINY) if args.shape == "tiny" else model_config(args.shape)
    env = environment()
    log("env", env)
    dtype = jnp.float32 if args.shape == "tiny" else jnp.bfloat16
    params = init_params(cfg, jax.random.key(0), dtype)
    if is_kv8(KV_DTYPES[args.kv_dtype]):  # the key centres once, for every engine (`kv8.key_centers`)
        params = with_key_centers(params, key_centers(params, cfg, calibration_ids(None, cfg.vocab_size)))
    sparse = SparseConfig()
    if args.shape == "tiny":
        sparse = SparseConfig(page_size=16, logical_page_size=4, prefill_sink=16, prefill_local=64,
                              decode_sink=16, decode_local=32, token_budget=128)
        layout = HeadLayout(2, (1, 1))
    else:
        layout = sparse_layout(args.shape, cfg, args.sparsity, 1)
    layouts = {"sparse": layout, "dense": HeadLayout.dense(cfg.num_layers, cfg.num_kv_heads)}
    chunk = None if args.prefill_chunk == "none" else (args.prefill_chunk if args.prefill_chunk == "auto"
                                                       else int(args.prefill_chunk))
    if args.long:
        return run_long(args, cfg, params, sparse, layouts, engines, chunk, env, dtype)
    workloads = [w for w in args.workloads.split(",") if w]
    reqs = {w: requests_for(w, args.scale, cfg.vocab_size, args.requests, sparse.page_size) for w in workloads}
    longest = max(len(ids) + out for rs in reqs.values() for ids, out in rs)
    max_seq = -(-longest // sparse.page_size) * sparse.page_size
    pool = int(args.pool_gib * (1 << 30)) if args.pool_gib else default_pool_bytes(cfg, sparse, dtype, max_seq, params)
    rates = [None] + [float(r) for r in args.rates.split(",") if r]
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.http]  # through the server?
    files, results = {}, {}
    for http in modes:
        results[http] = {"env": env, "shape": args.shape, "http": http, "scale": args.scale, "pool_bytes": pool,
                         "kv_dtype": args.kv_dtype, "max_slots": args.max_slots, "max_seq_len": max_seq,
                         "num_pages": {}, "runs": []}
        files[http] = os.path.join(args.out, f"serve{'-http' if http else ''}-{env['date'][:10]}{args.tag}.json")
    lengths = sorted({len(ids) for rs in reqs.values() for ids, _ in rs})
    for name in engines:
        lay = layouts[name]
        for cache_on in ((True, False) if "prefix" in workloads else (True,)):
            kw = dict(layout=lay, sparse=sparse, max_seq_len=max_seq, max_slots=args.max_slots, prefill_chunk=chunk,
                      prefix_cache=cache_on, kv_dtype=args.kv_dtype, decode_steps=args.decode_steps)
            stream_pages = Engine(params, cfg, num_pages=2, **kw).num_stream_pages
            pages = pages_for_bytes(cfg, lay, sparse, dtype, pool, stream_pages, KV_DTYPES[args.kv_dtype])
            if pages - 1 < max_seq // sparse.page_size:
                raise SystemExit(f"{pool / (1 << 30):.2f} GiB of KV pages give the {name} engine {pages - 1} pages "
                                 f"(its streaming pool: {stream_pages}); the longest request needs "
                                 f"{max_seq // sparse.page_size}: raise --pool-gib")
            eng = Engine(params, cfg, num_pages=pages, **kw,
                         tokenizer=word_tokenizer(cfg.vocab_size, args.out) if any(modes) else None)
            for res in results.values():
                res["num_pages"][name] = pages
                res["decode_steps"] = eng.decode_steps
            log(f"{name} engine (prefix cache {'on' if cache_on else 'off'}, {pages} pages, "
                f"chunk {eng.prefill_chunk}): warm-up ...")
            t = time.perf_counter()
            eng.warmup(prompt_lengths=lengths)
            log(f"warm-up {time.perf_counter() - t:.1f}s")
            for w in workloads:
                if (w == "prefix") != (not cache_on) and w != "prefix" and not cache_on:
                    continue  # the cache-off engine runs the prefix workload only
                for rate in ([None] if w == "prefix" else rates):
                    for http in modes:
                        eng.scheduler.cache and eng.scheduler.cache.clear()
                        r = (run_http if http else run)(eng, reqs[w], rate)
                        r.update(engine=name, workload=w, prefix_cache=cache_on, num_pages=pages)
                        results[http]["runs"].append(r)
                        log(f"{name:6} {w:6} rate={rate} cache={cache_on}{' http' if http else ''}: "
                            f"out {r['output_tok_s']:.1f} tok/s, total {r['total_tok_s']:.1f} tok/s, "
                            f"ttft p50 {r['ttft_p50_s']:.3f}s, tpot p50 {r['tpot_p50_s'] or 0:.4f}s, "
                            f"peak running {r['peak_running']}, hits {r['prefix_hit_tokens']}")
                        write_json(files[http], results[http])
            del eng
    for http in modes:
        results[http]["summary"] = summarize(results[http]["runs"])
        write_json(files[http], results[http])
        print_table(results[http])
    return results[modes[-1]]


LONG_OUT = 16


def run_long(args, cfg, params, sparse, layouts, engines, chunk, env, dtype) -> dict:
    """One prompt of `args.long` tokens per engine (alone, chunked prefill): TTFT, the device's
    peak memory, or the error when it does not fit."""
    n = int(args.long)
    ids = np.random.default_rng(0).integers(1, cfg.vocab_size, n).tolist()
    max_seq = -(-(n + LONG_OUT) // sparse.page_size) * sparse.page_size
    out_file = os.path.join(args.out, f"serve-long-{env['date'][:10]}{args.tag}.json")
    results = {"env": env, "shape": args.shape, "prompt_tokens": n, "kv_dtype": args.kv_dtype, "runs": []}
    for name in engines:
        row = {"engine": name, "prompt_tokens": n}
        try:
            eng = Engine(params, cfg, layout=layouts[name], sparse=sparse, max_seq_len=max_seq, max_slots=1,
                         prefill_chunk=chunk, prefix_cache=False, kv_dtype=args.kv_dtype,
                         decode_steps=args.decode_steps)
            row["prefill_chunk"], row["decode_steps"] = eng.prefill_chunk, eng.decode_steps
            log(f"{name}: {n}-token prompt in chunks of {eng.prefill_chunk}: warm-up ...")
            t = time.perf_counter()
            eng.warmup(prompt_lengths=[n])
            row["warmup_s"] = time.perf_counter() - t
            r = run(eng, [(ids, LONG_OUT)], None)
            row.update(ttft_s=r["ttft_p50_s"], tpot_s=r["tpot_p50_s"], output_tokens=r["output_tokens"],
                       wall_s=r["wall_s"], served=r["output_tokens"] == LONG_OUT)
            del eng
        except Exception as e:  # noqa: BLE001  (out of memory, most often: the result says so)
            row.update(served=False, error=f"{type(e).__name__}: {str(e)[:500]}")
        row["peak_bytes"] = peak_memory()
        results["runs"].append(row)
        log(name, {k: v for k, v in row.items() if k != "error"}, row.get("error", ""))
        write_json(out_file, results)
    served = [r["prompt_tokens"] for r in results["runs"] if r["served"] and r["engine"] == "sparse"]
    results["summary"] = {"max_prompt_tokens_served": max(served)} if served else {}
    write_json(out_file, results)
    print(f"{'engine':7} {'prompt':>8} {'TTFT s':>8} {'TPOT ms':>8} {'peak GiB':>9} served")
    for r in results["runs"]:
        peak = f"{r['peak_bytes'] / (1 << 30):9.1f}" if r.get("peak_bytes") else f"{'-':>9}"
        print(f"{r['engine']:7} {r['prompt_tokens']:8d} {r.get('ttft_s') or 0:8.2f} {1e3 * (r.get('tpot_s') or 0):8.2f} "
              f"{peak} {r['served']}")
    return results


def merge(paths, out, tag="") -> dict:
    """One result file from several (same shape and scale; runs concatenated, summary recomputed)."""
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    keys = ("shape", "scale", "http", "pool_bytes", "max_slots", "max_seq_len")
    for p in parts[1:]:
        diff = [k for k in keys if p.get(k) != parts[0].get(k)]
        if diff:
            raise SystemExit(f"cannot merge runs that differ in {diff}")
    results = {**parts[0], "merged_from": [os.path.basename(x) for x in paths],
               "num_pages": {k: v for p in parts for k, v in p.get("num_pages", {}).items()},
               "runs": [r for p in parts for r in p["runs"]]}
    results["summary"] = summarize(results["runs"])
    name = f"serve{'-http' if results['http'] else ''}-{results['env']['date'][:10]}{tag or '-merged'}.json"
    write_json(os.path.join(out, name), results)
    print_table(results)
    return results


def _find(runs, **kw):
    for r in runs:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def _ratio(a, b):
    return a / b if a and b else None


def summarize(runs) -> dict:
    s = {}
    sd, dd = _find(runs, engine="sparse", workload="doc", rate=None, prefix_cache=True), \
        _find(runs, engine="dense", workload="doc", rate=None, prefix_cache=True)
    if sd and dd:
        s["serve_doc_throughput_speedup_vs_dense"] = _ratio(sd["total_tok_s"], dd["total_tok_s"])
        s["serve_doc_ttft_p50_speedup_vs_dense"] = _ratio(dd["ttft_p50_s"], sd["ttft_p50_s"])
    sg, dg = _find(runs, engine="sparse", workload="gen", rate=None, prefix_cache=True), \
        _find(runs, engine="dense", workload="gen", rate=None, prefix_cache=True)
    if sg and dg:
        s["serve_gen_throughput_speedup_vs_dense"] = _ratio(sg["output_tok_s"], dg["output_tok_s"])
        s["serve_gen_tpot_p50_speedup_vs_dense"] = _ratio(dg["tpot_p50_s"], sg["tpot_p50_s"])
        s["serve_gen_peak_running"] = {"sparse": sg["peak_running"], "dense": dg["peak_running"]}
    on, off = _find(runs, engine="sparse", workload="prefix", prefix_cache=True), \
        _find(runs, engine="sparse", workload="prefix", prefix_cache=False)
    if on and off:
        s["prefix_cache_ttft_speedup"] = _ratio(off["ttft_p50_s"], on["ttft_p50_s"])
        s["prefix_cache_hit_tokens"] = on["prefix_hit_tokens"]
    return s


def print_table(results) -> None:
    print(f"{'engine':7} {'workload':8} {'rate':>5} {'cache':5} {'out tok/s':>10} {'tot tok/s':>10} "
          f"{'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'peak run':>8} {'hits':>8}")
    for r in results["runs"]:
        print(f"{r['engine']:7} {r['workload']:8} {str(r['rate'] or '-'):>5} {str(r['prefix_cache']):5} "
              f"{r['output_tok_s']:10.1f} {r['total_tok_s']:10.1f} {r['ttft_p50_s']:9.3f} {r['ttft_p99_s']:9.3f} "
              f"{(r['tpot_p50_s'] or 0):9.4f} {r['peak_running']:8d} {r['prefix_hit_tokens']:8d}")
    print("summary", results["summary"])


if __name__ == "__main__":
    main()
