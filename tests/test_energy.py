"""itera-bench energy and its counter readers, run on real files and real processes.

- powercap: fixture sysfs trees laid out as the kernel lays them out (zones in the device
  tree, symlinked flat into class/powercap), read by the real reader and its real background
  sampler; counters are advanced by the test (atomically, as sysfs reads are) while it runs.
- pi5-pmic: a `vcgencmd` script on PATH that prints recorded Pi 5 output, run by the real
  sampling loop (real processes, nothing patched).
- perf: recorded `perf stat` outputs through the parser, and the real perf where it exists.
- end to end: `itera-bench energy` on the tiny bundles, on this machine (no powercap: CPU
  time and the one-line reason), on a fixture tree advancing at a known power, and on the
  fake vcgencmd.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from itera_bench.energy import EnergyOptions, EnergyUnavailable, PmicBackend, open_meter
from itera_bench.perf_energy import PerfError, PerfMeter, parse_perf_stat
from itera_bench.pi5pmic import PmicError, PmicMeter, parse_pmic_adc, parse_throttled, rail_watts
from itera_bench.powercap import PowercapError, PowercapMeter, discover, select, total_domains
from itera_bench.record import format_records, parse
from clirun import bench, one_error_line


# --------------------------------------------------------------------------- sysfs trees


def write_atomic(path: Path, text: str) -> None:
    """Replace a file in one step: a sysfs read never sees half a value, nor may our reader."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def make_tree(base: Path, zones: dict[str, dict]) -> Path:
    """A powercap class directory as the kernel makes it; returns its path.

    zones: entry ("intel-rapl:0:2") → {"name", "energy_uj", "max_energy_range_uj", "max_power_uw"}.
    Zone directories nest in the device tree (intel-rapl/intel-rapl:0/intel-rapl:0:2) and
    appear flat in class/powercap as symlinks, beside a control-type entry with no name.
    """
    devices = base / "devices" / "virtual" / "powercap"
    cls = base / "class" / "powercap"
    cls.mkdir(parents=True, exist_ok=True)
    for entry, z in zones.items():
        ctype, _, index = entry.partition(":")
        parts = index.split(":")
        path = devices / ctype
        (path / "enabled").parent.mkdir(parents=True, exist_ok=True)
        (path / "enabled").write_text("1\n")
        if not (cls / ctype).exists():
            (cls / ctype).symlink_to(path)
        for i in range(1, len(parts) + 1):
            path = path / f"{ctype}:{':'.join(parts[:i])}"
        path.mkdir(parents=True)
        (path / "name").write_text(z["name"] + "\n")
        (path / "energy_uj").write_text(f"{z.get('energy_uj', 0)}\n")
        (path / "max_energy_range_uj").write_text(f"{z.get('max_energy_range_uj', 262143328850)}\n")
        if "max_power_uw" in z:
            (path / "constraint_0_name").write_text("long_term\n")
            (path / "constraint_0_max_power_uw").write_text(f"{z['max_power_uw']}\n")
        (cls / entry).symlink_to(path)
    return cls


# A laptop as Linux shows it: package-0 with core/uncore/dram inside, psys beside it, and the
# same package counter again over MMIO.
LAPTOP = {
    "intel-rapl:0": {"name": "package-0", "energy_uj": 1_000_000, "max_power_uw": 28_000_000},
    "intel-rapl:0:0": {"name": "core", "energy_uj": 500_000},
    "intel-rapl:0:1": {"name": "uncore", "energy_uj": 100_000},
    "intel-rapl:0:2": {"name": "dram", "energy_uj": 200_000},
    "intel-rapl:1": {"name": "psys", "energy_uj": 3_000_000},
    "intel-rapl-mmio:0": {"name": "package-0", "energy_uj": 1_000_000},
}


def advance(root: Path, uj: dict[str, int]) -> None:
    for entry, n in uj.items():
        f = root / entry / "energy_uj"
        write_atomic(f, f"{int(f.read_text()) + n}\n")


def test_zones_found_by_name_nested_and_duplicates_counted_once(tmp_path):
    root = make_tree(tmp_path, LAPTOP)
    zones = discover(str(root))
    assert {z.entry: z.domain for z in zones} == {
        "intel-rapl:0": "package", "intel-rapl:0:0": "core", "intel-rapl:0:1": "uncore", "intel-rapl:0:2": "dram",
        "intel-rapl:1": "psys", "intel-rapl-mmio:0": "package"}
    chosen, notes = select(zones, ("package", "dram"))
    assert [z.entry for z in chosen] == ["intel-rapl:0", "intel-rapl:0:2"]  # the MSR zone, not the MMIO copy
    assert notes == ["intel-rapl-mmio:0 (package-0) duplicates intel-rapl:0: counted once"]
    assert [z.parent_entry for z in chosen] == [None, "intel-rapl:0"]

    meter = PowercapMeter(str(root))
    # 10 J package, 2 J dram; core/uncore are inside package, psys is everything, the MMIO
    # zone is the package counter again: none of them may be added.
    advance(root, {"intel-rapl:0": 10_000_000, "intel-rapl-mmio:0": 10_000_000, "intel-rapl:0:0": 6_000_000,
                   "intel-rapl:0:1": 1_000_000, "intel-rapl:0:2": 2_000_000, "intel-rapl:1": 20_000_000})
    assert meter.read() == {"package": 10.0, "dram": 2.0}
    assert meter.describe()["total_of"] == ["package", "dram"]
    # dram is in the default where there is one (many laptops and AMD parts have none) ...
    no_dram = make_tree(tmp_path / "amd", {"intel-rapl:0": {"name": "package-0"}, "intel-rapl:0:0": {"name": "core"}})
    assert PowercapMeter(str(no_dram)).domains == ("package",)
    with pytest.raises(PowercapError, match=r"no dram zone here \(zones: core, package\)"):
        PowercapMeter(str(no_dram), ("package", "dram"))  # ... and an error when asked for by name


def test_psys_only_when_asked_and_never_added_to_package(tmp_path):
    root = make_tree(tmp_path, LAPTOP)
    assert total_domains(("package", "dram")) == ["package", "dram"]
    assert total_domains(("package", "dram", "psys")) == ["psys"]
    assert total_domains(("core", "uncore")) == ["core", "uncore"]  # inside package, summed only without it
    assert total_domains(("package", "core")) == ["package"]
    meter = PowercapMeter(str(root), ("package", "psys"))
    advance(root, {"intel-rapl:0": 4_000_000, "intel-rapl:1": 9_000_000})
    assert meter.read() == {"package": 4.0, "psys": 9.0}

    # On a machine without psys, asking for it is an error, not a silent package number.
    no_psys = make_tree(tmp_path / "desktop", {k: v for k, v in LAPTOP.items() if v["name"] != "psys"})
    with pytest.raises(PowercapError, match=r"no psys zone here \(zones: core, dram, package, uncore\)"):
        PowercapMeter(str(no_psys), ("package", "psys"))
    with pytest.raises(PowercapError, match="unknown domain"):
        PowercapMeter(str(root), ("gpu",))


def test_multi_socket_dram_is_per_package(tmp_path):
    root = make_tree(tmp_path, {
        "intel-rapl:0": {"name": "package-0"}, "intel-rapl:0:0": {"name": "dram"},
        "intel-rapl:1": {"name": "package-1"}, "intel-rapl:1:0": {"name": "dram"}})
    meter = PowercapMeter(str(root))
    assert len(meter.zones) == 4  # two dram zones with the same name are two counters
    advance(root, {"intel-rapl:0": 1_000_000, "intel-rapl:1": 2_000_000, "intel-rapl:0:0": 500_000,
                   "intel-rapl:1:0": 250_000})
    assert meter.read() == {"package": 3.0, "dram": 0.75}
    # Multi-die packages (Cascade Lake-AP) name one zone per die: each is a package counter.
    dies = make_tree(tmp_path / "dies", {"intel-rapl:0": {"name": "package-0-die-0"},
                                         "intel-rapl:1": {"name": "package-0-die-1"}})
    meter = PowercapMeter(str(dies))
    advance(dies, {"intel-rapl:0": 1_000_000, "intel-rapl:1": 1_500_000})
    assert [z.domain for z in meter.zones] == ["package", "package"] and meter.read() == {"package": 2.5}


def wait_reads(meter: PowercapMeter, n: int) -> None:
    """Until the background sampler has read every zone n more times."""
    target, deadline = meter.reads + n, time.monotonic() + 10
    while meter.reads < target:
        assert time.monotonic() < deadline, "the sampler stopped reading"
        time.sleep(0.002)


def test_wraparound_mid_run_is_counted_by_the_background_sampler(tmp_path):
    root = make_tree(tmp_path, {"intel-rapl:0": {"name": "package-0", "energy_uj": 900_000,
                                                 "max_energy_range_uj": 1_000_000, "max_power_uw": 10_000_000}})
    meter = PowercapMeter(str(root), ("package",), interval_s=0.01)
    meter.start()
    try:
        start = meter.read()["package"]
        counter = root / "intel-rapl:0" / "energy_uj"
        for value in (950_000, 50_000, 300_000, 999_000, 10_000):  # wraps twice, each seen by the sampler
            write_atomic(counter, f"{value}\n")
            wait_reads(meter, 2)
        total = meter.read()["package"] - start
    finally:
        meter.close()
    # 50k + (50k + 50k) + 250k + 699k + (1k + 10k) µJ
    assert total == pytest.approx(1.11)
    assert meter.wraps == 2


def test_sampling_interval_is_fast_enough_for_the_zones_maximum_power(tmp_path):
    # 1 J range at 10 W maximum: the counter can wrap every 0.1 s.
    root = make_tree(tmp_path, {"intel-rapl:0": {"name": "package-0", "max_energy_range_uj": 1_000_000,
                                                 "max_power_uw": 10_000_000}})
    meter = PowercapMeter(str(root), ("package",))
    assert meter.interval_s == pytest.approx(0.025)  # four reads per wrap period
    with pytest.raises(PowercapError, match="could miss a wrap"):
        PowercapMeter(str(root), ("package",), interval_s=0.1)
    # A real zone (262 kJ range, 28 W): read once a second, the slowest we allow.
    assert PowercapMeter(str(make_tree(tmp_path / "real", LAPTOP))).interval_s == 1.0


def test_missing_range_or_root_is_a_one_line_error(tmp_path):
    root = make_tree(tmp_path, {"intel-rapl:0": {"name": "package-0"}})
    (root / "intel-rapl:0" / "max_energy_range_uj").unlink()
    with pytest.raises(PowercapError, match="max_energy_range_uj is missing"):
        discover(str(root))
    with pytest.raises(PowercapError, match="does not exist"):
        discover(str(tmp_path / "nowhere"))
    garbage = make_tree(tmp_path / "garbage", {"intel-rapl:0": {"name": "package-0"}})
    write_atomic(garbage / "intel-rapl:0" / "energy_uj", "not a number\n")
    with pytest.raises(PowercapError, match=r"cannot read .*intel-rapl:0/energy_uj: invalid literal"):
        PowercapMeter(str(garbage))


def test_energy_uj_readable_only_by_root_is_said_in_one_line():
    """As an unprivileged user (root reads a 0400 file anyway, so the test drops to nobody)."""
    if not shutil.which("setpriv") or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to run the reader as an unprivileged user")
    base = Path(tempfile.mkdtemp(prefix="itera-powercap-"))
    try:
        os.chmod(base, 0o755)
        root = make_tree(base, {"intel-rapl:0": {"name": "package-0"}})
        for dirpath, dirnames, _ in os.walk(base):
            os.chmod(dirpath, 0o755)
        counter = root / "intel-rapl:0" / "energy_uj"
        os.chmod(counter.resolve(), 0o400)  # what Linux >= 5.10 does to energy_uj
        os.chmod((root / "intel-rapl:0" / "name").resolve(), 0o444)
        os.chmod((root / "intel-rapl:0" / "max_energy_range_uj").resolve(), 0o444)
        code = ("import sys\nfrom itera_bench.powercap import PowercapError, PowercapMeter\n"
                f"try:\n    PowercapMeter({str(root)!r})\nexcept PowercapError as e:\n    print(e)\n    sys.exit(3)\n")
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                               code], capture_output=True, text=True, timeout=60, cwd="/")
        if proc.returncode not in (0, 3):
            pytest.skip(f"an unprivileged user cannot run this checkout here: {proc.stderr.strip()[-200:]}")
        assert proc.returncode == 3
        line = proc.stdout.strip()
        assert "\n" not in line
        assert line == (f"powercap: {counter} is readable only by root since Linux 5.10 (CVE-2020-8694); grant "
                        f"read access with `sudo chmod o+r {root}/*/energy_uj` (until reboot) or the udev rule in "
                        f"bench/ENERGY.md, or run as root")
    finally:
        shutil.rmtree(base)


# --------------------------------------------------------------------------- Raspberry Pi 5

# Pi 5 `vcgencmd pmic_read_adc` output as published by Pi 5 owners (layout, rail set and
# channel numbers as the firmware prints them; not captured on a board of ours). LOADED has
# the cores busy (VDD_CORE 5 A).
PMIC_IDLE = """\
 3V7_WL_SW_A current(0)=0.00195186A
   3V3_SYS_A current(1)=0.12687090A
   1V8_SYS_A current(2)=0.18835450A
  DDR_VDD2_A current(3)=0.02147046A
  DDR_VDDQ_A current(4)=0.00000000A
   1V1_SYS_A current(5)=0.17957110A
    0V8_SW_A current(6)=0.25959740A
  VDD_CORE_A current(7)=0.56259000A
   3V3_DAC_A current(17)=0.00000000A
   3V3_ADC_A current(18)=0.00000000A
   0V8_AON_A current(16)=0.00293040A
      HDMI_A current(22)=0.02551890A
 3V7_WL_SW_V volt(8)=3.70720000V
   3V3_SYS_V volt(9)=3.32580900V
   1V8_SYS_V volt(10)=1.80415000V
  DDR_VDD2_V volt(11)=1.11135400V
  DDR_VDDQ_V volt(12)=0.60329610V
   1V1_SYS_V volt(13)=1.11282000V
    0V8_SW_V volt(14)=0.80512740V
  VDD_CORE_V volt(15)=0.76798460V
   3V3_DAC_V volt(20)=3.32142500V
   3V3_ADC_V volt(21)=3.32966700V
   0V8_AON_V volt(19)=0.80175740V
      HDMI_V volt(23)=5.11746000V
     EXT5V_V volt(24)=5.14158000V
      BATT_V volt(25)=3.28033900V
"""
PMIC_LOADED = """\
 3V7_WL_SW_A current(0)=0.05855580A
   3V3_SYS_A current(1)=0.06148359A
   1V8_SYS_A current(2)=0.13272650A
  DDR_VDD2_A current(3)=0.13955800A
  DDR_VDDQ_A current(4)=0.00980400A
   1V1_SYS_A current(5)=0.19811380A
    0V8_SW_A current(6)=0.34157550A
  VDD_CORE_A current(7)=5.03652000A
   3V3_DAC_A current(17)=0.00006105A
   3V3_ADC_A current(18)=0.00054945A
   0V8_AON_A current(16)=0.00531135A
      HDMI_A current(22)=0.02161170A
 3V7_WL_SW_V volt(8)=3.61069200V
   3V3_SYS_V volt(9)=3.29982600V
   1V8_SYS_V volt(10)=1.81684800V
  DDR_VDD2_V volt(11)=1.10109800V
  DDR_VDDQ_V volt(12)=0.60366240V
   1V1_SYS_V volt(13)=1.10292900V
    0V8_SW_V volt(14)=0.80292960V
  VDD_CORE_V volt(15)=0.89369880V
   3V3_DAC_V volt(20)=3.29944700V
   3V3_ADC_V volt(21)=3.30402600V
   0V8_AON_V volt(19)=0.79618980V
      HDMI_V volt(23)=4.92450000V
     EXT5V_V volt(24)=4.92450000V
      BATT_V volt(25)=0.00341880V
"""
NOT_A_PI5 = 'error=1 error_msg="Command not registered"\n'


def test_pmic_parser_sums_rails_that_have_both():
    rails = parse_pmic_adc(PMIC_LOADED)
    assert len(rails) == 12 and "EXT5V" not in rails and "BATT" not in rails  # volt-only: no power
    assert rails["VDD_CORE"] == (0.89369880, 5.03652000)
    by_hand = (3.61069200 * 0.05855580 + 3.29982600 * 0.06148359 + 1.81684800 * 0.13272650
               + 1.10109800 * 0.13955800 + 0.60366240 * 0.00980400 + 1.10292900 * 0.19811380
               + 0.80292960 * 0.34157550 + 0.89369880 * 5.03652000 + 3.29944700 * 0.00006105
               + 3.30402600 * 0.00054945 + 0.79618980 * 0.00531135 + 4.92450000 * 0.02161170)
    assert rail_watts(rails) == pytest.approx(by_hand) and 5.9 < by_hand < 6.0
    assert rail_watts(parse_pmic_adc(PMIC_IDLE)) == pytest.approx(1.767, abs=1e-3)
    assert parse_pmic_adc("VDD_CORE_A current(7)=1.42880000A\nVDD_CORE_V volt(15)=0.90659250V\n") == {
        "VDD_CORE": (0.90659250, 1.42880000)}
    assert parse_pmic_adc(NOT_A_PI5) == {}


def test_get_throttled_flags():
    assert parse_throttled("throttled=0x0\n") == {"raw": "0x0", "flags": []}
    assert parse_throttled("throttled=0x50005\n")["flags"] == [
        "under-voltage", "throttled", "under-voltage has occurred", "throttling has occurred"]
    with pytest.raises(PmicError):
        parse_throttled("nonsense")


def fake_vcgencmd(tmp_path: Path, outputs: list[str], throttled: str = "throttled=0x0") -> Path:
    """A `vcgencmd` on PATH that prints the recorded outputs in turn (the last one repeats)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for i, text in enumerate(outputs):
        (bindir / f"pmic{i}.txt").write_text(text)
    script = bindir / "vcgencmd"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        # Replays recorded Raspberry Pi 5 output, one file per call.
        here=$(dirname "$0")
        case "$1" in
          get_throttled) echo "{throttled}" ;;
          pmic_read_adc)
            n=$(cat "$here/calls" 2>/dev/null | wc -l)
            echo call >> "$here/calls"
            f="$here/pmic$n.txt"
            [ -f "$f" ] || f="$here/pmic{len(outputs) - 1}.txt"
            cat "$f" ;;
          *) echo "error=2 error_msg=\\"Command not registered\\""; exit 255 ;;
        esac
        """))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bindir


def test_pmic_sampling_loop_integrates_recorded_output(tmp_path, monkeypatch):
    bindir = fake_vcgencmd(tmp_path, [PMIC_IDLE])
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    meter = PmicBackend(EnergyOptions(backend="pi5-pmic", interval_s=0.02))
    try:
        meter.begin()
        time.sleep(0.4)
        w = meter.end()
    finally:
        meter.close()
    samples = meter.meter.samples
    idle_w = rail_watts(parse_pmic_adc(PMIC_IDLE))
    t0, t1 = meter.span
    assert 0.4 <= t1 - t0 < 1.0
    # the background loop sampled in between (every 20 ms when idle; a loaded machine runs it less)
    assert len([s for s in samples if t0 <= s[0] <= t1]) >= 2
    assert any(s[0] < t0 for s in samples) and any(s[0] > t1 for s in samples)
    assert w.total_j == pytest.approx(idle_w * (t1 - t0), rel=1e-6)
    assert meter.info()["energy_source"] == "PMIC rails" and meter.label == "PMIC rails"
    assert meter.throttled_before == {"raw": "0x0", "flags": []} and meter.throttled_after["raw"] == "0x0"
    calls = len((bindir / "calls").read_text().splitlines())
    assert calls == len(samples) + 1  # one pmic_read_adc per sample, and one to find the rails


def test_pmic_trapezoid_between_idle_and_load():
    meter = PmicMeter.__new__(PmicMeter)  # the integrator alone, on recorded power samples
    meter.samples, meter._lock = [(0.0, 1.0), (1.0, 3.0), (2.0, 3.0), (5.0, 0.0)], threading.Lock()
    assert meter.joules(0.0, 2.0) == pytest.approx(2.0 + 3.0)
    assert meter.joules(1.0, 5.0) == pytest.approx(3.0 + 4.5)
    assert meter.joules(0.5, 1.5) == pytest.approx(0.5 * (2.0 + 3.0) / 2 + 0.5 * 3.0)  # ends interpolated
    assert meter.joules(-1.0, 9.0) == pytest.approx(2.0 + 3.0 + 4.5)  # no samples, no energy made up


def test_pmic_refusals(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(PmicError, match="vcgencmd not found on PATH"):
        PmicMeter()
    bindir = fake_vcgencmd(tmp_path, [NOT_A_PI5])
    monkeypatch.setenv("PATH", str(bindir) + os.pathsep + "/usr/bin:/bin")
    with pytest.raises(PmicError, match=r"failed.*Command not registered"):
        PmicMeter()


# --------------------------------------------------------------------------- perf

PERF_CSV_VM = "0.00,Joules,power/energy-psys/,513911528,100.00,,\n"  # this VM: psys exists, reads 0
PERF_CSV = ("Events disabled\nEvents enabled\n12.34,Joules,power/energy-pkg/,2001538225,100.00,,\n"
            "1.50,Joules,power/energy-ram/,2001538225,100.00,,\nEvents disabled\n")
PERF_TABLE = """
 Performance counter stats for 'system wide':

             8.45 Joules power/energy-pkg/
         1,203.50 Joules power/energy-psys/

       1.001538225 seconds time elapsed
"""
PERF_NOT_SUPPORTED = "<not supported>,Joules,power/energy-ram/,0,100.00,,\n"


def test_perf_stat_parser_on_recorded_outputs():
    assert parse_perf_stat(PERF_CSV_VM) == {"power/energy-psys/": 0.0}
    assert parse_perf_stat(PERF_CSV) == {"power/energy-pkg/": 12.34, "power/energy-ram/": 1.5}
    assert parse_perf_stat(PERF_TABLE) == {"power/energy-pkg/": 8.45, "power/energy-psys/": 1203.5}
    with pytest.raises(PerfError, match="power/energy-ram/ not supported"):
        parse_perf_stat(PERF_NOT_SUPPORTED)


def _perf_has(event: str) -> bool:
    return bool(shutil.which("perf")) and os.path.exists(f"/sys/bus/event_source/devices/power/events/{event}")


@pytest.mark.skipif(not _perf_has("energy-psys"), reason="needs perf and a RAPL psys event")
def test_real_perf_window_and_a_counter_that_does_not_advance():
    meter = PerfMeter(("psys",))
    meter.begin()
    time.sleep(0.2)
    joules = meter.end()
    # 0.2 s of a whole platform: at most ~200 J even at 1 kW; negative means a wrapped counter misread
    assert set(joules) == {"psys"} and 0 <= joules["psys"] < 200
    if joules["psys"] == 0:  # a VM exposes psys without the energy: not a measurement
        with pytest.raises(EnergyUnavailable, match="did not advance"):
            open_meter(EnergyOptions(backend="perf", domains=("psys",)))


@pytest.mark.skipif(not shutil.which("perf") or _perf_has("energy-pkg"), reason="needs perf without energy-pkg")
def test_real_perf_unknown_event_is_named():
    with pytest.raises(PerfError, match=r"event power/energy-pkg/ is unknown to this kernel"):
        PerfMeter(("package",)).begin()


# --------------------------------------------------------------------------- end to end

FAST = ("-p", "8", "-n", "8", "-r", "2", "--min-time", "0.2", "--idle", "0.3", "-o", "json")


@pytest.mark.skipif(os.path.exists("/sys/class/powercap"), reason="this machine has powercap")
def test_no_counter_here_reports_cpu_time_and_the_reason(tiny_itera, tiny_baseline):
    proc = bench("energy", tiny_itera.bundle, tiny_baseline.bundle, *FAST, "--estimate")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    note = [line for line in proc.stderr.splitlines() if line.startswith("energy: not")]  # beside tqdm's
    assert len(note) == 1 and note[0].startswith("energy: not measurable here: powercap: /sys/class/powercap "
                                                 "does not exist")
    assert "pi5-pmic:" in note[0] and "perf:" in note[0]
    cpu = [r for r in rows if r["metric"] == "cpu_ms_per_token"]
    est = [r for r in rows if r["metric"] == "joules_per_token"]
    assert [(r["family"], r["test"]) for r in cpu] == [(f, t) for f in ("itera", "baseline") for t in ("pp8", "tg8")]
    assert len(rows) == 8 and len(est) == 4
    for r in cpu:
        assert r["unit"] == "CPU time ms/token" and not r["estimated"] and r["median"] > 0
        assert r["extra"]["energy"] == note[0].removeprefix("energy: ")
        assert r["extra"]["window_s"] >= 0.2 and r["extra"]["tokens_per_window"] >= 8
    for r, c in zip(est, cpu):
        assert r["estimated"] is True and "assumed TDP per core" in r["method"] and r["test"] == c["test"]
        assert r["samples"] == pytest.approx([ms / 1e3 * 10.0 for ms in c["samples"]])
    md = format_records(parse(proc.stdout, "json"), "md")
    assert md.count("(est.)") >= 5  # the unit in the header and every estimated value
    assert "cpu_ms_per_token (CPU time ms/token" in md


def test_explicit_backend_that_cannot_measure_is_one_error_line(tiny_itera, tmp_path):
    line = one_error_line(bench("energy", tiny_itera.bundle, *FAST, "--energy-backend", "powercap",
                                "--powercap-root", tmp_path / "none"))
    assert line == (f"error: energy: --energy-backend powercap cannot measure here: powercap: {tmp_path / 'none'} "
                    f"does not exist (no powercap/RAPL driver loaded, or a virtual machine that exposes none)")
    env = {**os.environ, "PATH": str(tmp_path / "empty") + os.pathsep + os.path.dirname(sys.executable)}
    line = one_error_line(bench("energy", tiny_itera.bundle, *FAST, "--energy-backend", "pi5-pmic", env=env))
    assert "--energy-backend pi5-pmic cannot measure here: pi5-pmic: vcgencmd not found on PATH" in line
    line = one_error_line(bench("energy", tiny_itera.bundle, *FAST, "--energy-backend", "perf", env=env))
    assert "--energy-backend perf cannot measure here: perf: perf not found on PATH" in line
    line = one_error_line(bench("energy", tiny_itera.bundle, *FAST, "--energy-backend", "pyrapl"))
    assert line.startswith("error: energy: --energy-backend pyrapl cannot measure here: pyrapl: ")


@pytest.mark.slow
def test_powercap_end_to_end_at_a_known_power(tiny_itera, tmp_path):
    """A fixture package counter that runs at 5 W and wraps every 3 s: the bench must see 5 W.

    The counter is written by a thread of this process every 5 ms; on a loaded machine it lags
    the bench's clock by tens of ms, so windows last 1 s and the tolerance is 25 %."""
    root = make_tree(tmp_path, {"intel-rapl:0": {"name": "package-0", "max_energy_range_uj": 15_000_000,
                                                 "max_power_uw": 10_000_000}})
    counter, watts, stop = root / "intel-rapl:0" / "energy_uj", 5.0, threading.Event()

    def run_counter():
        t0 = time.monotonic()
        while not stop.wait(0.005):
            write_atomic(counter, f"{int((time.monotonic() - t0) * watts * 1e6) % 15_000_000}\n")

    writer = threading.Thread(target=run_counter, daemon=True)
    writer.start()
    try:
        proc = bench("energy", tiny_itera.bundle, "-p", "8", "-n", "8", "-r", "2", "--min-time", "1", "--idle", "1",
                     "-o", "json", "--energy-backend", "powercap", "--energy-domains", "package",
                     "--powercap-root", root)
    finally:
        stop.set()
        writer.join()
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    assert [(r["test"], r["metric"]) for r in rows] == [
        (t, m) for t in ("pp8", "tg8") for m in ("joules_per_token", "joules_per_token_net", "cpu_ms_per_token")]
    for r in rows:
        assert not r["estimated"] and r["kind"] == "energy" and r["repetitions"] == 2
    for r in (r for r in rows if r["metric"] == "joules_per_token"):
        x = r["extra"]
        assert r["unit"] == "J/token, powercap package" and r["higher_is_better"] is False
        assert x["energy_backend"] == "powercap" and x["energy_domains"] == ["package"]
        assert x["energy_source"] == f"Linux powercap (intel-rapl) at {root}"
        assert x["sampling_interval_s"] == pytest.approx(0.375)  # a quarter of the 1.5 s wrap at 10 W
        assert x["zones"] == {"intel-rapl:0": "package-0"}
        assert x["avg_watts"] == pytest.approx(watts, rel=0.25)
        assert x["idle_watts"] == pytest.approx(watts, rel=0.25)
        assert x["idle_watts_before"] > 0 and x["idle_watts_after"] > 0 and x["idle_s"] == 1
        assert 1 / r["max"] <= x["tokens_per_joule"] <= 1 / r["min"]
        net = next(n for n in rows if n["metric"] == "joules_per_token_net" and n["test"] == r["test"])
        # The counter runs at the same power idle or busy: little is left above idle.
        assert abs(net["median"]) < 0.5 * r["median"]
        assert net["unit"] == "J/token above idle, powercap package"
    md = format_records(parse(proc.stdout, "json"), "md")
    assert "joules_per_token (J/token, powercap package" in md and "joules_per_token_net" in md


def test_pi5_end_to_end_with_recorded_vcgencmd(tiny_itera, tmp_path):
    bindir = fake_vcgencmd(tmp_path, [PMIC_IDLE] * 3 + [PMIC_LOADED], throttled="throttled=0x50000")
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    proc = bench("energy", tiny_itera.bundle, *FAST, "--energy-backend", "pi5-pmic", "--sample-interval", "0.05",
                 "--no-warmup", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    gross = [r for r in rows if r["metric"] == "joules_per_token"]
    assert len(gross) == 2 and len(rows) == 6
    loaded_w = rail_watts(parse_pmic_adc(PMIC_LOADED))
    for r in gross:
        x = r["extra"]
        assert r["unit"] == "J/token, PMIC rails" and x["energy_source"] == "PMIC rails"
        assert x["sampling_interval_s"] == 0.05 and "5 V input" in x["misses"]
        assert x["throttled_before"]["flags"] == ["under-voltage has occurred", "throttling has occurred"]
        assert x["throttled_after"]["raw"] == "0x50000"
        assert x["avg_watts"] == pytest.approx(loaded_w, rel=1e-3)  # the idle file ran out before the sweep
    md = format_records(parse(proc.stdout, "json"), "md")
    assert "J/token, PMIC rails" in md


def test_backend_none_measures_cpu_time_only(tiny_itera):
    proc = bench("energy", tiny_itera.bundle, "-p", "0", "-n", "4", "-r", "1", "--min-time", "0.05", "--no-warmup",
                 "-o", "jsonl", "--energy-backend", "none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = parse(proc.stdout, "jsonl")
    assert (row.test, row.metric, row.unit) == ("tg4", "cpu_ms_per_token", "CPU time ms/token")
    assert row.extra["energy"] == "not measurable here: --energy-backend none" and row.median > 0
