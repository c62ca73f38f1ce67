"""The examples shipped in `clusterexec.examples`, run as a user runs them, and the random-number trap
that the pi example avoids."""

from __future__ import annotations

import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import clusterexec
from clusterexec import ClusterExecutor
from clusterexec.examples import pi

PACKAGE_ROOT = Path(clusterexec.__file__).resolve().parents[1]


def run_example(name: str, *args: str, timeout: float = 60) -> str:
    """`python -m clusterexec.examples.NAME ARGS…`; returns its output, fails the test on a non-zero exit."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(PACKAGE_ROOT), env.get("PYTHONPATH")] if p)
    proc = subprocess.run([sys.executable, "-m", f"clusterexec.examples.{name}", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"exit code {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def pi_estimate(output: str) -> float:
    m = re.search(r"^pi is roughly (\d+\.\d+)", output, re.MULTILINE)
    assert m, output
    return float(m.group(1))


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24, far beyond any factor here."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    if n in bases:
        return True
    if any(n % b == 0 for b in bases):
        return False
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


# ---------------------------------------------------------------------------------------------- local mode


def test_pi_example_estimates_pi_in_local_mode():
    output = run_example("pi", "--workers", "2")
    assert abs(pi_estimate(output) - math.pi) < 0.01, output
    assert "1000000 throws in 100 tasks" in output
    assert "local mode, 2 task processes on 1 worker node" in output


def test_pi_example_is_reproducible_with_a_seed():
    first = run_example("pi", "--workers", "2", "--seed", "2024", "--throws", "200000")
    again = run_example("pi", "--workers", "1", "--seed", "2024", "--throws", "200000")
    assert pi_estimate(first) == pi_estimate(again)


def test_factor_example_products_multiply_back_to_consecutive_odd_numbers():
    count = 600  # the default 5,000 take about 25 CPU-seconds; the code path is the same
    output = run_example("factor", "--workers", "2", "--count", str(count), "--show", str(count))
    lines = re.findall(r"^(\d+) = ([\d *]+)$", output, re.MULTILINE)
    assert [int(n) for n, _ in lines] == [999_999_999_999 + 2 * i for i in range(count)]
    for n, product in lines:
        factors = [int(f) for f in product.split(" * ")]
        assert math.prod(factors) == int(n)
        assert factors == sorted(factors)
        assert all(is_prime(f) for f in factors), (n, factors)
    assert lines[0] == ("999999999999", "3 * 3 * 3 * 7 * 11 * 13 * 37 * 101 * 9901")
    assert "every product multiplies back to its number" in output


def test_pairs_example_feeds_two_arguments_every_way():
    output = run_example("pairs", "--workers", "2")
    assert re.findall(r"^add\((\d+), (\d+)\) = (\d+)$", output, re.MULTILINE) == [
        ("1", "2", "3"), ("3", "4", "7"), ("5", "6", "11"), ("7", "8", "15")]
    assert "agree" in output and "DISAGREE" not in output


def test_examples_reject_a_key_file_without_an_address():
    proc = subprocess.run([sys.executable, "-m", "clusterexec.examples.pi", "--authkey-file", "x"],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, PYTHONPATH=str(PACKAGE_ROOT)))
    assert proc.returncode == 2
    assert "--authkey-file goes with --address" in proc.stderr


# ---------------------------------------------------------------------------------------------- a running cluster


def test_examples_report_a_wrong_key_in_one_line(cluster, tmp_path):
    wrong = tmp_path / "wrong.key"
    wrong.write_text("not the cluster's key\n")
    wrong.chmod(0o600)
    proc = subprocess.run([sys.executable, "-m", "clusterexec.examples.pairs", "--address", cluster.address,
                           "--authkey-file", str(wrong)],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, PYTHONPATH=str(PACKAGE_ROOT)))
    assert proc.returncode == 1
    assert "rejected our authentication key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_pi_example_against_a_running_cluster(cluster):
    output = run_example("pi", "--address", cluster.address, "--authkey-file", str(cluster.key_file))
    assert abs(pi_estimate(output) - math.pi) < 0.01, output
    assert f"the cluster at {cluster.address}, 2 task processes on 1 worker node" in output
    # The 100 chunks really ran on the worker node the fixture started.
    assert cluster.info()["workers"][0]["done"] == 100


def test_factor_and_pairs_examples_against_a_running_cluster(cluster):
    key = ["--address", cluster.address, "--authkey-file", str(cluster.key_file)]
    output = run_example("factor", *key, "--count", "100", "--show", "100")
    lines = re.findall(r"^(\d+) = ([\d *]+)$", output, re.MULTILINE)
    assert len(lines) == 100
    assert all(math.prod(int(f) for f in p.split(" * ")) == int(n) for n, p in lines)
    assert "add(7, 8) = 15" in run_example("pairs", *key)


# ---------------------------------------------------------------------------------------------- the random trap

# What a user types in a script or notebook: the code runs in __main__, so cloudpickle pickles its
# functions by value, with the globals they use.
TRAP_SOURCE = """
from random import random
draw = lambda i: [random() for _ in range(5)]
"""

FIXED_SOURCE = """
import random
def draw(seed):
    rng = random.Random(seed)
    return [rng.random() for _ in range(5)]
def draw_unseeded(i):
    rng = random.Random()
    return [rng.random() for _ in range(5)]
"""


def in_main(source: str) -> dict:
    namespace = {"__name__": "__main__"}
    exec(compile(source, "<user script>", "exec"), namespace)
    return namespace


def test_module_level_random_replays_the_same_numbers_in_every_task():
    draw = in_main(TRAP_SOURCE)["draw"]
    # max_tasks_per_child=1: each task runs in a fresh process, as on a cluster of many nodes.
    with ClusterExecutor(max_workers=2, max_tasks_per_child=1) as ex:
        # `random` is a bound method of the random module's hidden Random instance; pickling the lambda
        # copies that instance, so every task replays this process's generator from this very state.
        replay = random.Random()
        replay.setstate(random.getstate())
        results = list(ex.map(draw, range(6)))
    assert all(r == results[0] for r in results), results
    assert results[0] == [replay.random() for _ in range(5)]


def test_a_generator_made_in_each_task_gives_distinct_streams():
    namespace = in_main(FIXED_SOURCE)
    seeds = pi.chunk_seeds(7, 6)
    with ClusterExecutor(max_workers=2, max_tasks_per_child=1) as ex:
        seeded = list(ex.map(namespace["draw"], seeds))
        again = list(ex.map(namespace["draw"], seeds))
        unseeded = list(ex.map(namespace["draw_unseeded"], range(6)))
    assert len({tuple(r) for r in seeded}) == 6, seeded
    assert again == seeded  # a seed per chunk: distinct and reproducible
    assert len({tuple(r) for r in unseeded}) == 6, unseeded


def test_pi_example_functions_pickled_by_value_still_draw_distinct_throws():
    # `python -m clusterexec.examples.pi` runs the module as __main__, so its functions travel by value,
    # exactly like the trap above. Run its source under a name that cannot be imported: the same pickling.
    as_script = {"__name__": "pi_as_a_script", "__package__": "clusterexec.examples"}
    exec(compile(Path(pi.__file__).read_text(), pi.__file__, "exec"), as_script)
    count_hits = as_script["count_hits"]
    assert count_hits.__module__ == "pi_as_a_script"
    seeds = as_script["chunk_seeds"](11, 8)
    with ClusterExecutor(max_workers=2, max_tasks_per_child=1) as ex:
        hits = list(ex.map(count_hits, seeds, [2000] * 8))
        same_seed = list(ex.map(count_hits, [seeds[0]] * 3, [2000] * 3))
    # Replayed streams would give eight equal counts; independent chunks do not.
    assert len(set(hits)) > 1, hits
    assert same_seed == [hits[0]] * 3
    assert abs(4 * sum(hits) / 16000 - math.pi) < 0.1
