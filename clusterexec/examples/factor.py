"""Naive factorization of the 5,000 odd numbers from 999999999999 on, by trial division, in chunks.

    python -m clusterexec.examples.factor                # local mode
    python -m clusterexec.examples.factor --count 500 --show 500
    python -m clusterexec.examples.factor --address head-node:7070 --authkey-file ~/.clusterexec/authkey

The function is minimalcluster's example 2 (after Eli Bendersky's post on distributed computing with
`multiprocessing`), with integer division: its `n = n / p` turns n into a float. The cost per number varies
a lot (a prime near 10^12 takes half a million trial divisions, 999999999999 itself only a few dozen), so
the numbers travel in chunks of `--chunksize` and idle processes take the next chunk.
"""

from __future__ import annotations

import math
import time

from . import describe, open_executor, parse_args

FIRST = 999_999_999_999


def factorize_naive(n: int) -> list[int]:
    """The prime factors of `n` in increasing order, by trial division (2, then odd numbers)."""
    if n < 2:
        return []
    factors = []
    p = 2
    while True:
        if n == 1:
            return factors
        if n % p == 0:
            factors.append(p)
            n //= p
        elif p * p >= n:
            factors.append(n)
            return factors
        elif p > 2:
            p += 2
        else:
            p += 1


def odd_numbers(first: int, count: int) -> list[int]:
    """`count` consecutive odd numbers starting at `first` (which must be odd)."""
    return [first + 2 * i for i in range(count)]


def _add_arguments(parser) -> None:
    parser.add_argument("--count", type=int, default=5000, help="how many odd numbers (default 5,000)")
    parser.add_argument("--first", type=int, default=FIRST, help=f"the first one (default {FIRST})")
    parser.add_argument("--chunksize", type=int, default=25, help="numbers per task (default 25)")
    parser.add_argument("--show", type=int, default=10, metavar="K",
                        help="print the first K factorizations (default 10)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args("clusterexec.examples.factor", "Factorize large odd numbers by trial division on a cluster.",
                      argv, _add_arguments)
    if args.first % 2 == 0 or args.count < 1 or args.chunksize < 1:
        args.parser.error("need an odd --first, --count >= 1 and --chunksize >= 1")
    numbers = odd_numbers(args.first, args.count)
    start = time.perf_counter()
    with open_executor(args) as ex:
        # map keeps the input order, so result i belongs to numbers[i]
        results = list(ex.map(factorize_naive, numbers, chunksize=args.chunksize))
        where = describe(ex, args)
    elapsed = time.perf_counter() - start
    for n, factors in list(zip(numbers, results, strict=True))[:args.show]:
        print(f"{n} = {' * '.join(map(str, factors))}")
    wrong = [n for n, factors in zip(numbers, results, strict=True) if math.prod(factors) != n]
    primes = sum(1 for factors in results if len(factors) == 1)
    print(f"factored {len(numbers)} numbers from {numbers[0]} to {numbers[-1]} ({primes} primes) "
          f"in {elapsed:.2f} s on {where}")
    if wrong:
        print(f"ERROR: {len(wrong)} products do not multiply back, first {wrong[0]}")
        return 1
    print("every product multiplies back to its number")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
