"""Shared fixtures: tiny untrained bundles of both families for the runtime tests.

Built once per test process (each xdist worker) from a random-init model (no training: the
runtime only has to reproduce torch, not write Shakespeare) with a byte-level vocab of 256, so
every token is one byte and multi-byte characters are always split across tokens. The exports
read one trace the whole run shares (tests/prewarm.py, export/tracecache.py).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tinymodel import TINY_VOCAB, tiny_model

HERE = Path(__file__).parent
# Tests that need the tiny Itera-Lite trace or its kernels (tests/prewarm.py): a parallel run sends them last.
TRACED_FIXTURES = ("tiny_itera", "tiny_itera_int8", "tiny_itera_int4", "tiny_itera_exports", "tiny_bundle",
                   "retrieval_bundle", "cli_export")


def _xdist_controller(config) -> bool:
    return config.pluginmanager.hasplugin("dsession") and not hasattr(config, "workerinput")


def _can_export() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "onnx", "onnxscript"))


def trace_folder_of(config) -> Path:
    """Where this run keeps traces (export/tracecache.py): pytest's cache folder, so the next
    run of the edit-test loop reads them (an entry names the model and the exporter's and models'
    source, so an edit there traces again); without the cache plugin, this run's temp folder."""
    if getattr(config, "cache", None) is not None:
        return config.cache.mkdir("itera-traces")
    base = config._tmp_path_factory.getbasetemp()
    return (base.parent if hasattr(config, "workerinput") else base) / "itera-traces"  # a worker's is /popen-gwN


KEEP_TRACES = 32  # entries (a model's graphs, a set of kernels); older ones are deleted at the start of a run


def pytest_sessionstart(session):
    """In a parallel run (`-n`, the default), trace the tiny Itera-Lite model in the background
    while the workers start, collect and run the tests that need no trace (sent first, below)."""
    config = session.config
    if hasattr(config, "workerinput") or not _can_export():
        return
    folder = trace_folder_of(config)
    folder.mkdir(parents=True, exist_ok=True)
    from itera_export.tracecache import drop_old_entries

    drop_old_entries(folder, KEEP_TRACES)
    if not _xdist_controller(config):
        return
    log = open(config._tmp_path_factory.getbasetemp() / "prewarm.log", "w")
    config._itera_prewarm = subprocess.Popen([sys.executable, str(HERE / "prewarm.py"), str(folder)],
                                             stdout=log, stderr=subprocess.STDOUT, cwd=HERE)
    log.close()


def pytest_sessionfinish(session):
    proc = getattr(session.config, "_itera_prewarm", None)
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def pytest_collection_modifyitems(config, items):
    """In a parallel worker, tests that need the trace run after those that do not (a stable sort:
    modules stay together), so the prewarm's trace is ready by the time they start."""
    if hasattr(config, "workerinput"):
        items.sort(key=lambda item: any(f in item.fixturenames for f in TRACED_FIXTURES)
                   or item.path.name == "test_export_itera.py")


@pytest.fixture(scope="session", autouse=True)
def trace_folder(pytestconfig):
    """Every process of the run keeps its exports' traces in one folder (export/itera.py
    tracecache.py): a worker reads the trace the prewarm, another worker or the last run made."""
    if not _can_export():
        yield None
        return
    from itera_export.tracecache import use_trace_dir

    folder = trace_folder_of(pytestconfig)
    use_trace_dir(folder)
    yield folder
    use_trace_dir(None)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tests run torch on one thread: tiny eager ops on a shared 2-core box crawl when OpenMP
    threads spin-wait for each other (model.step ran ~100x slower), and one thread keeps
    reruns bit-exact."""
    try:
        import torch
    except ImportError:  # a base install: nothing to set
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_reaches_children():
    """A shell that starts the suite in the background (`pytest &` without job control) makes
    SIGINT ignored, and every child inherits that: the Ctrl-C tests would signal processes that
    cannot receive it. A handler (unlike SIG_IGN) is reset to the default in each child."""
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@dataclass
class TinyBundle:
    family: str
    checkpoint: Path
    bundle: Path
    log: list[str] = field(default_factory=list)  # the export's progress and warning lines


def _make_tiny_bundle(tmp_path_factory, family: str, quantize: tuple[str, ...] = ()) -> list[TinyBundle]:
    """The tiny checkpoint of `family` exported at fp32, then at each of `quantize` (same checkpoint)."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from itera_export.exporter import export_checkpoint
    from itera_lite.checkpoint import save_checkpoint
    from itera_lite.data import train_tokenizer
    from itera_lite.models.config import config_to_dict

    root = tmp_path_factory.mktemp(f"tiny-{family}")
    model = tiny_model(family)
    cfg = model.config
    tokenizer = train_tokenizer(["To be, or not to be"], TINY_VOCAB)  # 256: bytes, no merges
    ckpt = root / "tiny.pt"
    save_checkpoint(ckpt, {"model_config": config_to_dict(cfg), "model": model.state_dict(),
                           "tokenizer_json": tokenizer.to_str()})
    bundles = []
    for mode in ("none", *quantize):
        log: list[str] = []
        folder = root if mode == "none" else tmp_path_factory.mktemp(f"tiny-{family}-{mode}")
        out, _ = export_checkpoint(ckpt, folder / "bundle", quantize=mode, log=log.append)
        bundles.append(TinyBundle(family, ckpt, out, log))
    return bundles


@pytest.fixture(scope="session")
def tiny_baseline(tmp_path_factory) -> TinyBundle:
    return _make_tiny_bundle(tmp_path_factory, "baseline")[0]


@pytest.fixture(scope="session")
def tiny_itera_exports(tmp_path_factory) -> dict[str, TinyBundle]:
    """The tiny Itera-Lite checkpoint at fp32, int8 and int4, exported back to back: the exporter keeps
    its trace (most of an export's time), so three exports cost about one."""
    return dict(zip(("none", "int8", "int4"), _make_tiny_bundle(tmp_path_factory, "itera", ("int8", "int4"))))


@pytest.fixture(scope="session")
def tiny_itera(tiny_itera_exports) -> TinyBundle:
    return tiny_itera_exports["none"]


@pytest.fixture(scope="session")
def tiny_itera_int8(tiny_itera_exports) -> TinyBundle:
    """tiny_itera's checkpoint exported again with int8 weights: a real fp32 / int8 pair."""
    return tiny_itera_exports["int8"]


@pytest.fixture(scope="session")
def tiny_itera_int4(tiny_itera_exports) -> TinyBundle:
    return tiny_itera_exports["int4"]


@pytest.fixture(scope="session")
def retrieval_bundle(tiny_itera, tmp_path_factory):
    """The tiny checkpoint's datastore over retrieval_data.TEXT (every position), exported into a bundle:
    (datastore folder, bundle folder, the text's ids). Read-only: copy to change."""
    pytest.importorskip("torch")
    from retrieval_data import SEQ, TEXT, text_ids

    from itera_export.exporter import export_checkpoint
    from itera_lite.checkpoint import load_checkpoint
    from itera_lite.retrieval import build_datastore

    root = tmp_path_factory.mktemp("retrieval")
    ids = text_ids(load_checkpoint(tiny_itera.checkpoint)["tokenizer_json"], TEXT)
    store, meta = build_datastore(tiny_itera.checkpoint, root / "datastore", max_entries=None, seq_len=SEQ,
                                  progress=False, texts=(ids, ids[:200]))
    bundle, _ = export_checkpoint(tiny_itera.checkpoint, root / "bundle", retrieval=store)
    return store, bundle, ids


@pytest.fixture(params=["baseline", "itera"])
def tiny_bundle(request) -> TinyBundle:
    """Each family in turn."""
    return request.getfixturevalue(f"tiny_{request.param}")


# --- a real sshd for the device tests (tests/sshd.py; test_devices.py, test_hostile.py) ----------


@pytest.fixture(scope="session")
def ssh_device(tmp_path_factory):
    """One sshd on loopback for the session, its device cache shared (the venv is made once).

    sshd is installed with apt when missing and this is root (tests/sshd.py ensure_sshd);
    where it cannot be had the tests skip with the reason, except under CI, where they fail."""
    from sshd import Sshd, base_dependency_site, ensure_sshd, required

    why = ensure_sshd()
    if why is not None:
        (pytest.fail if required() else pytest.skip)(why)
    root = tmp_path_factory.mktemp("device")
    server = Sshd(root / "sshd", base_dependency_site(root / "site"))
    server.start()
    yield server, root
    server.stop()


@pytest.fixture(scope="session")
def device_env(tmp_path_factory):
    """The local side's environment for device runs: its own config dir, and a cache dir every
    worker of the run shares (the wheel is built once per run; devices/remote.py writes it whole)."""
    root = tmp_path_factory.mktemp("local")
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # a worker's is /popen-gwN
    return {**os.environ, "XDG_CONFIG_HOME": str(root / "config"), "XDG_CACHE_HOME": str(shared / "device-cache")}
