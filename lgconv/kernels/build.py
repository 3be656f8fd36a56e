"""Build (once, then cached) and load the native CPU kernels with ``torch.utils.cpp_extension``.

The build is compiled for the machine it runs on (``-march=native``), so the extension's name
carries a digest of the source, the flags, the CPU's features and the torch version: a cache
shared by several machines (a network home) never hands one CPU's build to another. Without a
compiler, or with ``LGCONV_NATIVE=0``, the ops run their PyTorch reference instead.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

DISABLE_VARIABLE = "LGCONV_NATIVE"  # set to 0 to keep the native kernels off (the reference runs)
_SOURCES = tuple(
    Path(__file__).with_name(f)
    for f in ("condensed_pointwise.cpp", "grouped_conv3x3.cpp", "avg_pool2x2.cpp", "dense_block.cpp")
)
_HEADERS = (Path(__file__).with_name("kernel_common.h"),)  # included by the sources: part of the digest


def _cpu_features() -> str:
    """The CPU's feature flags (Linux), else whatever the platform says about the processor."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _flags(threaded: bool = True) -> list[str]:
    machine = platform.machine().lower()
    tuning = ["-march=native"] if machine in ("x86_64", "amd64", "i686") else ["-mcpu=native"]
    return ["-O3", *tuning, "-ffp-contract=fast", *(_threading_flags() if threaded else [])]


def _threading_flags() -> list[str]:
    """``-fopenmp`` where torch runs its threads with OpenMP: ``at::parallel_for`` is a header
    template, so without it the kernels compile serial. The extension then shares torch's own
    OpenMP runtime (same soname, already loaded) and its thread count. Apple's clang has no OpenMP."""
    if sys.platform == "darwin" or not torch.backends.openmp.is_available():
        return []
    return ["-fopenmp"]


def _extension_name(flags: list[str]) -> str:
    digest = hashlib.sha256()
    for source in (*_SOURCES, *_HEADERS):
        digest.update(source.read_bytes())
    for part in (" ".join(flags).encode(), _cpu_features().encode()):
        digest.update(part)
    digest.update(torch.__version__.encode())
    return f"lgconv_kernels_{digest.hexdigest()[:16]}"


def native_disabled() -> bool:
    """Whether ``LGCONV_NATIVE=0`` (or ``false``/``off``) keeps the native kernels off."""
    return os.environ.get(DISABLE_VARIABLE, "1").strip().lower() in ("0", "false", "off", "no")


def _build(threaded: bool) -> None:
    """Compile (or find in the cache) and load the extension, with OpenMP when ``threaded``."""
    from torch.utils import cpp_extension

    flags = _flags(threaded)
    name = _extension_name(flags)
    root = Path(cpp_extension.get_default_build_root())
    if not any(root.glob(f"{name}/{name}.so")) and not any(root.glob(f"*/{name}/{name}.so")):
        print(f"lgconv: building the native kernels ({name}, once per machine)...", file=sys.stderr)
    cpp_extension.load(
        name,
        [str(source) for source in _SOURCES],
        extra_cflags=flags,
        extra_ldflags=_threading_flags() if threaded else [],
        is_python_module=False,
        verbose=False,
    )


def _reason(error: Exception) -> str:
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__


@functools.cache
def load_native() -> bool:
    """Load the native kernels, building them the first time (about a minute); False if unavailable.

    Where they cannot be built (no compiler, a failed build) one warning says so and the ops keep
    running their PyTorch reference, which computes the same values more slowly. Where only the
    OpenMP build fails (a compiler without its OpenMP library), they are built serial, with one
    warning that they run on one thread.
    """
    if native_disabled():
        return False
    threaded = bool(_threading_flags())
    try:
        _build(threaded)
        return True
    except Exception as error:  # noqa: BLE001 - any build failure means: try serial, else the reference
        failure = error
    if threaded:
        try:
            _build(threaded=False)
        except Exception as error:  # noqa: BLE001
            failure = error
        else:
            warnings.warn(
                f"lgconv: the native kernels built without OpenMP ({_reason(failure)}); they run on one "
                "thread. Install your compiler's OpenMP library (libgomp) to use every thread.",
                RuntimeWarning,
                stacklevel=2,
            )
            return True
    warnings.warn(
        f"lgconv: the native kernels are unavailable ({_reason(failure)}); condensed 1x1 layers run their "
        "PyTorch reference (same values, slower). Install a C++ compiler and ninja to get them.",
        RuntimeWarning,
        stacklevel=2,
    )
    return False


def native_loaded() -> bool:
    """Whether ``load_native()`` has loaded the kernels in this process; never builds them (callers
    that only speed up what already runs natively must not start a minute-long build)."""
    return load_native.cache_info().currsize > 0 and load_native()
