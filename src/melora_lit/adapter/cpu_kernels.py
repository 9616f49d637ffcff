"""Fused CPU kernels for :class:`~melora_lit.MELoRALinear` (fp32 and bf16 activations),
compiled on first use.

On CPU the adapter's cost is not its FLOPs (under 1 % of the layer's) but its passes over
the activations; ``csrc/melora_cpu.cpp`` does all of the adapter's per-token work in one
pass (see there). It is built once per machine type with the system C++ compiler through
``torch.utils.cpp_extension`` (10-30 s, cached under
``$TORCH_EXTENSIONS_DIR``) and registered as ``torch.ops.melora_lit.*``.

``MELORA_LIT_CPU_KERNELS`` chooses: ``auto`` (default: build, or fall back with one
warning to the plain-torch path, which computes the same function), ``0`` (never build),
``1`` (build, and raise if that fails). Torch only; no Lightning import.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

from ..errors import describe

__all__ = ["available", "disabled", "kernels_setting"]

_SOURCE = Path(__file__).parent / "csrc" / "melora_cpu.cpp"
_lock = threading.Lock()
_built: bool | None = None  # None: not tried yet
_local = threading.local()  # disabled() is per thread: it must not switch other threads' layers


def kernels_setting() -> str:
    """The value of ``MELORA_LIT_CPU_KERNELS``: ``auto``, ``0`` or ``1``."""
    value = os.environ.get("MELORA_LIT_CPU_KERNELS", "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        raise ValueError(f"MELORA_LIT_CPU_KERNELS={value!r} is not valid; use auto, 0 or 1")
    return value


def _machine_tag() -> str:
    # -march=native code must never run on another CPU (a shared home directory across a
    # heterogeneous cluster): the build name carries the CPU's identity and the torch version.
    ident = [platform.machine(), torch.__version__, _SOURCE.read_text()]
    try:
        with open("/proc/cpuinfo") as f:
            ident += sorted({line for line in f if line.startswith(("flags", "model name", "Features"))})
    except OSError:
        ident.append(platform.processor())
    return hashlib.sha1("\n".join(ident).encode()).hexdigest()[:12]


def _build() -> None:
    from torch.utils import cpp_extension

    flags = ["-O3", "-fopenmp"] + (["-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-mcpu=native"])
    name = f"melora_lit_cpu_{_machine_tag()}"
    # torch's private helper: the one place that knows the build folder ($TORCH_EXTENSIONS_DIR)
    build_dir = Path(cpp_extension._get_build_directory(name, False))
    if not (build_dir / f"{name}.so").exists():
        print("melora_lit: compiling the fused CPU kernels for this machine (once, 10-30 s)",
              file=sys.stderr, flush=True)
    # ninja from the running interpreter's environment, also when it is not activated
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + path
    try:
        with _build_lock(build_dir):
            cpp_extension.load(
                name=name,
                sources=[str(_SOURCE)],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
    finally:
        os.environ["PATH"] = path


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """One build at a time across processes, without torch's stale-lock hang.

    torch serializes builds with a ``lock`` file in the build folder, removed when the build
    ends: a build killed midway (a SIGKILL, a cancelled job) leaves it, and every later process
    waits for it forever. Here builds first take an ``flock`` on ``melora_lit.flock``, which the
    OS releases when its holder dies; whoever holds it knows that a ``lock`` file there is a
    dead build's, and removes it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock alone
        yield
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "melora_lit.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def disabled():
    """Run MELoRALinear on its plain-torch path inside this block (to compare, or to debug).

    The path is chosen in the forward; the backward of that forward follows it.
    """
    _local.disabled = getattr(_local, "disabled", 0) + 1
    try:
        yield
    finally:
        _local.disabled -= 1


def available() -> bool:
    """Whether the fused CPU kernels can be used; builds them on the first call."""
    global _built
    if getattr(_local, "disabled", 0):
        return False
    if _built is None:
        with _lock:
            if _built is None:
                _built = _try_build()
    return _built


def _try_build() -> bool:
    setting = kernels_setting()
    if setting == "0" or sys.platform == "win32":
        return False
    try:
        _build()
        return True
    except Exception as e:  # noqa: BLE001 - any build failure means: use the torch path
        if setting == "1":
            raise RuntimeError(f"MELORA_LIT_CPU_KERNELS=1 but the CPU kernels failed to build: {e}") from e
        warnings.warn(f"melora_lit: CPU kernels unavailable ({describe(e)[:200]}); "
                      "using the plain-torch path (same results, slower on CPU). "
                      "Set MELORA_LIT_CPU_KERNELS=0 to skip the build.", stacklevel=3)
        return False
