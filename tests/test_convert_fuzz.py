"""Random damage to a converter's source never gives a traceback or silently wrong weights.

Each test mutates a valid tiny source (a safetensors checkpoint, its config.json, a GGUF file)
with a seeded generator, many times, and runs `python -m convert`'s `main` on it. Every run
must end in one of two ways:

* exit 1 with exactly one line on stderr, "error: ..." naming the source, and no destination;
* exit 0 with weights equal to the unmutated source's, except those the mutation may have
  changed, which must still be finite and of the config's shapes.

Writing the orbax checkpoint is the one step replaced (by a no-op): it is slow, and what it
writes is tested elsewhere. Everything before it (parsing, config, renaming, checks, casting,
`from_flat`) runs for real.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from lserve_jax.convert import cli as convert_cli
from lserve_jax.convert.hf import map_name, name_table
from lserve_jax.params import flat_shapes

from .hf_models import make_hf_model
from .test_gguf import GG_GLOBAL, GG_LAYER, make_hf_weights, write_gguf

N_MUTATIONS = 150
GGUF_TO_HF = {g: h for h, g in GG_GLOBAL.items()} | {f".{g}": f".{h}" for h, g in GG_LAYER.items()}


# --- the harness -----------------------------------------------------------------------------

class Harness:
    """Runs the CLI on a source, recording what `load_source` produced."""

    def __init__(self, monkeypatch, capsys, tmp_path: Path):
        self.capsys, self.tmp, self.runs, self.result = capsys, tmp_path, 0, None
        real = convert_cli.load_source

        def spy(src, dtype, **kw):
            self.result = real(src, dtype, **kw)
            return self.result

        monkeypatch.setattr(convert_cli, "load_source", spy)

        def write_meta_only(dest, params, cfg, dtype, **kw):  # main() reads lserve.json back
            (dest / "lserve.json").write_text(json.dumps({"model": cfg.to_dict()}))

        monkeypatch.setattr(convert_cli, "write_checkpoint", write_meta_only)

    def convert(self, src: Path, what: str):
        """(config, {flat name: array}) on success, None on a clean failure; fails the test otherwise."""
        self.runs += 1
        self.result = None
        dest = self.tmp / f"out{self.runs}"
        self.capsys.readouterr()
        try:
            rc = convert_cli.main([str(src), str(dest), "--dtype", "float32", "--quiet"])
        except BaseException as e:  # noqa: BLE001 - any escape is the bug this test looks for
            pytest.fail(f"{what}: {type(e).__name__} escaped the CLI: {e}")
        err = self.capsys.readouterr().err
        if rc == 0:
            assert self.result is not None
            shutil.rmtree(dest)
            return self.result[0], self.result[1]
        lines = err.strip().splitlines()
        assert rc == 1, f"{what}: exit {rc}: {err}"
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{what}: not one error line: {err!r}"
        assert len(lines[0]) < 2100, f"{what}: error line of {len(lines[0])} characters"
        assert str(src) in lines[0], f"{what}: the message does not name the source: {lines[0]}"
        assert not dest.exists(), f"{what}: a failed conversion left {dest}"
        return None


def check_success(what: str, got, ref, changed: set[str] | None) -> None:
    """`got` = (cfg, arrays): every weight finite and of its config shape; those outside
    `changed` (flat names; None: any may have changed) equal to `ref`'s."""
    cfg, arrays = got
    shapes = flat_shapes(cfg)
    assert set(arrays) == set(shapes), what
    for name, arr in arrays.items():
        assert arr.shape == shapes[name], f"{what}: {name} {arr.shape} != {shapes[name]}"
        assert np.isfinite(arr).all(), f"{what}: {name} has non-finite values"
        if changed is not None and name not in changed and name in ref:
            np.testing.assert_array_equal(arr, ref[name], err_msg=f"{what}: {name} changed")


def flat_names(hf_names, cfg) -> set[str]:
    table = name_table(cfg)
    return {m[0] for m in (map_name(n, table) for n in hf_names) if m is not None}


def junk(rng: random.Random):
    """A value of a wrong type or range for almost any field."""
    return rng.choice([None, "", "abc", "64", -1, 0, 2 ** 64, 10 ** 30, 1.5, -0.0, float("nan"),
                       float("inf"), True, False, [], [1], [None], {}, {"a": 1}, [[2]], "x" * 300])


# --- safetensors -----------------------------------------------------------------------------

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz") / "hf"
    make_hf_model("qwen2", d)  # q/k/v biases: 1-D tensors of several sizes in the header
    return d


@pytest.fixture
def harness(monkeypatch, capsys, tmp_path):
    return Harness(monkeypatch, capsys, tmp_path)


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def mutate_safetensors(rng: random.Random, data: bytes) -> tuple[bytes, str, set[str] | None]:
    """(mutated file, description, HF names whose values may have changed; None: any)."""
    header, body = split_safetensors(data)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    op = rng.randrange(16)
    if op == 0:  # flip bytes anywhere in the header
        raw = bytearray(data)
        n = struct.unpack("<Q", data[:8])[0]
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(8, 8 + n)] = rng.randrange(256)
        return bytes(raw), "header bytes flipped", None
    if op == 1:
        return data[: rng.randrange(len(data))], "truncated", None
    if op == 2:
        raw = bytearray(data)
        raw[:8] = struct.pack("<Q", rng.choice([0, 1, len(data), 2 ** 63, rng.randrange(1 << 20)]))
        return bytes(raw), "header length changed", None
    if op == 3:
        field = rng.choice(["dtype", "shape", "data_offsets"])
        del entry[field]
        what = f"{name}: {field} removed"
    elif op == 4:
        field = rng.choice(["dtype", "shape", "data_offsets"])
        entry[field] = junk(rng)
        what = f"{name}: {field} = {entry[field]!r}"
    elif op == 5:
        entry["dtype"] = rng.choice(["F16", "BF16", "F64", "I32", "U8", "BOOL", "f32", "F8_E4M3"])
        what = f"{name}: dtype {entry['dtype']}"
    elif op == 6:
        shape = entry["shape"]
        entry["shape"] = rng.choice([shape[::-1], shape + [1], [1] + shape, [0], [], [int(np.prod(shape))],
                                     [2 * shape[0]] + shape[1:]])
        what = f"{name}: shape {entry['shape']}"
    elif op == 7:
        a, b = entry["data_offsets"]
        d = rng.choice([-4, 4, -(b - a), b - a, 2])
        entry["data_offsets"] = [a + d, b + d] if rng.random() < 0.5 else [a, b + d]
        what = f"{name}: data_offsets {entry['data_offsets']} (were {[a, b]})"
    elif op == 8:  # swap the data of two tensors (valid when they have one size)
        other = rng.choice(names)
        entry["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], entry["data_offsets"]
        return join_safetensors(header, body), f"data_offsets of {name} and {other} swapped", {name, other}
    elif op == 9:
        header[name] = junk(rng)
        what = f"{name} entry = {header[name]!r}"
    elif op == 10:
        del header[name]
        what = f"{name} removed"
    elif op == 11:
        header[name + ".copy"] = dict(entry)
        what = f"{name} duplicated (same bytes)"
    elif op == 12:
        header[rng.choice(["model.layers.7.mlp.up_proj.weight", name.replace("layers.0", "layers.00"),
                           name.upper(), "model.layers.0.self_attn.q_proj.weight"])] = header.pop(name)
        what = f"{name} renamed"
    elif op == 13:
        header["__metadata__"] = junk(rng)
        return join_safetensors(header, body), "metadata junk", set()
    elif op == 14:  # NaN / inf bytes in a tensor's data
        a, b = entry["data_offsets"]
        raw = bytearray(body)
        pos = rng.randrange(a, b - 3) & ~3
        raw[pos:pos + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff"])
        return join_safetensors(header, bytes(raw)), f"non-finite bytes in {name}", {name}
    else:  # random data bytes: the values change, nothing else may
        a, b = entry["data_offsets"]
        raw = bytearray(body)
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(a, b)] = rng.randrange(256)
        return join_safetensors(header, bytes(raw)), f"data bytes of {name} changed", {name}
    return join_safetensors(header, body), what, {name}


def test_fuzz_safetensors(hf_source, harness, tmp_path):
    ref_cfg, ref = harness.convert(hf_source, "unmutated")
    pristine = (hf_source / WEIGHTS).read_bytes()
    src = Path(shutil.copytree(hf_source, tmp_path / "src"))
    rng = random.Random(1234)
    outcomes = {"error": 0, "ok": 0}
    for i in range(N_MUTATIONS):
        data, what, changed = mutate_safetensors(rng, pristine)
        what = f"mutation {i} ({what})"
        (src / WEIGHTS).write_bytes(data)
        got = harness.convert(src, what)
        outcomes["error" if got is None else "ok"] += 1
        if got is not None:
            check_success(what, got, ref, None if changed is None else flat_names(changed, ref_cfg))
    assert outcomes["error"] > N_MUTATIONS // 2 and outcomes["ok"] > 0, outcomes


# --- config.json -----------------------------------------------------------------------------

CONFIG_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "rope_scaling", "rope_parameters", "eos_token_id", "bos_token_id", "tie_word_embeddings",
               "attention_bias", "sliding_window", "use_sliding_window", "architectures", "model_type",
               "partial_rotary_factor", "original_max_position_embeddings"]


def mutate_config(rng: random.Random, pristine: dict) -> tuple[str, str]:
    """(config.json text, description)."""
    cfg = json.loads(json.dumps(pristine))
    op = rng.randrange(10)
    key = rng.choice(CONFIG_KEYS)
    old = cfg.get(key, "<absent>")
    if op == 0:
        text = json.dumps(cfg)
        return text[: rng.randrange(len(text))], "truncated"
    if op == 1:
        return json.dumps(rng.choice([[cfg], "config", 3, None, []])), "not an object"
    if op == 6 and not (isinstance(old, (int, float)) and not isinstance(old, bool)):
        op = 5  # not a number: scaling it means nothing, put junk there instead
    if op == 2:
        cfg.pop(key, None)
    elif op == 3:
        cfg[key] = None
    elif op in (4, 5):
        cfg[key] = junk(rng)
    elif op == 6:
        cfg[key] = rng.choice([-old, 0, old * 2, old + 0.5, old * 1000003, 2 ** 40, -1, 1])
    elif op == 7:  # RoPE dicts: their own fields
        key = rng.choice(["rope_scaling", "rope_parameters"])
        cfg[key] = {"rope_type": rng.choice(["linear", "llama3", "yarn", "dynamic", "default", None, 3])}
        for k in rng.sample(["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                             "beta_fast", "beta_slow", "attention_factor", "mscale", "truncate"], 3):
            cfg[key][k] = rng.choice([1.0, 4.0, 8.0, 64, 0, -2.0, None, "x", True, [1], float("inf"),
                                      float("nan"), 1e308])
    elif op == 8:  # one of the several eos / bos shapes
        key = rng.choice(["eos_token_id", "bos_token_id"])
        cfg[key] = rng.choice([[1, 2], [], [2, None], [-1], 5, "2", [[2]]])
    else:  # huge sizes must fail fast, with a short message
        key = rng.choice(["num_hidden_layers", "hidden_size", "vocab_size", "intermediate_size"])
        cfg[key] = rng.choice([10 ** 9, 2 ** 62, 10 ** 30, 100000])
    return json.dumps(cfg), f"{key}: {pristine.get(key, '<absent>')!r} -> {cfg.get(key, '<removed>')!r}"


def test_fuzz_config(hf_source, harness, tmp_path):
    ref_cfg, ref = harness.convert(hf_source, "unmutated")
    pristine = json.loads((hf_source / "config.json").read_text())
    src = Path(shutil.copytree(hf_source, tmp_path / "src"))
    rng = random.Random(99)
    outcomes = {"error": 0, "ok": 0}
    for i in range(N_MUTATIONS):
        text, what = mutate_config(rng, pristine)
        what = f"mutation {i} ({what})"
        (src / "config.json").write_text(text)
        got = harness.convert(src, what)
        outcomes["error" if got is None else "ok"] += 1
        if got is not None:  # the weights did not move: whatever config still fits them reads them as they are
            check_success(what, got, ref, set())
    assert outcomes["error"] > N_MUTATIONS // 2 and outcomes["ok"] > 0, outcomes


# --- GGUF ------------------------------------------------------------------------------------

def _offset(part: np.ndarray, base: np.ndarray) -> int:
    return part.__array_interface__["data"][0] - base.__array_interface__["data"][0]


@pytest.fixture(scope="module")
def gguf_source(tmp_path_factory):
    """A small Llama GGUF (Q8_0 matrices, F32 norms) and where its mutable fields lie."""
    path = write_gguf(tmp_path_factory.mktemp("fuzz") / "m.gguf", "llama", make_hf_weights(3),
                      quant=gguf.GGMLQuantizationType.Q8_0)
    r = gguf.GGUFReader(str(path))
    scalars, strings, types = [], [], []
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        types.append((key, _offset(f.parts[2], r.data)))
        if len(f.parts) == 4:  # key_len, key, type, value
            scalars.append((key, _offset(f.parts[3], r.data), f.parts[3].dtype))
        elif len(f.parts) == 5:  # key_len, key, type, str_len, str
            strings.append((key, _offset(f.parts[4], r.data), len(f.parts[4])))
    tensors = []
    for t in r.tensors:
        _, _, _, dims, ttype, offs = t.field.parts
        tensors.append(dict(name=t.name, dims=_offset(dims, r.data), n_dims=len(dims), type=_offset(ttype, r.data),
                            offset=_offset(offs, r.data), data=int(t.data_offset), n_bytes=int(t.n_bytes)))
    return path, dict(scalars=scalars, strings=strings, types=types, tensors=tensors)


def hf_name_of_gguf(gname: str) -> str:
    if gname in GGUF_TO_HF:
        return GGUF_TO_HF[gname]
    _, layer, rest = gname.split(".", 2)
    return f"model.layers.{layer}{GGUF_TO_HF['.' + rest]}"


QK = {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qk"}


def mutate_gguf(rng: random.Random, data: bytes, layout: dict) -> tuple[bytes, str, set[str] | None]:
    raw = bytearray(data)
    op = rng.randrange(9)
    if op == 0:
        key, off, dtype = rng.choice(layout["scalars"])
        if dtype.kind == "f":
            v = rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e-30, 3e38, 12345.0, 2.0])
        elif dtype.kind == "b":
            v = rng.choice([0, 1, 2, 255])
        else:
            v = rng.choice([0, 1, 2, 3, 7, 16, 63, 64, 100000, 2 ** 31, -1])
        raw[off:off + dtype.itemsize] = np.array(v).astype(dtype).tobytes()
        # head counts steer the q/k un-permutation, the rest only config or tokenizer
        return bytes(raw), f"{key} = {v}", QK
    if op == 1:
        key, off = rng.choice(layout["types"])
        raw[off:off + 4] = struct.pack("<I", rng.choice([0, 4, 5, 6, 8, 9, 12, 13, 99]))
        return bytes(raw), f"type of {key} changed", None
    if op == 2:
        key, off, n = rng.choice(layout["strings"])
        if n:
            raw[off + rng.randrange(n)] = rng.choice([0, 0x41, 0xff, 0x80])
        return bytes(raw), f"a byte of {key} changed", QK
    t = rng.choice(layout["tensors"])
    name = hf_name_of_gguf(t["name"]) if t["name"] != "rope_freqs.weight" else None
    if op == 3:
        new = rng.choice(list(gguf.GGMLQuantizationType)).value if rng.random() < 0.8 else rng.randrange(64)
        raw[t["type"]:t["type"] + 4] = struct.pack("<I", new)
        return bytes(raw), f"{t['name']}: type {new}", {name}
    if op == 4:
        d = rng.randrange(t["n_dims"])
        at = t["dims"] + 8 * d
        old = struct.unpack("<Q", raw[at:at + 8])[0]
        raw[at:at + 8] = struct.pack("<Q", rng.choice([0, 1, old * 2, old // 2, old + 32, 2 ** 40, 2 ** 63]))
        return bytes(raw), f"{t['name']}: dim {d} changed", {name}
    if op == 5:
        old = struct.unpack("<Q", raw[t["offset"]:t["offset"] + 8])[0]
        new = max(0, old + rng.choice([-32, 32, -4, 4, 1, -t["n_bytes"], t["n_bytes"], 2 ** 40]))
        raw[t["offset"]:t["offset"] + 8] = struct.pack("<Q", new)
        return bytes(raw), f"{t['name']}: offset {old} -> {new}", {name}
    if op == 6:
        return bytes(raw[: rng.randrange(len(raw))]), "truncated", None
    if op == 7:  # non-finite bytes in the data: an F32 NaN, or a NaN Q8_0 block scale (f16 0xffff)
        pos = t["data"] + rng.randrange(0, t["n_bytes"] - 3, 2)
        raw[pos:pos + 4] = b"\xff\xff\xff\xff"
        return bytes(raw), f"NaN bytes in {t['name']}", {name}
    for _ in range(rng.randint(1, 6)):  # bytes anywhere before the data
        raw[rng.randrange(layout["tensors"][0]["data"])] = rng.randrange(256)
    return bytes(raw), "header bytes flipped", None


def test_fuzz_gguf(gguf_source, harness, tmp_path):
    path, layout = gguf_source
    ref_cfg, ref = harness.convert(path, "unmutated")
    pristine = path.read_bytes()
    src = tmp_path / "m.gguf"
    rng = random.Random(7)
    outcomes = {"error": 0, "ok": 0}
    for i in range(N_MUTATIONS):
        data, what, changed = mutate_gguf(rng, pristine, layout)
        what = f"mutation {i} ({what})"
        src.write_bytes(data)
        got = harness.convert(src, what)
        outcomes["error" if got is None else "ok"] += 1
        if got is not None:
            check_success(what, got, ref, None if changed is None else flat_names(changed - {None}, ref_cfg))
    assert outcomes["error"] > N_MUTATIONS // 2 and outcomes["ok"] > 0, outcomes
