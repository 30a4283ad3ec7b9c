"""itera-bench compare on real result files written by itera-bench on the tiny bundles, and its
Mann-Whitney U test against a brute-force enumeration of the null distribution."""

from __future__ import annotations

import itertools
import json
import statistics

import pytest

from itera_bench.compare import compare, mann_whitney_u
from itera_bench.record import parse
from clirun import bench


def brute_force_p(x, y) -> float:
    """Two-sided p of U by enumerating every split of the pooled values (the exact null)."""
    pooled, m = x + y, len(x)
    u = lambda xs, ys: sum((a > b) + 0.5 * (a == b) for a in xs for b in ys)  # noqa: E731
    observed = u(x, y)
    us = []
    for idx in itertools.combinations(range(len(pooled)), m):
        xs = [pooled[i] for i in idx]
        ys = [pooled[i] for i in range(len(pooled)) if i not in idx]
        us.append(u(xs, ys))
    lo = sum(v <= observed for v in us) / len(us)
    hi = sum(v >= observed for v in us) / len(us)
    return min(1.0, 2 * min(lo, hi))


@pytest.mark.parametrize("x,y", [([1.0, 2, 3, 4, 5], [6.0, 7, 8, 9, 10]), ([1.1, 5.2, 3.3], [2.4, 4.5, 6.6, 0.7]),
                                 ([10.0, 12.5, 11.2, 13.9, 9.1], [11.7, 14.2, 15.3, 12.9, 16.4])])
def test_exact_mann_whitney_agrees_with_enumeration(x, y):
    u, p = mann_whitney_u(x, y)
    assert p == pytest.approx(brute_force_p(x, y))
    assert u == sum(a > b for a in x for b in y)
    assert mann_whitney_u(y, x)[1] == pytest.approx(p)


def test_tied_or_large_samples_use_the_normal_approximation():
    assert mann_whitney_u([1.0] * 6, [1.0] * 6)[1] == 1.0
    x, y = [float(i) for i in range(30)], [float(i) + 20.5 for i in range(30)]  # untied, but too many to enumerate
    u, p = mann_whitney_u(x, y)
    m = n = 30  # the textbook z with continuity correction
    z = (abs(u - m * n / 2) - 0.5) / (m * n * (m + n + 1) / 12) ** 0.5
    assert p == pytest.approx(2 * (1 - statistics.NormalDist().cdf(z)))
    assert p < 1e-6


@pytest.fixture(scope="module")
def two_runs(tiny_itera, tiny_itera_int8, tmp_path_factory):
    """Real records: the fp32 bundle twice (OLD a file, NEW a folder) and its int8 export once."""
    root = tmp_path_factory.mktemp("compare")
    files = {}
    for name, bundle in (("old", tiny_itera.bundle), ("new", tiny_itera.bundle), ("int8", tiny_itera_int8.bundle)):
        proc = bench("step", bundle, "-n", "8", "-d", "1,4", "-r", "5", "-o", "jsonl")
        assert proc.returncode == 0, proc.stderr[-2000:]
        folder = root / name
        folder.mkdir()
        (folder / "step.jsonl").write_text(proc.stdout)
        files[name] = folder / "step.jsonl"
    return files


def test_same_bundle_rows_are_matched_and_tested_on_their_samples(two_runs):
    proc = bench("compare", two_runs["old"], two_runs["new"].parent, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    old = {r.test: r for r in parse(two_runs["old"].read_text(), "jsonl")}
    new = {r.test: r for r in parse(two_runs["new"].read_text(), "jsonl")}
    assert out["changed"] == [] and out["unmatched_old"] == out["unmatched_new"] == 0
    assert sorted(r["test"] for r in out["rows"]) == ["step@d1", "step@d4"]
    for row in out["rows"]:
        o, n = old[row["test"]], new[row["test"]]
        assert row["speedup"] == pytest.approx(o.median / n.median)  # µs per step: lower is better
        assert row["p_value"] == pytest.approx(brute_force_p(o.samples, n.samples))
        assert row["significant"] == (row["p_value"] < 0.05)


def test_a_changed_bundle_is_named_and_matched_on_its_model(two_runs):
    proc = bench("compare", two_runs["old"], two_runs["int8"])
    assert proc.returncode == 0, proc.stderr
    md = proc.stdout
    assert "OLD and NEW differ in: bundle (bundles matched on family and parameter count)" in md
    assert "| bundle → bundle int8 | step@d1 |" in md and "| bundle → bundle int8 | step@d4 |" in md
    for line in md.splitlines():
        if line.startswith("| bundle"):
            p = line.split("|")[-2].strip()
            assert float(p.split()[0]) >= 0 and (p.endswith("not significant") == (float(p.split()[0]) >= 0.05))
    result = compare(parse(two_runs["old"].read_text(), "jsonl"), parse(two_runs["int8"].read_text(), "jsonl"))
    assert len(result.rows) == 2 and result.changed == ["bundle"]
    csv = bench("compare", two_runs["old"], two_runs["int8"], "-o", "csv").stdout.splitlines()
    assert csv[0].startswith("kind,test,metric,unit,model_old,model_new") and len(csv) == 3


def test_missing_input_is_one_error_line(tmp_path):
    proc = bench("compare", tmp_path / "nope.jsonl", tmp_path)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
