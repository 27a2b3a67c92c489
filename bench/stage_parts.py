"""Move a file larger than one device call's carry limit (64 MiB with the working tree) onto a
warm device machine in parts, one part per call, and check it whole.

Here, before each call (writes part INDEX into DIR, removing any other part there):

    python bench/stage_parts.py split /work/qwen/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --index 0 --dir .carry

then the call, with `carry: [".carry"]`, starts with

    python bench/stage_parts.py join .carry /tmp/qwen.gguf --sha256 1d9614...ff32 && ...

`join` appends the parts it finds in DIR to DEST in index order, remembering which it has taken
(DEST.parts), so a repeated call adds nothing twice; once every part is in, it checks the size
and the SHA-256 and prints `complete`; exit 0 while parts are missing (the next call brings one),
1 on a hash mismatch or a gap. The machine must stay warm between the calls (its /tmp is lost
when it goes back): issue them back to back.

The Qwen2.5-Coder-0.5B GGUF (491,400,064 bytes, ../shared/BENCH.md) goes in 9 parts of 56 MiB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

PART_BYTES = 56 << 20  # with the ~4 MB working tree, well under the 64 MiB a call carries


def part_name(src: str, index: int, count: int) -> str:
    return f"{os.path.basename(src)}.part{index:03d}of{count:03d}"


def split(src: str, index: int, out_dir: str, part_bytes: int = PART_BYTES) -> str:
    """Writes part `index` of `src` into out_dir (any other part there is removed); returns its path."""
    size = os.path.getsize(src)
    count = -(-size // part_bytes)
    if not 0 <= index < count:
        raise ValueError(f"{src} has {count} parts of {part_bytes} bytes; index {index} is out of range")
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
        if ".part" in f:
            os.remove(os.path.join(out_dir, f))
    path = os.path.join(out_dir, part_name(src, index, count))
    with open(src, "rb") as fi, open(path, "wb") as fo:
        fi.seek(index * part_bytes)
        fo.write(fi.read(part_bytes))
    return path


def _parse(name: str) -> tuple[int, int] | None:
    tail = name.rpartition(".part")[2]
    i, sep, n = tail.partition("of")
    return (int(i), int(n)) if sep and i.isdigit() and n.isdigit() else None


def join(parts_dir: str, dest: str, sha256: str | None = None) -> str:
    """Appends the parts in parts_dir that dest still lacks, in order; returns "complete",
    "waiting for part N of M" or raises ValueError (a part out of order, a hash mismatch)."""
    log = dest + ".parts"
    state = json.load(open(log)) if os.path.exists(log) else {"taken": [], "count": None}
    found = sorted((p, f) for f in os.listdir(parts_dir) if (p := _parse(f)))
    for (index, count), f in found:
        if index in state["taken"]:
            continue
        if state["count"] not in (None, count):
            raise ValueError(f"{f}: {count} parts, earlier parts said {state['count']}")
        if index != len(state["taken"]):
            raise ValueError(f"{f} is part {index}, but {dest} has parts 0..{len(state['taken']) - 1}: "
                             f"bring part {len(state['taken'])} first")
        with open(os.path.join(parts_dir, f), "rb") as fi, open(dest, "ab") as fo:
            fo.write(fi.read())
        state["taken"].append(index)
        state["count"] = count
        with open(log, "w") as fo:
            json.dump(state, fo)
    if state["count"] is None or len(state["taken"]) < state["count"]:
        return f"waiting for part {len(state['taken'])} of {state['count'] or '?'}"
    if sha256:
        h = hashlib.sha256()
        with open(dest, "rb") as fi:
            for block in iter(lambda: fi.read(1 << 24), b""):
                h.update(block)
        if h.hexdigest() != sha256:
            raise ValueError(f"{dest}: SHA-256 {h.hexdigest()}, expected {sha256}")
    return "complete"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="write one part of a file (here)")
    s.add_argument("src")
    s.add_argument("--index", type=int, required=True)
    s.add_argument("--dir", default=".carry")
    s.add_argument("--part-bytes", type=int, default=PART_BYTES)
    j = sub.add_parser("join", help="append the parts found to the destination (on the device)")
    j.add_argument("dir")
    j.add_argument("dest")
    j.add_argument("--sha256")
    a = p.parse_args(argv)
    try:
        if a.cmd == "split":
            print(split(a.src, a.index, a.dir, a.part_bytes))
        else:
            print(join(a.dir, a.dest, a.sha256))
    except (OSError, ValueError) as e:
        print(f"stage_parts: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
