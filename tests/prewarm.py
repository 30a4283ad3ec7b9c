"""Trace the tests' tiny Itera-Lite model into a trace folder, in the background of a parallel run.

`python tests/prewarm.py DIR`: started by the conftest's xdist controller at session start, so
the one trace most tests need (about 45 s on 2 cores) runs while the workers collect and run
the tests that need none; the workers' exports then read it (export/tracecache.py).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(folder: str) -> None:
    import torch

    torch.set_num_threads(1)
    from tinymodel import tiny_model

    from itera_export.itera import trace_ahead
    from itera_export.tracecache import use_trace_dir

    use_trace_dir(Path(folder))
    trace_ahead(tiny_model("itera"))


if __name__ == "__main__":
    main(sys.argv[1])
