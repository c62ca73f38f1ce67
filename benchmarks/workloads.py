"""Task functions for the benchmarks in `run.py`.

They live in an importable module, not in ``__main__``, so that every backend ships them by reference
(module + name): ``run.py`` puts this directory on ``PYTHONPATH`` for every process it starts (the
measurement child, the master and worker node of the command-line cluster, PPE/loky/Dask/Ray workers).
"""

from __future__ import annotations

import functools
import random

# A per-process generator, bound here once. `random` reseeds its hidden instance in a forked child
# (os.register_at_fork), so forked task processes do not replay each other's throws.
_random = random.random


def noop() -> None:
    return None


def noop1(x):
    return x


def identity(x):
    return x


def throw(_item) -> int:
    """One Monte Carlo throw at the unit square: 1 if it lands inside the quarter circle."""
    x = _random()
    y = _random()
    return 1 if x * x + y * y <= 1.0 else 0


def factor(n: int) -> list[int]:
    """Naive trial division (deliberately slow: CPU-bound work with uneven cost per item)."""
    factors = []
    while n % 2 == 0:
        factors.append(2)
        n //= 2
    d = 3
    while d * d <= n:
        while n % d == 0:
            factors.append(d)
            n //= d
        d += 2
    if n > 1:
        factors.append(n)
    return factors


def _payload_task(payload: bytes, x: int) -> int:
    return x + len(payload)


def with_payload(payload: bytes):
    """A function that carries `payload` with it, as a closure capturing it would; unlike a closure, plain
    pickle can carry it, so ProcessPoolExecutor can run it too (and pickles it again for every task)."""
    return functools.partial(_payload_task, payload)


def apply_chunk(fn, chunk):
    """Used by the Dask and Ray adapters in run.py to give their ``map`` a ``chunksize``."""
    return [fn(*args) for args in chunk]


def nap(seconds: float) -> None:
    """Warm-up: two concurrent naps make sure both task processes of a backend are up."""
    import time

    time.sleep(seconds)
