"""Keep a long run's resident memory flat: glibc heap settings for the engine.

By default glibc raises its mmap threshold each time a large block is freed,
up to 32 MiB on 64-bit systems, and keeps more of the freed heap as the
threshold grows (mallopt(3)). Over a run's first batches the resident size
then drifts up, so a run over 2,000 images peaked 18 % higher than one over
200 (docs/benchmarks.md). ``configure_heap`` fixes the threshold at that final
value from the start. The engine calls ``release_free_memory`` at the start of
each batch, which returns the pages the previous batch freed. Without glibc
both do nothing.
"""

import ctypes
import ctypes.util
import os
import sys

__all__ = ["MMAP_THRESHOLD", "configure_heap", "release_free_memory"]

# glibc's largest adaptive mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
MMAP_THRESHOLD = 32 * 1024 * 1024
_M_MMAP_THRESHOLD = -3
_LIBC = None


def _glibc():
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt"):
                    _LIBC = libc
            except OSError:
                pass
    return _LIBC


def configure_heap():
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD`` for the rest of the process.

    A ``MALLOC_MMAP_THRESHOLD_`` in the environment is the user's choice and
    is kept.

    Returns:
        True when the threshold was set, else False.
    """
    libc = _glibc()
    if not libc or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def release_free_memory():
    """Return the heap's free pages to the system; a no-op without glibc.

    Returns:
        True when glibc released memory, else False.
    """
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))
