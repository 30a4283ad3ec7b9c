"""The tests' tiny random-init models, in one place: the conftest's bundles, test_export_itera and
the trace prewarm (tests/prewarm.py) build the same seed-0 model, so one trace serves them all."""

from __future__ import annotations

TINY_VOCAB = 256
TINY_LAYERS = 2  # the baseline's: two, so the state of more than one layer has to be carried in order
# Itera-Lite keeps its preset's four layers.
LAYERS = {"baseline": TINY_LAYERS, "itera": None}


def tiny_model(family: str):
    """The seed-0 tiny model of `family` (eval mode), byte-level vocab of 256."""
    import torch

    from itera_lite.models import build_model, make_config

    torch.manual_seed(0)
    layers = {} if LAYERS[family] is None else {"n_layers": LAYERS[family]}
    return build_model(make_config(family, "tiny", vocab_size=TINY_VOCAB, **layers)).eval()


def tiny_mamba2_sizes() -> dict:
    """transformers.Mamba2Config sizes equal to the tiny Itera-Lite preset's SSM, so an import of such
    a checkpoint shares the tiny model's traced SSM kernels (export/onnx_functions.py)."""
    from itera_lite.models import make_config

    c = make_config("itera", "tiny", vocab_size=TINY_VOCAB)
    return dict(hidden_size=c.d_model, expand=c.expand, num_heads=c.expand * c.d_model // c.head_dim,
                head_dim=c.head_dim, state_size=c.d_state, n_groups=c.n_groups, conv_kernel=c.d_conv)
