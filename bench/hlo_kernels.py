"""Which source op each kernel of a compiled step comes from, from XLA's dump of it.

    XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text" python bench/profile_decode.py ...
    python bench/hlo_kernels.py /tmp/hlo --module decode_step            # table on stdout
    python bench/hlo_kernels.py /tmp/hlo --module decode_step --layer 3  # one layer, in order

Reads the module's thunk sequence (`*.thunk_sequence_after_thunk_passes.txt`: every kernel
launch in execution order, the branches of conditionals included, and the command buffers
holding them) and its optimised HLO (`*after_optimizations.txt`: each fusion's `op_name`
metadata, e.g. "jit(decode_step)/layer3/jit(fused_append)/reduce_max"). Prints the launches of
the whole program grouped by op (layer numbers and branch names folded: a per-layer figure),
or with --layer N the launches of one layer in order. Static counts: both branches of a
conditional are listed (a step runs one of them). Pallas kernels are named by their
`pallas_call` name. Why: the 8-bit decode step runs as one CUDA graph and its cost follows its
kernel count (bench/launch_overhead.py); this says which ops the kernels belong to.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys

_LAUNCH = re.compile(r"^\s*\d+:\s+k(CustomKernel|Kernel|Copy|Memset\w*)\s+\[[^\]]*\]\s+(\S+)")
_OP = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+) = .*?op_name="([^"]*)"')
_SCHED = re.compile(r'scheduling_name="([^"]*)"')


def _key(name: str) -> str:
    """A launch's kernel name and an HLO instruction's name in one form ('.' and '_' alike)."""
    return name.replace(".", "_")


def op_names(hlo_text: str) -> dict[str, str]:
    """{instruction name (and scheduling name), '.' as '_': op_name} from optimised HLO text."""
    out = {}
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        out.setdefault(_key(m.group(1)), m.group(2))
        s = _SCHED.search(line)
        if s:
            out[_key(s.group(1))] = m.group(2)
    return out


def launches(thunk_text: str) -> list[str]:
    """Kernel (and copy) launches in execution order; a copy is 'kCopy'."""
    out = []
    for line in thunk_text.splitlines():
        m = _LAUNCH.match(line)
        if m:
            out.append("kCopy" if m.group(1) == "Copy" else m.group(2))
    return out


def fold(op: str) -> str:
    """An op name without the program, layer numbers and branch names: 'layer/jit(fused_append)/div'."""
    op = re.sub(r"^jit\([\w]+\)/", "", op)
    op = re.sub(r"layer\d+", "layer", op)
    return re.sub(r"/branch_\d+_fun", "/branch", op)


def attribute(names: list[str], ops: dict[str, str]) -> list[tuple[str, str]]:
    """(kernel, op) per launch; a kernel the HLO does not name (a Pallas call, whose launch
    carries its pallas_call name, or a copy) is its own op."""
    out = []
    for n in names:
        base = re.sub(r"(__\d+)$", "", n)  # Pallas kernels repeated: name__1, name__2, ...
        op = ops.get(_key(n)) or ops.get(_key(base))
        out.append((n, op if op else (f"pallas:{base}" if base.startswith("lserve_") else base)))
    return out


def find(dump: str, module: str, suffix: str, index: int = 0) -> str:
    """The index-th largest file of the modules whose names contain `module` (the same index
    picks one module's files: a thunk sequence and its HLO grow together)."""
    paths = sorted(glob.glob(os.path.join(dump, f"*{module}*{suffix}")), key=os.path.getsize, reverse=True)
    if len(paths) <= index:
        want = f"{index + 1} files" if index else "file"
        raise SystemExit(f"no {want} *{module}*{suffix} under {dump}: was the step compiled with "
                         f"XLA_FLAGS=\"--xla_dump_to={dump} --xla_dump_hlo_as_text\"?")
    return paths[index]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dump", help="the --xla_dump_to folder")
    ap.add_argument("--module", default="decode_step", help="a substring of the module's file names")
    ap.add_argument("--layer", type=int, help="list this layer's launches in order instead")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--index", type=int, default=0,
                    help="which of several matching modules, largest first (e.g. two variants compiled)")
    args = ap.parse_args(argv)
    with open(find(args.dump, args.module, "thunk_sequence_after_thunk_passes.txt", args.index)) as f:
        names = launches(f.read())
    with open(find(args.dump, args.module, "after_optimizations.txt", args.index)) as f:
        ops = op_names(f.read())
    rows = attribute(names, ops)
    if args.layer is not None:
        tag = f"layer{args.layer}/"
        at = [i for i, (_, op) in enumerate(rows) if tag in op]
        # from the layer's first named launch to its last: the Pallas kernels and copies between
        # them (which the HLO does not name by layer) included
        for kernel, op in rows[at[0]: at[-1] + 1] if at else []:
            print(f"{kernel:45} {op}")
        return 0
    counts = collections.Counter(fold(op) for _, op in rows)
    print(f"{len(rows)} launches ({sum(1 for k, _ in rows if k == 'kCopy')} copies; both branches of every "
          f"conditional counted); by op:")
    for op, n in counts.most_common(args.top):
        print(f"{n:6d}  {op}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
