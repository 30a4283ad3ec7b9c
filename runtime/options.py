"""onnxruntime session options, devices and thread settings: one place for every session made.

Every onnxruntime session of the project (runtime, bench, export validation, tests) is made
by `make_session` with `session_options`: what users run is what benchmarks time.
"""

from __future__ import annotations

import ctypes
import os

import onnxruntime as ort
from .errors import UsageError, UserError

# User-facing device names → onnxruntime execution providers.
DEVICES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}


class DeviceError(UserError):
    """An execution provider this onnxruntime does not have; one line."""


def providers_for(device: str) -> list[str]:
    """Execution providers for a device name, CPU last as onnxruntime's own fallback."""
    available = ort.get_available_providers()
    provider = DEVICES.get(device)
    if provider is None or provider not in available:
        names = sorted(d for d, p in DEVICES.items() if p in available)
        raise DeviceError(f"device {device!r} is not available in this onnxruntime; available: {', '.join(names)}")
    return [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]


def check_threads(threads: int | None) -> int | None:
    """Validate a user's thread count: None (onnxruntime decides) or 1..CPUs of this machine.

    More intra-op threads than CPUs only makes them wait for each other (1000 threads ran
    4x slower than 1); a benchmark row claiming them would describe a machine we are not on.
    """
    if threads is None:
        return None
    if isinstance(threads, bool) or int(threads) != threads or threads < 1:
        raise UsageError(f"threads must be an integer >= 1, got {threads!r}")
    cpus = os.cpu_count() or 1
    if threads > cpus:
        raise UsageError(f"{threads} threads requested but this machine has {cpus} CPUs; use at most {cpus}")
    return int(threads)


# Extra onnxruntime session config entries for every session this process makes:
# "KEY=VALUE;KEY=VALUE" with onnxruntime's own keys ("session.intra_op.allow_spinning=1").
# It lets anyone measure thread-pool settings on their own device with itera-bench; every
# bench row records the settings it ran with (`thread_settings`), this variable included.
ORT_CONFIG_ENV = "ITERA_ORT_CONFIG"
_EXECUTION_MODES = {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL, "parallel": ort.ExecutionMode.ORT_PARALLEL}


def _env_config() -> dict[str, str]:
    text = os.environ.get(ORT_CONFIG_ENV, "").strip()
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().startswith("session.") or not value.strip():
            raise UsageError(f"${ORT_CONFIG_ENV}: {item!r} is not KEY=VALUE with an onnxruntime "
                             f"session config key (session.…)")
        out[key.strip()] = value.strip()
    return out


def thread_settings(threads: int | None) -> dict[str, str]:
    """The thread-pool settings a session at `threads` runs with, as bench rows record them.

    Measured on a shared 2-vCPU Xeon (bench/PROFILE.md): at 2 threads, spinning idle threads
    cost 3-4x the CPU per token and ran 8-9x slower there (the spinning thread and the caller
    fight other processes for two cores), so 2-thread sessions sleep between parallel
    sections; dynamic_block_base, force_spinning_stop and worker affinity changed nothing
    beyond the noise. $ITERA_ORT_CONFIG adds or overrides session.* entries.
    """
    threads = check_threads(threads)
    settings = {"execution_mode": "sequential", "inter_op_num_threads": "1"}
    if threads:
        settings["intra_op_num_threads"] = str(threads)
        settings["session.intra_op.allow_spinning"] = "0" if threads > 1 else "1"
    settings.update(_env_config())
    return settings


def session_options(threads: int | None, optimized_model_path: str | None = None,
                    profile_prefix: str | None = None) -> ort.SessionOptions:
    """The one set of onnxruntime session options: what users run is what benchmarks time."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    settings = thread_settings(threads)
    opts.execution_mode = _EXECUTION_MODES[settings["execution_mode"]]
    opts.inter_op_num_threads = int(settings["inter_op_num_threads"])
    if "intra_op_num_threads" in settings:
        opts.intra_op_num_threads = int(settings["intra_op_num_threads"])
    for key, value in settings.items():
        if key.startswith("session."):
            opts.add_session_config_entry(key, value)
    if optimized_model_path:
        opts.optimized_model_filepath = str(optimized_model_path)
    if profile_prefix:  # onnxruntime's own per-node profiler (itera-bench profile)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    opts.log_severity_level = 3
    return opts


def _malloc_trim():
    """glibc's malloc_trim from the symbols already loaded, or None (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def make_session(model: str | os.PathLike | bytes, threads: int | None = None, device: str = "cpu",
                 optimized_model_path: str | None = None, profile_prefix: str | None = None) -> ort.InferenceSession:
    """An InferenceSession for a graph file (or serialized bytes) with the project's options.

    onnxruntime folds constant subgraphs at load (a prompt graph's routed experts reorder their
    weights that way, export/route_experts.py) and frees the intermediates, which glibc keeps as
    resident memory (6 layers of int8 experts, 4.7 MB: +40 MB after load, +20 MB trimmed; bench/PROFILE.md). Handing the free heap back to the
    OS after each load (malloc_trim, where the C library has it) leaves the session's own memory.
    """
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, session_options(threads, optimized_model_path, profile_prefix),
                                   providers=providers_for(device))
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
    return session
