"""itera-bench report / claims / all: real plots from real runs, records of every kind read back
from every format, the claims table on two real bundles, and refusals in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from itera_bench.record import Record, format_records
from clirun import bench, one_error_line

pytest.importorskip("matplotlib")
REPO = Path(__file__).resolve().parents[1]
BLUE = (0x1F / 255, 0x77 / 255, 0xB4 / 255)  # plot.PALETTE[0]: the first series of every plot


def assert_drawn(png: Path):
    """The PNG exists, is not blank, and the first series' colour was drawn on it."""
    import matplotlib.image

    assert png.exists(), png
    pixels = matplotlib.image.imread(png)[..., :3]
    assert pixels.var() > 0, f"{png} is blank"
    near_blue = (np.abs(pixels - BLUE).max(axis=-1) < 0.06).sum()
    assert near_blue > 30, f"{png}: no data drawn ({near_blue} pixels of the first series' colour)"


def images(report: Path) -> list[Path]:
    text = report.read_text()
    names = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    return [report.parent / n for n in names]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """A real (tiny, seconds-long) itera-train run on real text: the repo's own prose and code."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("run")
    data = root / "text"
    data.mkdir()
    for i, src in enumerate(["README.md", "itera_lite/train.py", "itera_lite/data/corpus.py", "runtime/bundle.py",
                             "export/exporter.py", "bench/record.py"]):
        (data / f"{i}.txt").write_text((REPO / src).read_text())
    out = root / "itera"
    from clirun import invoke

    from itera_lite.cli import main

    proc = invoke(main, "--model", "itera", "--data", data, "--out", out, "--vocab-size", "256", "--seq-len", "32",
                  "--batch-size", "4", "--threads", "1", "--max-steps", "12", "--eval-every", "4",
                  "--eval-batches", "2", "--final-eval-batches", "2", "--warmup-steps", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def latency_file(tiny_itera, tiny_baseline, tmp_path_factory):
    """Real latency rows of both families at two depths (tiny, so seconds), as jsonl."""
    proc = bench("latency", tiny_itera.bundle, tiny_baseline.bundle, "-p", "16", "-n", "4", "-d", "8,32",
                 "-r", "2", "-o", "jsonl")
    assert proc.returncode == 0, proc.stderr[-2000:]
    path = tmp_path_factory.mktemp("results") / "latency.jsonl"
    path.write_text(proc.stdout)
    return path


def crafted(bundle: Path, kind: str, test: str, metric: str, unit: str, samples, **kw) -> Record:
    """A record of a kind other helpers' subcommands write, on a real bundle's fields."""
    from itera_bench.sweep import bundle_fields
    from itera_runtime.bundle import load_bundle

    return Record(kind=kind, test=test, metric=metric, unit=unit, samples=list(samples), higher_is_better=False,
                  repetitions=len(samples), n_threads=1, **bundle_fields(load_bundle(bundle)), **kw)


@pytest.fixture(scope="module")
def other_kinds(tiny_itera, tiny_baseline) -> list[Record]:
    rows = []
    for b, peak, state, bpb, cpu in ((tiny_itera.bundle, 60e6, lambda d: 9_000, 2.30, 0.4),
                                     (tiny_baseline.bundle, 62e6, lambda d: 4_096 * (d + 1), 2.10, 1.3)):
        for d in (8, 32, 128):
            rows.append(crafted(b, "memory", f"tg4@d{d}", "peak_rss_bytes", "B", [peak + d * 1e4, peak + d * 1e4 + 5e4],
                                n_depth=d, n_gen=4, extra={"model_bytes": 1_000_000, "state_bytes": state(d)}))
            rows.append(crafted(b, "memory", f"state@d{d}", "state_bytes", "B", [float(state(d))], n_depth=d))
            rows.append(crafted(b, "flops", f"flops@d{d}", "flops_per_token", "FLOP", [1e6 + d * 1e3], n_depth=d))
        rows.append(crafted(b, "energy", "tg4@d8", "cpu_ms_per_token", "CPU time ms/token", [cpu, cpu * 1.02],
                            extra={"energy": "not measurable here: powercap: energy_uj is readable only by root"}))
        rows.append(crafted(b, "energy", "tg4@d8", "joules_per_token", "J/token (est.)", [cpu * 0.01], estimated=True,
                            method="CPU time x 5 W per busy core (assumed)"))
        rows.append(crafted(b, "quality", "text:test", "bits_per_byte", "bit/B", [bpb]))
        rows.append(crafted(b, "quality", "text:test", "perplexity", "ppl", [bpb * 3]))
    return rows


# --------------------------------------------------------------------------- report


def test_every_format_parses_back_for_every_kind(other_kinds, tmp_path):
    from itera_bench.report import load_results

    files = []
    for fmt in ("json", "jsonl", "csv"):
        files.append(tmp_path / f"rows.{fmt}")
        files[-1].write_text(format_records(other_kinds, fmt))
    for f in files:
        back, reasons = load_results([f])
        assert [r.to_dict() for r in back] == [r.to_dict() for r in other_kinds], f.suffix
        assert reasons == {}
    everything, _ = load_results([tmp_path])  # a results folder: every record file in it
    assert len(everything) == 3 * len(other_kinds)


def test_report_renders_every_kind_with_real_plots(latency_file, other_kinds, train_run, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "latency.jsonl").write_text(latency_file.read_text())
    (results / "other.csv").write_text(format_records(other_kinds, "csv"))
    (results / "energy.err").write_text("error: no readable energy counter: powercap: permission denied\n")
    out = tmp_path / "report"
    proc = bench("report", results, "--runs", train_run, "-o", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out / "report.md"
    text = report.read_text()
    for heading in ("## Claims", "## Speed", "### Decode tokens/s", "### Prompt processing tokens/s", "## Memory",
                    "## Energy", "## Quality", "## flops", "## Not measured", "## Training runs",
                    "## How these numbers were made"):
        assert heading in text, heading
    assert "CPU time (user+sys) per token: CPU time, not energy" in text
    assert "(est.)" in text  # the estimated J/token rows are marked wherever they appear
    pngs = images(report)
    names = {p.name for p in pngs}
    assert {"decode_tokens_per_s.png", "prompt_tokens_per_s.png", "memory_peak_rss_bytes.png",
            "memory_state_bytes.png", "energy_cpu_ms_per_token.png", "quality_vs_size.png",
            "runs_loss.png", "runs_experts_0.png"} <= names, names
    for png in pngs:
        assert_drawn(png)
    claims = json.loads((out / "claims.json").read_text())["claims"]
    assert [c["claim"] for c in claims[0]["claims"]] == ["size", "speed", "energy", "quality"]
    assert not list(out.glob(".report-*")) and not list(out.glob("*.tmp"))


def test_report_refusals_are_one_line_and_write_nothing(tmp_path, train_run):
    out = tmp_path / "out"
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"not": "records"}')
    assert "not a record file written by itera-bench" in one_error_line(bench("report", foreign, "-o", out))
    assert "no such file" in one_error_line(bench("report", tmp_path / "missing.jsonl", "-o", out))
    assert "not a training run" in one_error_line(bench("report", "--runs", tmp_path, "-o", out))
    assert "nothing to report" in one_error_line(bench("report", "-o", out))
    assert not (out / "report.md").exists()


# --------------------------------------------------------------------------- training curves


def test_run_curves_from_a_real_training_run(train_run, tmp_path):
    from itera_bench.curves import load_run, load_runs

    run = load_run(train_run)
    assert [r["step"] for r in run.train] == list(range(1, 13)) and [r["step"] for r in run.eval] == [4, 8, 12]
    n_layers = len(run.expert_load[-1][1])
    assert [r.label for r in load_runs([train_run, train_run])] == ["itera-tiny (itera)"] * 2
    # A second run to overlay: the first half of the same run, as a killed run leaves it (no summary).
    half = tmp_path / "half"
    half.mkdir()
    lines = (train_run / "metrics.jsonl").read_text().splitlines()
    (half / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= 6))
    proc = bench("report", "--runs", train_run, "--runs", half, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| itera-tiny |" in text and "| half |" in text and "no summary.json" in text
    assert "underused experts" in text and f"| {n_layers - 1} |" in text  # one row per layer
    pngs = images(tmp_path / "out" / "report.md")
    assert {p.name for p in pngs} >= {"runs_loss.png", "runs_bits_per_byte.png", "runs_optimisation.png",
                                      "runs_experts_0.png", "runs_experts_1.png"}
    for png in pngs:
        assert_drawn(png)


def test_a_run_without_expert_columns_still_draws(train_run, tmp_path):
    # A baseline run (or an older train.csv) has no expert load: the heatmap is skipped, the rest drawn.
    run = tmp_path / "csv-only"
    run.mkdir()
    (run / "train.csv").write_text((train_run / "train.csv").read_text())
    (run / "eval.csv").write_text((train_run / "eval.csv").read_text())
    proc = bench("report", "--runs", run, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = images(tmp_path / "out" / "report.md")
    assert "runs_loss.png" in {p.name for p in pngs} and not any("experts" in p.name for p in pngs)
    for png in pngs:
        assert_drawn(png)


# --------------------------------------------------------------------------- claims


def test_claims_table_on_two_real_bundles(tiny_itera, tiny_baseline, other_kinds, tmp_path):
    from itera_runtime.bundle import load_bundle

    given = tmp_path / "given.jsonl"
    given.write_text(format_records(other_kinds, "jsonl"))
    proc = bench("claims", tiny_itera.bundle, "--baseline", tiny_baseline.bundle, "--results", given,
                 "-r", "1", "-n", "4", "--no-warmup", "-o", "json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (table,) = json.loads(proc.stdout)["claims"]
    rows = {c["claim"]: c for c in table["claims"]}
    assert list(rows) == ["size", "speed", "energy", "quality"]
    assert all(c["verdict"] in ("met", "not met", "not measured") for c in rows.values())
    size = load_bundle(tiny_baseline.bundle).size_bytes / load_bundle(tiny_itera.bundle).size_bytes
    assert rows["size"]["numbers"]["ratio"] == pytest.approx(size) and rows["size"]["verdict"] == "not met"
    speed = rows["speed"]["numbers"]
    assert set(speed) == {"decode@d128", "decode@d2048", "pp512"}  # measured here, all three
    for v in speed.values():
        assert v["ratio"] == pytest.approx(v["tokens_per_s"] / v["baseline_tokens_per_s"])
    assert rows["speed"]["verdict"] == ("met" if min(v["ratio"] for v in speed.values()) >= 2 else "not met")
    # No counter: not measurable, the reason given, CPU-time ratio beside it; the estimate is not used.
    energy = rows["energy"]
    assert energy["verdict"] == "not measured"
    assert energy["measured"].startswith("not measurable here: powercap: energy_uj is readable only by root")
    assert "CPU-seconds/token ratio (CPU time, not energy): tg4@d8 3.25x" in energy["measured"]
    assert "estimated J/token rows exist and are not used" in energy["measured"]
    assert rows["quality"]["numbers"]["relative_change"] == pytest.approx(2.30 / 2.10 - 1)
    assert rows["quality"]["verdict"] == "met"  # +9.5% < 20%

    md = bench("claims", tiny_itera.bundle, "--baseline", tiny_baseline.bundle, "--no-measure", "-o", "md")
    assert md.returncode == 0, md.stderr
    lines = [ln for ln in md.stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| claim")]
    assert [ln.split(" | ")[0] for ln in lines] == ["| size", "| speed", "| energy", "| quality"]
    assert all(ln.rstrip(" |").endswith(("| met", "| not met", "| not measured")) for ln in lines)


def test_claims_never_count_an_estimate_or_a_missing_row(tiny_itera, tiny_baseline, other_kinds):
    from itera_bench.claims import claims_from_records

    (table,) = claims_from_records([r for r in other_kinds if r.kind == "energy"])
    rows = {c.claim: c for c in table.claims}
    assert rows["energy"].verdict == "not measured" and rows["speed"].verdict == "not measured"
    assert rows["quality"].verdict == "not measured" and rows["size"].verdict == "not met"
    # A real counter's rows: the ratio, and a verdict against 50x.
    real = [Record.from_dict({**r.to_dict(), "metric": "joules_per_token", "unit": "J/token", "estimated": False,
                              "extra": {"energy_source": "powercap package-0"}})
            for r in other_kinds if r.metric == "cpu_ms_per_token"]
    (table,) = claims_from_records(real)
    energy = next(c for c in table.claims if c.claim == "energy")
    assert energy.verdict == "not met" and energy.numbers["ratio"] == {"tg4@d8": pytest.approx(1.3 / 0.4)}
    assert "powercap package-0" in energy.how


# --------------------------------------------------------------------------- all


def test_all_runs_every_registered_measurement_with_its_small_options():
    import click

    from itera_bench.cli import MEASUREMENTS, bench_command, main, measurement, suite

    assert list(MEASUREMENTS) == ["latency", "step", "profile", "memory", "quality", "flops", "energy", "serve"]
    runs = {inv.name: inv for inv in suite(["a", "b.gguf"], [1, 2], 3, [128, 2048], baseline="a", skip=("profile",))}
    assert list(runs) == ["latency", "step", "memory", "quality", "flops", "energy", "serve"]
    assert runs["latency"].bundles == runs["step"].bundles == runs["quality"].bundles == ("a", "b.gguf")
    assert runs["memory"].bundles == runs["flops"].bundles == ("a",)  # .gguf: latency, step and quality only
    assert runs["latency"].argv() == ["latency", "a", "b.gguf", "--threads", "1,2", "--repetitions", "3",
                                      "--output", "jsonl", "--baseline", "a", "--n-gen", "32",
                                      "--n-depth", "0,128,2048", "--n-prompt-gen", "512,32"]  # -p 512: its default
    assert runs["step"].options["n_depth"] == [128, 2048] and runs["memory"].options["n_gen"] == 16

    @measurement(lambda depths: {"n": 2})
    @main.command(name="widgets")
    @bench_command
    @click.option("-n", default=1)
    def widgets(bundles, threads, repetitions, warmup, n):
        return []

    try:  # a subcommand merged later runs in `all` by registering itself
        assert suite(["a"], [1], 1, [8])[-1].argv() == ["widgets", "a", "--repetitions", "1", "--output", "jsonl",
                                                        "-n", "2"]
    finally:
        del main.commands["widgets"], MEASUREMENTS["widgets"]


@pytest.mark.slow
def test_all_runs_every_subcommand_then_the_report(tiny_itera, tiny_baseline, tmp_path):
    out = tmp_path / "results"
    # quality reads the Shakespeare corpus (network on first use) and energy measures in
    # seconds-long windows: both are tested in their own files
    proc = bench("all", tiny_itera.bundle, tiny_baseline.bundle, "-o", out, "-r", "1", "-d", "8,32",
                 "--skip", "profile", "--skip", "quality", "--skip", "energy")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "latency" in proc.stderr and "step" in proc.stderr and "profile" not in proc.stderr
    from itera_bench.report import load_results

    records, reasons = load_results([out])
    kinds = {r.kind for r in records}
    assert {"latency", "step", "memory", "flops"} <= kinds and not {"profile", "quality", "energy"} & kinds
    assert all(not r.interrupted for r in records)
    assert (out / "report" / "report.md").exists() and (out / "report" / "claims.json").exists()
    text = (out / "report" / "report.md").read_text()
    assert "## Memory" in text and "## flops" in text and "memory_state_bytes.png" in text
    for png in images(out / "report" / "report.md"):
        assert_drawn(png)


def test_expert_table_uses_the_runs_own_utilisation_when_its_summary_has_it(train_run, tmp_path):
    # itera-train's summary names underused experts and collapsed routers (measured on the
    # validation split with best.pt); the report shows that rather than its own reading.
    from itera_bench.curves import load_run, runs_section

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text((train_run / "metrics.jsonl").read_text())
    summary = json.loads((train_run / "summary.json").read_text())
    summary["experts"] = {"split": "val", "threshold": 0.03125, "collapsed": True, "collapsed_layers": [1],
                          "layers": [{"layer": 0, "share": [0.25] * 4, "underused": [], "collapsed": False},
                                     {"layer": 1, "share": [0.97, 0.01, 0.01, 0.01], "underused": [1, 2, 3],
                                      "collapsed": True}]}
    (run / "summary.json").write_text(json.dumps(summary))
    text = runs_section([load_run(run)], tmp_path)
    assert "best.pt on the val split (itera-train's summary)" in text
    assert "| 1 | 0.010 | 0.970 | 1, 2, 3 | **yes** |" in text and "| 0 | 0.250 | 0.250 | - | no |" in text


def test_claims_and_all_refuse_in_one_line(tiny_itera, tmp_path):
    assert one_error_line(bench("claims", tiny_itera.bundle, "--baseline", tmp_path))
    assert one_error_line(bench("all", tmp_path, "-o", tmp_path / "res"))
    assert "not a training run" in one_error_line(bench("all", tiny_itera.bundle, "-o", tmp_path / "res",
                                                        "--runs", tmp_path))
    assert not (tmp_path / "res").exists()  # refused before anything was measured or written


def test_report_shows_requests_throttled_rows_and_missing_sensors_once(tmp_path):
    from itera_bench.report import render

    def row(test, metric="tokens_per_s", unit="tok/s", thermal=None, **kw):
        return Record(kind="latency", test=test, metric=metric, unit=unit, samples=[10.0, 10.1], bundle="b",
                      model_filename="b", family="itera", n_threads=1, thermal=thermal or {}, **kw)

    missing = {"missing": ["no cpufreq policy under /sys/devices/system/cpu/cpufreq"]}
    hot = {"temp_before_c": 60.0, "temp_after_c": 81.5, "cpu_mhz_min": 1500, "cpu_mhz_max": 2400, "throttled": True}
    records = [row("pp512", thermal=hot), row("tg32", thermal=missing), row("pp512+tg32", thermal=missing),
               row("pp512+tg32", "time_to_first_token", "ms", thermal=missing, higher_is_better=False)]
    text = render(records, tmp_path / "report").read_text()
    assert "### Requests: prompt then generation, and time to first token" in text
    requests = text.split("### Requests")[1]
    assert "time_to_first_token (ms" in requests and "| pp512+tg32 |" in requests
    assert "60.0→81.5 °C, 1500–2400 MHz" in text and "(throttled)" in text
    assert "Throttled rows (the firmware or kernel reported throttling or under-voltage during the case): 1 of 4." in text
    assert text.count("no cpufreq policy") == 1


def test_all_gives_quality_the_fp32_bundle_its_int8_export_came_from(tiny_itera, tiny_itera_int8, tiny_baseline):
    from itera_bench.suite import quantization_reference
    from itera_runtime.bundle import load_bundle

    itera, int8, baseline = (load_bundle(b.bundle) for b in (tiny_itera, tiny_itera_int8, tiny_baseline))
    assert quantization_reference([baseline, int8, itera]) is itera
    assert quantization_reference([baseline, itera]) is None


def test_claims_same_engine_and_same_precision_rows():
    """Beside the speed row against the given (fp32 ONNX) baseline: Itera GGUF vs Transformer GGUF in
    llama.cpp at its precision, and Itera vs the fastest Transformer engine at that precision."""
    from itera_bench.claims import claims_from_records
    from itera_bench.record import Record

    def row(name, family, engine, quant, test, tps, depth):
        return Record(kind="latency", test=test, metric="tokens_per_s", unit="tok/s", samples=[tps], bundle=name,
                      model_filename=name, family=family, engine=engine, quantization=quant, n_threads=1,
                      n_depth=depth)

    records = []
    for test, depth, speeds in (("tg32@d128", 128, (900, 1000, 400, 500, 300)),
                                ("tg32@d2048", 2048, (800, 900, 100, 150, 120)),
                                ("pp512", 0, (5000, 4000, 3000, 2000, 2500))):
        records += [row("itera-int8.gguf", "itera", "llama.cpp", "int8", test, speeds[0], depth),
                    row("itera-int8", "itera", "onnxruntime", "int8", test, speeds[1], depth),
                    row("base", "baseline", "onnxruntime", "none", test, speeds[2], depth),
                    row("base-int8.gguf", "baseline", "llama.cpp", "int8", test, speeds[3], depth),
                    row("base-int8", "baseline", "onnxruntime", "int8", test, speeds[4], depth)]
    tables = {t.bundle: {c.claim: c for c in t.claims}
              for t in claims_from_records(records, itera=["itera-int8.gguf", "itera-int8"], baseline="base")}
    gguf = tables["itera-int8.gguf"]
    assert list(gguf) == ["size", "speed", "speed, same engine (llama.cpp, int8)", "speed, same precision (int8)",
                          "energy", "quality"]
    assert "baseline (fp32 onnxruntime)" in gguf["speed"].how
    assert gguf["speed"].numbers["decode@d128"]["ratio"] == pytest.approx(900 / 400)
    same = gguf["speed, same engine (llama.cpp, int8)"].numbers
    assert same["decode@d2048"]["ratio"] == pytest.approx(800 / 150) and same["pp512"]["baseline"] == "base-int8.gguf"
    fastest = gguf["speed, same precision (int8)"].numbers
    assert fastest["decode@d128"]["baseline"] == "base-int8.gguf" and fastest["pp512"]["baseline"] == "base-int8"
    assert fastest["pp512"]["ratio"] == pytest.approx(5000 / 2500)
    onnx = tables["itera-int8"]
    assert onnx["speed, same engine (onnxruntime, int8)"].numbers["decode@d128"]["ratio"] == pytest.approx(1000 / 300)
