"""A function of two arguments, fed with pairs: minimalcluster's example 3, three ways.

    python -m clusterexec.examples.pairs                 # local mode
    python -m clusterexec.examples.pairs --address head-node:7070 --authkey-file ~/.clusterexec/authkey

minimalcluster passes one argument per task, so its README wraps the two arguments in a tuple and
unpacks it inside the function: `f = lambda x: x[0] + x[1]` over `[(1, 2), (3, 4), (5, 6), (7, 8)]`.
`ClusterExecutor` takes real arguments, as `ProcessPoolExecutor` does:

    ex.map(add, xs, ys)                  one iterable per argument, like the built-in map
    ex.submit(add, *pair)                one Future per call; keyword arguments work too
    ex.map(lambda p: p[0] + p[1], pairs) the tuple form still works: lambdas travel with cloudpickle
"""

from __future__ import annotations

from . import describe, open_executor, parse_args

PAIRS = [(1, 2), (3, 4), (5, 6), (7, 8)]


def add(x: int, y: int) -> int:
    return x + y


def _add_arguments(parser) -> None:
    parser.add_argument("--count", type=int, default=len(PAIRS),
                        help=f"how many pairs: the first {len(PAIRS)} are minimalcluster's, then (9, 10), … "
                             f"(default {len(PAIRS)})")


def make_pairs(count: int) -> list[tuple[int, int]]:
    return [(2 * i + 1, 2 * i + 2) for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args("clusterexec.examples.pairs", "Feed a function of two arguments with pairs.", argv,
                      _add_arguments)
    pairs = make_pairs(args.count)
    with open_executor(args) as ex:
        xs, ys = zip(*pairs, strict=True) if pairs else ((), ())
        by_map = list(ex.map(add, xs, ys))
        futures = [ex.submit(add, *pair) for pair in pairs]
        by_submit = [f.result() for f in futures]
        by_keywords = [f.result() for f in [ex.submit(add, x=x, y=y) for x, y in pairs]]
        by_tuple = list(ex.map(lambda p: p[0] + p[1], pairs))
        where = describe(ex, args)
    for (x, y), total in zip(pairs, by_map, strict=True):
        print(f"add({x}, {y}) = {total}")
    same = by_map == by_submit == by_keywords == by_tuple
    print(f"map(add, xs, ys), submit(add, *pair), submit(add, x=, y=) and map(lambda p: ...) "
          f"{'agree' if same else 'DISAGREE'}; ran on {where}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
