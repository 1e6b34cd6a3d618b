"""CPU runtime settings for training: keep glibc's malloc from returning activation memory to the OS.

A training step on CPU allocates dozens of fresh 0.25-2 MB tensors (activations, masks,
gradients of a 2000-row batch). glibc's malloc serves blocks above ``M_MMAP_THRESHOLD``
(128 KiB until a freed mmap'd block raises it) with ``mmap`` and gives them back with ``munmap``,
and trims the heap top above ``M_TRIM_THRESHOLD``; every such tensor then costs page faults on
first touch, and with two OpenMP threads touching the same fresh pages the faults contend in
the kernel. Measured on the 2-core VM: ``a * b`` on two [2000, 128] float tensors took 370 us
with a fresh output against 26 us with a reused heap block, and the ESMM step spent several ms
per step in page faults. PyTorch's CPU tuning guide's answer is jemalloc/tcmalloc through
``LD_PRELOAD``; a library cannot preload an allocator into its caller's process, but it can set
glibc's thresholds with ``mallopt`` (the same knobs as the ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` environment variables): blocks up to 32 MiB then come from the heap
and the freed ones are reused instead of being unmapped. The cost is that up to
``trim_threshold`` bytes of freed heap stay mapped in the process.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 256 << 20

_tuned = False


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Raise glibc malloc's mmap and trim thresholds for this process (see the module docstring).

    Process-wide and idempotent. Returns True when glibc accepted both settings, False where the
    C library is not glibc (musl, macOS, Windows) or refused them; training works either way.
    """
    global _tuned
    if _tuned:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("tune_malloc: no glibc mallopt in this process; allocator left as is")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))
    if ok:
        log.info("malloc: mmap threshold %d MiB, trim threshold %d MiB (train.tune_malloc)",
                 mmap_threshold >> 20, trim_threshold >> 20)
        _tuned = True
    else:
        log.warning("tune_malloc: mallopt refused mmap_threshold=%d / trim_threshold=%d", mmap_threshold, trim_threshold)
    return ok
