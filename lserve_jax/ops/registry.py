"""The kernel registry: which implementations each op has, in which order they are tried.

An *implementation* is a function registered under (op, name) by a backend module. A call
names the implementations it accepts with an `OpChoice`; the dispatcher tries them in order and
moves on to the next ONLY when one raises `Unsupported` (any other exception is a bug and
propagates). If none runs, `Unsupported` names every implementation tried and its reason.

An empty `OpChoice.impls` means the platform's default order: the implementations whose
`priority` names the platform, highest first. With the backends of this package:

| platform | prefill                         | decode                  | append, page_scores | qmatmul     |
|----------|---------------------------------|-------------------------|---------------------|-------------|
| gpu      | cudnn+triton, triton, reference | cudnn, triton, reference | triton, reference  | xla         |
| cpu      | cpu, reference                  | cpu, reference          | reference           | xla         |

(the GPU prefill order is the fastest correct one measured on the H200, bench/prefill_attn.py:
cudnn+triton runs retrieval heads through cuDNN and streaming heads through the Triton kernel;
it refuses float32 (cuDNN flash attention takes half precision), so float32 goes to triton.
Decode "cudnn" runs only the dense layout (every page, no streaming heads, bf16/f16 pages:
cuDNN's paged attention); a sparse selection or 8-bit pages fall through to triton.
On CPU, `ops/cpu.py`: block-sparse flash-style prefill and a decode that reads only the used
slots; bench/peer_hf.py measures them against Hugging Face transformers.)

Explicit-only prefill implementations (no platform rank): "cudnn", "xla", "xla+triton"
(`ops/cudnn.py`), and FP8 attention for the retrieval heads, "cudnn8+triton" (GPU) and its jnp
emulation "reference8" (`ops/attn8.py`).

"qmatmul" is the product with an 8-bit weight (`ops.qmatmul`): XLA's W8A8 / W8A16 products of
`lserve_jax.quant` ("xla") by default; the weight-only Triton skinny GEMM ("triton", at most 64
rows) only when a choice names it (measured slower in the decode step, see `lserve_jax.quant`).
It is not one of a model's `Kernels` (`OPS`): `models.layer.project` dispatches it with the
default order, so its choice is the platform's, not the model spec's.

Backends are modules of this package named in `BACKENDS`, imported on first use (so importing
the API imports no kernel). A backend must import on every platform and jax version the project
supports: what a platform or version lacks, its implementations report as `Unsupported`, so an
import error is always a bug and propagates.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

__all__ = ["BACKENDS", "OPS", "Kernels", "OpChoice", "REGISTRY", "Registry", "Unsupported", "register"]

OPS = ("prefill", "decode", "append", "page_scores")  # a model's `Kernels`; "qmatmul" is registered too
# Backend modules of lserve_jax.ops, imported lazily; adding a backend = one file + one entry here.
BACKENDS = ("reference", "triton", "cudnn", "cpu", "attn8")
# Legacy spellings (the Pallas Triton lowering was called "pallas" before Mosaic GPU kernels).
ALIASES = {"pallas": "triton", "cudnn+pallas": "cudnn+triton", "xla+pallas": "xla+triton"}


class Unsupported(NotImplementedError):
    """An implementation cannot run these inputs (shapes, dtype, device, options).

    Raised before any kernel is traced, so the dispatcher can try the next implementation.
    """


@dataclasses.dataclass(frozen=True)
class Impl:
    op: str
    name: str
    fn: Callable
    priority: Mapping[str, int]  # platform ("cpu", "gpu", "*" = any) -> rank in the default order


class Registry:
    """Implementations per op, filled by the backend modules when they are imported."""

    def __init__(self, backends: tuple[str, ...] = (), package: str = __package__):
        self._backends = tuple(backends)
        self._package = package
        self._loaded = False
        self._impls: dict[str, dict[str, Impl]] = {}

    def register(self, op: str, name: str, *, priority: Mapping[str, int] | None = None):
        """Decorator: `fn` is implementation `name` of `op`.

        priority: {platform: rank} for the default order ("*" = any other platform; higher runs
        first); a platform it does not name never tries `fn` unless a choice names it.
        """
        if name in ALIASES or name == "auto":
            raise ValueError(f"{name!r} is reserved (an alias or 'auto'), register a canonical name")

        def deco(fn):
            table = self._impls.setdefault(op, {})
            if name in table:
                raise ValueError(f"{op} implementation {name!r} registered twice")
            table[name] = Impl(op, name, fn, dict(priority or {}))
            return fn

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # first: a backend's own import of the API does not recurse here
        try:
            for mod in self._backends:
                importlib.import_module(f"{self._package}.{mod}")
        except BaseException:
            self._loaded = False
            raise

    def names(self, op: str) -> tuple[str, ...]:
        self._load()
        return tuple(self._impls.get(op, {}))

    def default_order(self, op: str, platform: str | None = None) -> tuple[str, ...]:
        """The implementations an empty choice tries on `platform` (default: this process's)."""
        self._load()
        platform = platform or _platform()
        ranked = [(impl.priority.get(platform, impl.priority.get("*")), name)
                  for name, impl in self._impls.get(op, {}).items()]
        ranked = [(rank, name) for rank, name in ranked if rank is not None]
        return tuple(name for _, name in sorted(ranked, key=lambda x: -x[0]))

    def resolve(self, op: str, choice: "OpChoice") -> tuple[str, ...]:
        """The names `choice` tries for `op`; ValueError on a name no backend registered."""
        self._load()
        known = self._impls.get(op, {})
        unknown = [n for n in choice.impls if n not in known]
        if unknown:
            raise ValueError(f"unknown {op} implementation(s) {unknown}; registered: {sorted(known)}")
        return choice.impls or self.default_order(op)

    def dispatch(self, op: str, choice: "OpChoice", *args, **kwargs):
        """Runs the first implementation of `choice` that does not raise Unsupported.

        Every implementation is called as fn(*args, options=dict(choice.options), **kwargs).
        """
        names = self.resolve(op, choice)
        if not names:
            raise Unsupported(f"no {op} implementation is registered for platform {_platform()!r}")
        reasons = []
        for name in names:
            try:
                return self._impls[op][name].fn(*args, options=dict(choice.options), **kwargs)
            except Unsupported as e:
                reasons.append(f"{name}: {e}")
        raise Unsupported(f"no {op} implementation ran; tried " + "; ".join(reasons))


REGISTRY = Registry(BACKENDS)
register = REGISTRY.register


def _platform() -> str:
    from ..pallas.compat import platform

    return platform()


def _hashable(name: str, value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        raise ValueError(f"option {name}={value!r} must be hashable (ints, floats, strings, tuples)") from None
    return value


@dataclasses.dataclass(frozen=True)
class OpChoice:
    """Which implementations of one op to try, in order, and their tuning options.

    impls: () = the platform's default order; else exactly these (legacy aliases accepted:
    "pallas" = "triton"). options: keyword arguments for the kernel, as sorted (name, value)
    pairs so the choice is hashable and can live in a jit's static spec; an implementation
    ignores what it does not tune (the reference takes none).
    """

    impls: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        impls = (self.impls,) if isinstance(self.impls, str) else tuple(self.impls)
        if "auto" in impls:
            raise ValueError(f"'auto' is the empty impls tuple, not a name: {self.impls=}")
        object.__setattr__(self, "impls", tuple(ALIASES.get(n, n) for n in impls))
        pairs = dict(self.options)
        object.__setattr__(self, "options", tuple(sorted((str(k), _hashable(k, v)) for k, v in pairs.items())))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, impls: tuple[str, ...] | str = ()
                     ) -> "OpChoice":
        """OpChoice.from_options({"block_m": 64}, impls=("triton",))."""
        return cls(impls=impls, options=tuple((options or {}).items()))

    @classmethod
    def from_name(cls, op: str, name: str, options: Mapping[str, Any] | None = None) -> "OpChoice":
        """A legacy impl string ("auto", "pallas", "reference", "cudnn+pallas", ...) for `op`,
        checked against the registry (ValueError naming the known ones)."""
        if not isinstance(name, str):
            raise ValueError(f"{op} impl must be a string, got {name!r}")
        choice = cls.from_options(options, impls=() if name == "auto" else (name,))
        REGISTRY.resolve(op, choice)
        return choice

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    def with_options(self, **options) -> "OpChoice":
        """The same implementations with `options` added (replacing those of the same name)."""
        return OpChoice(self.impls, tuple({**dict(self.options), **options}.items()))


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Kernel choice and tuning of every op of a model: frozen and hashable (part of the static
    spec of the jitted prefill and decode step). Default: each op's platform default order."""

    prefill: OpChoice = OpChoice()
    decode: OpChoice = OpChoice()
    append: OpChoice = OpChoice()
    page_scores: OpChoice = OpChoice()

    def __post_init__(self):
        for op in OPS:
            if not isinstance(getattr(self, op), OpChoice):
                raise ValueError(f"Kernels.{op} must be an OpChoice, got {getattr(self, op)!r}")

    @classmethod
    def from_names(cls, prefill: str = "auto", decode: str = "auto", append: str | None = None,
                   page_scores: str = "auto") -> "Kernels":
        """From the legacy impl strings. `append` follows `decode` unless given (the model
        used the decode impl for the cache append), or a decode-only implementation ("cudnn") is
        named: then the append keeps its default order; page scores stay "auto" unless given."""
        if append is None:
            append = decode if ALIASES.get(decode, decode) in REGISTRY.names("append") + ("auto",) else "auto"
        return cls(prefill=OpChoice.from_name("prefill", prefill),
                   decode=OpChoice.from_name("decode", decode),
                   append=OpChoice.from_name("append", append),
                   page_scores=OpChoice.from_name("page_scores", page_scores))

    def with_options(self, **per_op: Mapping[str, Any]) -> "Kernels":
        """E.g. kernels.with_options(decode={"pages_per_block": 2}): tuning options merged into
        the named ops' choices."""
        bad = set(per_op) - set(OPS)
        if bad:
            raise ValueError(f"unknown ops {sorted(bad)}; expected some of {OPS}")
        return dataclasses.replace(self, **{op: getattr(self, op).with_options(**dict(opts))
                                            for op, opts in per_op.items()})
