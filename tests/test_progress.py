"""map(..., progress=True): a progress bar counting items as their tasks finish."""

from __future__ import annotations

import io

import pytest

from clusterexec import ClusterExecutor
from clusterexec.progress import LineProgress

pytestmark = pytest.mark.timeout(60)


def test_line_progress_counts_to_the_total():
    stream = io.StringIO()
    bar = LineProgress(10, "sweep", stream=stream)
    for _ in range(10):
        bar.update(1)
    bar.close()
    bar.close()  # idempotent
    lines = stream.getvalue().splitlines()
    assert lines[-1].startswith("sweep: 10/10 (100%)"), lines
    assert len(lines) == 2  # not a tty: the final line and one on reaching the total, no flood


def test_line_progress_without_a_total():
    stream = io.StringIO()
    bar = LineProgress(None, "gen", stream=stream)
    bar.update(5)
    bar.close()
    assert stream.getvalue().splitlines()[-1].startswith("gen: 5 done")


def test_map_with_progress_reports_every_item(capsys):
    pytest.importorskip("tqdm")
    with ClusterExecutor(max_workers=2) as ex:
        assert list(ex.map(abs, range(-50, 0), progress=True)) == list(range(50, 0, -1))
        assert list(ex.map(abs, iter(range(30)), chunksize=7, progress=True)) == list(range(30))
    err = capsys.readouterr().err
    assert "50/50" in err and "100%" in err  # tqdm's bar, finished
    assert "30" in err.rsplit("abs", 1)[1]  # the generator's bar counted all 30 items (no total known)
