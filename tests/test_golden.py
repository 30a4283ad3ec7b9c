"""Committed bundles give committed text (llama2.c's golden-output test): no torch involved.

tests/data/golden-{itera,baseline} were made by tests/data/make_golden.py; golden.json holds
the greedy continuation the runtime produced then. A change to the runtime, the bundle loader
or the sampler that alters what users get fails here, on every graph set the bundle has.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from itera_runtime.bundle import load_bundle
from itera_runtime.generate import Generator
from itera_runtime.sampling import SamplingConfig

DATA = Path(__file__).resolve().parent / "data"
GOLDEN = json.loads((DATA / "golden.json").read_text())


@pytest.mark.parametrize("family", sorted(GOLDEN))
def test_committed_bundle_greedy_text_is_the_committed_text_on_every_graph_set(family):
    case = GOLDEN[family]
    bundle = load_bundle(DATA / f"golden-{family}")
    assert bundle.family == family
    sets = list(bundle.manifest.graph_sets())
    for graph_set in sets:
        gen = Generator(bundle, threads=1, graph_set=graph_set)
        text = gen.generate(case["prompt"], case["max_new_tokens"], SamplingConfig(temperature=0)).text
        assert text == case["text"], f"{family} graph set {graph_set}"
