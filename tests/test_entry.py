"""On a base install (no torch) the torch-needing commands fail in one clear line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("entry,command", [("train", "itera-train"), ("export", "itera-export"),
                                           ("pipeline", "itera-pipeline")])
def test_train_extra_missing_is_one_line(tmp_path, entry, command):
    blocker = tmp_path / "torch"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('torch is blocked for this test')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", f"from itera_lite.entry import {entry}; {entry}()"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {command} needs the train extra (torch): pip install 'itera-lite[train]'"]
