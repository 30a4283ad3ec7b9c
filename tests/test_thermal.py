"""Thermal state of every swept record, read by the real reader from fixture sysfs trees (laid out
as the kernel lays them out) and a replayed `vcgencmd get_throttled`; nothing patched."""

from __future__ import annotations

import json
import os
import stat
import textwrap
import threading
import time
from pathlib import Path

import pytest

from itera_bench.record import Record, format_records, markdown, parse
from itera_bench.sweep import Case, Sample, run_cases
from itera_bench.thermal import ThermalOptions, ThermalProbe, find_cpu_zone
from clirun import bench


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a sysfs read never sees half a value


def sysfs_tree(root: Path, zones: dict[str, int] | None = None, policies: dict[str, int] | None = None,
               throttle_counts: dict[str, int] | None = None) -> Path:
    """zones: {type: millidegrees}; policies: {policyN: kHz}; throttle_counts: {cpuN: count}."""
    for i, (kind, milli) in enumerate((zones or {}).items()):
        write(root / "class" / "thermal" / f"thermal_zone{i}" / "type", kind + "\n")
        write(root / "class" / "thermal" / f"thermal_zone{i}" / "temp", f"{milli}\n")
    for name, khz in (policies or {}).items():
        write(root / "devices" / "system" / "cpu" / "cpufreq" / name / "scaling_cur_freq", f"{khz}\n")
    for cpu, n in (throttle_counts or {}).items():
        write(root / "devices" / "system" / "cpu" / cpu / "thermal_throttle" / "core_throttle_count", f"{n}\n")
    return root


def zone_file(root: Path, i: int = 1) -> Path:
    return root / "class" / "thermal" / f"thermal_zone{i}" / "temp"


def replayed_vcgencmd(tmp_path: Path, answers: list[str]) -> Path:
    """A `vcgencmd` that prints recorded get_throttled answers in turn (the last one repeats)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for i, text in enumerate(answers):
        (bindir / f"throttled{i}.txt").write_text(text + "\n")
    script = bindir / "vcgencmd"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        here=$(dirname "$0")
        [ "$1" = get_throttled ] || {{ echo 'error=2 error_msg="Command not registered"'; exit 255; }}
        n=$(cat "$here/calls" 2>/dev/null | wc -l)
        echo call >> "$here/calls"
        f="$here/throttled$n.txt"
        [ -f "$f" ] || f="$here/throttled{len(answers) - 1}.txt"
        cat "$f"
        """))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def case(test: str, run) -> Case:
    return Case(Record(kind="latency", test=test, metric="tokens_per_s", unit="tok/s"), run)


def test_the_cpu_zone_is_found_by_type_not_by_number(tmp_path):
    root = sysfs_tree(tmp_path, {"acpitz": 30000, "x86_pkg_temp": 55000, "iwlwifi_1": 40000})
    path, kind, seen = find_cpu_zone(str(root))
    assert kind == "x86_pkg_temp" and path.endswith("thermal_zone1") and seen == ["acpitz", "x86_pkg_temp", "iwlwifi_1"]
    path, kind, _ = find_cpu_zone(str(sysfs_tree(tmp_path / "b", {"gpu-thermal": 1, "cpu-big0-thermal": 2})))
    assert kind == "cpu-big0-thermal"
    assert find_cpu_zone(str(sysfs_tree(tmp_path / "c", {"acpitz": 30000})))[0] is None


def test_temperatures_and_the_lowest_clock_during_a_run_are_recorded(tmp_path):
    root = sysfs_tree(tmp_path, {"acpitz": 30000, "cpu-thermal": 48000}, {"policy0": 1500000, "policy4": 2400000})
    freq = root / "devices" / "system" / "cpu" / "cpufreq" / "policy0" / "scaling_cur_freq"

    def run():  # the clock drops mid-run and recovers before the run returns: only sampling sees it
        write(zone_file(root), "61500\n")
        write(freq, "600000\n")
        time.sleep(0.3)
        write(freq, "1500000\n")
        return Sample(1.0)

    [r] = run_cases([case("tg1", run)], 2, warmup=False, progress=False,
                    thermal=ThermalOptions(sysfs_root=str(root), vcgencmd="no-such-vcgencmd"))
    t = r.thermal
    assert t["zone"] == "cpu-thermal" and t["temp_before_c"] == 48.0 and t["temp_after_c"] == 61.5
    assert t["temp_max_c"] == 61.5 and t["cpu_mhz_min"] == 600 and t["cpu_mhz_max"] == 2400
    assert "throttled" not in t and t["missing"] == ["no-such-vcgencmd not found (not a Raspberry Pi): no throttle flags"]
    assert "48.0→61.5 °C, 600–2400 MHz" in markdown([r])


def test_absent_sensors_give_no_fields_and_are_said_once(tmp_path):
    rows = run_cases([case(f"tg{i}", lambda: Sample(1.0)) for i in range(3)], 2, warmup=False, progress=False,
                     thermal=ThermalOptions(sysfs_root=str(tmp_path), vcgencmd="no-such-vcgencmd"))
    for r in rows:
        assert set(r.thermal) == {"missing"} and len(r.thermal["missing"]) == 3
    md = markdown(rows)
    assert "| thermal" not in md and "°C" not in md
    assert md.count("thermal (local): not recorded: no CPU/SoC thermal zone") == 1 and md.count("no cpufreq policy") == 1
    assert parse(format_records(rows, "csv"), "csv")[0].thermal == rows[0].thermal


def test_replayed_get_throttled_marks_the_row_throttled(tmp_path):
    # before the sweep: nothing; after it: "throttling has occurred" (bit 18) and soft limit now (bit 3)
    vcgencmd = replayed_vcgencmd(tmp_path, ["throttled=0x0", "throttled=0x40008"])
    [r] = run_cases([case("pp8", lambda: Sample(5.0))], 2, warmup=False, progress=False,
                    thermal=ThermalOptions(sysfs_root=str(tmp_path / "none"), vcgencmd=str(vcgencmd)))
    assert r.thermal["throttled_before"] == {"raw": "0x0", "flags": []}
    assert r.thermal["throttled_after"]["flags"] == ["soft temperature limit", "throttling has occurred"]
    assert r.throttled and r.to_dict()["throttled"] is True
    md = markdown([r])
    assert "5.00 ± 0 (throttled)" in md and "warning: 1 row(s) ran while the CPU was throttled" in md


def test_throttling_that_had_occurred_before_the_sweep_does_not_mark_it(tmp_path):
    vcgencmd = replayed_vcgencmd(tmp_path, ["throttled=0x50000"])  # sticky since boot, nothing now
    [r] = run_cases([case("pp8", lambda: Sample(5.0))], 1, warmup=False, progress=False,
                    thermal=ThermalOptions(sysfs_root=str(tmp_path / "none"), vcgencmd=str(vcgencmd)))
    assert r.thermal["throttled"] is False and "(throttled)" not in markdown([r])


def test_kernel_throttle_count_rising_marks_the_row(tmp_path):
    root = sysfs_tree(tmp_path, throttle_counts={"cpu0": 7, "cpu1": 0})
    count = root / "devices" / "system" / "cpu" / "cpu1" / "thermal_throttle" / "core_throttle_count"

    def run():
        write(count, "3\n")
        return Sample(1.0)

    [r] = run_cases([case("tg1", run)], 1, warmup=False, progress=False,
                    thermal=ThermalOptions(sysfs_root=str(root), vcgencmd="no-such-vcgencmd"))
    assert r.thermal["throttle_count_delta"] == 3 and r.throttled


def test_cool_to_waits_for_the_temperature_and_gives_up_after_the_timeout(tmp_path):
    root = sysfs_tree(tmp_path, {"cpu-thermal": 80000})
    hot = lambda: Sample(1.0)  # noqa: E731
    threading.Timer(0.6, write, (zone_file(root, 0), "40000\n")).start()
    opts = ThermalOptions(cool_to_c=50, cool_timeout_s=30, sysfs_root=str(root), vcgencmd="no-such-vcgencmd")
    a, b = run_cases([case("a", hot), case("b", hot)], 1, warmup=False, progress=False, thermal=opts)
    assert "cool_wait_s" in a.thermal and a.thermal["cool_wait_s"] == 0  # the first run is not paced
    assert b.thermal["cool_wait_s"] >= 0.4 and b.thermal["cool_timeouts"] == 0 and b.thermal["cool_to_c"] == 50
    write(zone_file(root, 0), "80000\n")
    opts = ThermalOptions(cool_to_c=50, cool_timeout_s=0.3, delay_s=0.1, sysfs_root=str(root), vcgencmd="x-none")
    a, b = run_cases([case("a", hot), case("b", hot)], 1, warmup=False, progress=False, thermal=opts)
    assert b.thermal["cool_timeouts"] == 1 and b.thermal["delay_s"] == 0.1


def test_cool_to_without_a_temperature_sensor_is_refused():
    with pytest.raises(ValueError, match="--cool-to 50: no CPU/SoC thermal zone"):
        ThermalProbe(ThermalOptions(cool_to_c=50, sysfs_root="/nonexistent"))


def test_step_end_to_end_on_a_fixture_tree_and_replayed_vcgencmd(tiny_itera, tmp_path):
    root = sysfs_tree(tmp_path / "sys", {"cpu-thermal": 52250}, {"policy0": 2400000})
    vcgencmd = replayed_vcgencmd(tmp_path, ["throttled=0x0", "throttled=0x0", "throttled=0x4"])
    env = {**os.environ, "PATH": f"{vcgencmd.parent}{os.pathsep}{os.environ['PATH']}"}
    proc = bench("step", tiny_itera.bundle, "-n", "4", "-d", "1,2", "-r", "2", "--no-warmup", "--delay", "0.01",
                 "--sysfs-root", root, "-o", "json", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    assert len(rows) == 2
    for r in rows:
        t = r["thermal"]
        assert t["temp_before_c"] == 52.25 and t["cpu_mhz_min"] == t["cpu_mhz_max"] == 2400
        assert t["throttled_after"]["flags"] == ["throttled"] and r["throttled"] and t["delay_s"] == 0.01
        assert "missing" not in t
    proc = bench("step", tiny_itera.bundle, "-n", "4", "-d", "1", "-r", "1", "--sysfs-root", tmp_path / "empty",
                 "--cool-to", "60")
    assert proc.returncode == 1 and proc.stderr.startswith("error: --cool-to 60: no CPU/SoC thermal zone")


def test_board_model_revision_os_governor_and_cooling_come_from_a_pi_tree(tmp_path):
    from itera_runtime.provenance import board

    write(tmp_path / "proc" / "device-tree" / "model", "Raspberry Pi 5 Model B Rev 1.0\x00")
    write(tmp_path / "proc" / "cpuinfo", "processor\t: 0\nBogoMIPS\t: 108.00\n\nRevision\t: d04170\n"
                                          "Serial\t\t: 0123\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n")
    write(tmp_path / "etc" / "os-release", 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n')
    write(tmp_path / "sys" / "devices" / "system" / "cpu" / "cpufreq" / "policy0" / "scaling_governor", "ondemand\n")
    for name, text in (("type", "pwm-fan"), ("cur_state", "2"), ("max_state", "4")):
        write(tmp_path / "sys" / "class" / "thermal" / "cooling_device0" / name, text + "\n")
    b = board(tmp_path)
    assert b == {"model": "Raspberry Pi 5 Model B Rev 1.0", "revision": "d04170",
                 "os": "Debian GNU/Linux 12 (bookworm)", "governor": "ondemand", "cooling": ["pwm-fan 2/4"]}
    assert board(tmp_path / "nothing") == {}
    r = Record(kind="latency", test="tg1", metric="tokens_per_s", unit="tok/s", samples=[1.0],
               provenance={"board": b, "cpu": "Cortex-A76", "cpu_count": 4, "command": "itera-bench"})
    assert "model Raspberry Pi 5 Model B Rev 1.0, revision d04170, governor ondemand, cooling pwm-fan 2/4," in markdown([r])
