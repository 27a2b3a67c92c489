"""bench/peer_hf.py's random-weights path (the one the H200 runs) end to end on CPU: an HF
LlamaForCausalLM of the SmolLM2 shape with random float32 weights, copied into lserve_jax; both
decode greedily and must agree token for token."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("transformers")
pytest.importorskip("torch")


@pytest.mark.parametrize("per_config", [False, True])
def test_random_weights_path_agrees_with_hf(tmp_path, monkeypatch, per_config):
    """One engine shared by every (length, batch), or one per configuration: the same tokens."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import peer_hf

    lengths, variants = ("20", ("dense",)) if per_config else ("48,20", ("dense", "sparse"))  # CI's time
    rc = peer_hf.main(["--shape", "smollm2-135m", "--random-weights", "--device", "cpu", "--dtype", "float32",
                       "--lengths", lengths, "--batches", "2", "--new-tokens", "4", "--agree", "4", "--repeats", "1",
                       "--variants", ",".join(variants), "--out", str(tmp_path), "--tag", "t"]
                      + ["--engine-per-config"] * per_config)
    assert rc == 0
    with open(tmp_path / "peer_hf-t.json") as f:
        report = json.load(f)
    assert report["partial"] is False and not (tmp_path / "peer_hf-t.json.tmp").exists()
    assert [(r["prompt_tokens"], r["batch"]) for r in report["results"]] == [(int(n), 2) for n in lengths.split(",")]
    for row in report["results"]:
        assert row["hf"]["ttft_s"] > 0 and row["hf"]["decode_tok_s"] > 0
        for v in variants:
            r = row[f"lserve_jax-{v}"]
            assert r["ttft_s"] > 0 and r["decode_tok_s"] > 0
            assert r["agree"], (v, row["batch"], r)  # random weights, float32: the same greedy tokens
    assert f"| random-{lengths.split(',')[0]} | {lengths.split(',')[0]} | 2 | lserve_jax-{variants[-1]} |" in report["table"]
    sys.modules.pop("peer_hf", None)


def test_batch_rates_counts_the_window_where_every_row_decodes(monkeypatch):
    """Rows admitted one after another: TTFT is the last row's first token; the rate counts the
    tokens of all rows between the last row's first token and the first row's last (no row idle)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import peer_hf

    row0 = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6]  # admitted first: decodes while row 1 prefills
    row1 = [1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9]
    r = peer_hf.batch_rates(0.5, [row0, row1])
    assert r["ttft_s"] == pytest.approx(0.8)  # 1.3 - 0.5
    assert r["decode_window_tokens"] == 6  # (1.3, 1.6]: 1.4, 1.5, 1.6 of each row
    assert r["decode_tok_s"] == pytest.approx(6 / 0.3)
    one = peer_hf.batch_rates(0.5, [row0])  # one row: every token after the first
    assert one["ttft_s"] == pytest.approx(0.5) and one["decode_tok_s"] == pytest.approx(6 / 0.6)
    assert peer_hf.batch_rates(0.0, [[1.0], [2.0]])["decode_tok_s"] is None  # no window: no rate
    sys.modules.pop("peer_hf", None)
