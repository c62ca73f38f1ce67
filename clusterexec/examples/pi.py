"""Estimate pi from 1,000,000 random throws at the square [-1, 1]², split into chunks that run as tasks.

    python -m clusterexec.examples.pi                    # local mode
    python -m clusterexec.examples.pi --workers 4 --throws 10000000
    python -m clusterexec.examples.pi --address head-node:7070 --authkey-file ~/.clusterexec/authkey

The fraction of throws landing inside the unit circle tends to pi/4.

Each task makes its own generator, `random.Random(seed)`, from a seed of its own. minimalcluster's
version of this example did `from random import random` at module level and called `random()` in a
lambda. Under clusterexec (or anything built on cloudpickle) that is a trap: a function defined in
`__main__` is pickled by value together with the globals it uses, and the global `random` is a bound
method of the `random` module's hidden `Random` instance, so the instance, with its whole state, is
copied into the pickle. Every task process that unpickles the function starts from that same state and
draws the same "random" numbers, so N processes are worth one: the estimate quietly loses precision.
A generator built inside the task, from a distinct seed per chunk, cannot be shared by accident, and a
printed base seed makes the run reproducible (`--seed`).
"""

from __future__ import annotations

import math
import random
import secrets
import time

from . import describe, open_executor, parse_args


def count_hits(seed: str, throws: int) -> int:
    """Throw `throws` darts with a generator seeded by `seed`; return how many land inside the unit circle."""
    # Built here, in the task, from this chunk's own seed: never the module-level generator (see above).
    rng = random.Random(seed)
    draw = rng.random
    hits = 0
    for _ in range(throws):
        x = draw() * 2 - 1
        y = draw() * 2 - 1
        if x * x + y * y < 1:
            hits += 1
    return hits


def chunk_seeds(base_seed: int, chunks: int) -> list[str]:
    """One distinct seed per chunk. String seeds are hashed (SHA-512) by `random.Random`, so seeds that
    differ in one character still give unrelated streams."""
    return [f"clusterexec.examples.pi:{base_seed}:{i}" for i in range(chunks)]


def chunk_sizes(throws: int, chunks: int) -> list[int]:
    base, extra = divmod(throws, chunks)
    return [base + (1 if i < extra else 0) for i in range(chunks)]


def _add_arguments(parser) -> None:
    parser.add_argument("--throws", type=int, default=1_000_000, help="random throws in all (default 1,000,000)")
    parser.add_argument("--chunks", type=int, default=100, help="tasks to split the throws into (default 100)")
    parser.add_argument("--seed", type=int, default=None, help="base seed (default: a fresh random one, printed)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args("clusterexec.examples.pi", "Estimate pi from random throws, in chunks across the cluster.",
                      argv, _add_arguments)
    if args.throws < 1 or not 1 <= args.chunks <= args.throws:
        args.parser.error("need --throws >= 1 and 1 <= --chunks <= --throws")
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    start = time.perf_counter()
    with open_executor(args) as ex:
        sizes = chunk_sizes(args.throws, args.chunks)
        hits = sum(ex.map(count_hits, chunk_seeds(seed, args.chunks), sizes))
        where = describe(ex, args)
    estimate = 4.0 * hits / args.throws
    print(f"pi is roughly {estimate:.6f} (error {estimate - math.pi:+.6f})")
    print(f"{args.throws} throws in {args.chunks} tasks, seed {seed}, {time.perf_counter() - start:.2f} s on {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
