"""A small reader of JAX profiler traces (`*.xplane.pb`) without TensorFlow: per-kernel GPU time.

    python bench/xplane.py TRACE_DIR [--steps N] [--top 30]

The trace is XSpace protobuf; this decodes the few fields it needs from the wire format
(planes -> lines -> events with metadata names and durations) and sums the events of the GPU
planes' stream lines by name. Used by bench/profile_decode.py to say where a step's time goes.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import os


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def fields(buf: bytes):
    """Yields (field number, wire type, value) of one protobuf message; value is int or bytes."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            v, i = int.from_bytes(buf[i:i + 8], "little"), i + 8
        elif wt == 2:
            ln, i = _varint(buf, i)
            v, i = buf[i:i + ln], i + ln
        elif wt == 5:
            v, i = int.from_bytes(buf[i:i + 4], "little"), i + 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        yield num, wt, v


def _metadata(entry: bytes) -> tuple[int, str]:
    key, name = 0, ""
    for num, _, v in fields(entry):
        if num == 1:
            key = v
        elif num == 2:  # XEventMetadata
            for n2, _, v2 in fields(v):
                if n2 == 2:
                    name = v2.decode("utf-8", "replace")
    return key, name


def planes(path: str):
    """Yields dicts {name, lines: [{name, events: [(name, offset_ps, duration_ps)]}]}."""
    raw = open(path, "rb").read()
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    for num, _, plane in fields(raw):
        if num != 1:
            continue
        name, meta, lines = "", {}, []
        for n, _, v in fields(plane):
            if n == 2:
                name = v.decode("utf-8", "replace")
            elif n == 4:
                k, nm = _metadata(v)
                meta[k] = nm
            elif n == 3:
                lines.append(v)
        out = []
        for line in lines:
            lname, ts, events = "", 0, []
            for n, _, v in fields(line):
                if n == 2:
                    lname = v.decode("utf-8", "replace")
                elif n == 3:
                    ts = v
                elif n == 4:
                    mid = off = dur = 0
                    for n2, _, v2 in fields(v):
                        if n2 == 1:
                            mid = v2
                        elif n2 == 2:
                            off = v2
                        elif n2 == 3:
                            dur = v2
                    events.append((mid, off, dur))
            out.append({"name": lname, "timestamp_ns": ts,
                        "events": [(meta.get(m, str(m)), o, d) for m, o, d in events]})
        yield {"name": name, "lines": out}


def find_trace(directory: str) -> str:
    hits = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True))
    if not hits:
        raise FileNotFoundError(f"no *.xplane.pb under {directory}")
    return hits[-1]


def gpu_summary(path: str) -> dict:
    """Per-name GPU time (ps) over the stream lines of the GPU planes, and the busy span."""
    per = collections.Counter()
    count = collections.Counter()
    first, last, busy = None, 0, 0
    for p in planes(path):
        if "/device:GPU" not in p["name"]:
            continue
        for line in p["lines"]:
            if not line["name"].lower().startswith("stream"):
                continue
            base = line["timestamp_ns"] * 1000
            for name, off, dur in line["events"]:
                per[name] += dur
                count[name] += 1
                busy += dur
                start = base + off
                first = start if first is None else min(first, start)
                last = max(last, start + dur)
    return {"per_name_ps": dict(per), "count": dict(count), "busy_ps": busy,
            "span_ps": 0 if first is None else last - first}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", help="a directory holding a profile (searched recursively) or a .xplane.pb")
    ap.add_argument("--steps", type=int, default=1, help="divide times by this many steps")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    path = args.trace if os.path.isfile(args.trace) else find_trace(args.trace)
    s = gpu_summary(path)
    n = args.steps
    print(f"{path}\nGPU busy {s['busy_ps'] / 1e6 / n:.1f} us/step over a span of {s['span_ps'] / 1e6 / n:.1f} us/step")
    for name, ps in sorted(s["per_name_ps"].items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{ps / 1e6 / n:9.1f} us/step {s['count'][name] / n:7.1f}x  {name[:110]}")


if __name__ == "__main__":
    main()
