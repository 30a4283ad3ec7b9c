"""itera-export --format hf: the checkpoint as a transformers folder that loads with no custom code."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = "To be, or not to be"


@pytest.fixture(scope="module")
def folders(tiny_itera, tiny_baseline, tmp_path_factory):
    from itera_export.hf_folder import export_hf

    root = tmp_path_factory.mktemp("hf")
    run = root / "run"  # a training run's folder: the card takes bits/byte from its summary.json
    run.mkdir()
    shutil.copy(tiny_itera.checkpoint, run / "best.pt")
    (run / "summary.json").write_text(json.dumps({"data": "shakespeare", "best": {"val_bpb": 2.345678,
                                                                                  "test_bpb": 2.456789}}))
    return {"itera": export_hf(run / "best.pt", root / "itera-hf")["path"],
            "baseline": export_hf(tiny_baseline.checkpoint, root / "baseline-hf")["path"]}


def _ours(ckpt):
    from itera_lite.checkpoint import load_model

    return load_model(ckpt)[0].eval()


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_itera_folder_loads_with_auto_classes(folders, tiny_itera):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from itera_lite.checkpoint import load_checkpoint

    path = folders["itera"]
    cfg = json.loads(open(f"{path}/config.json").read())
    assert cfg["architectures"] == ["GraniteMoeHybridForCausalLM"] and "auto_map" not in cfg
    assert cfg["shared_intermediate_size"] == 0 and cfg["position_embedding_type"] == "nope"
    assert all(cfg[k] == 1.0 for k in ("embedding_multiplier", "residual_multiplier", "attention_multiplier",
                                       "logits_scaling"))
    n_layers = load_checkpoint(tiny_itera.checkpoint)["model_config"]["n_layers"]
    assert cfg["layer_types"] == ["mamba"] * n_layers + ["attention"]  # tiny_itera's layers + the inert one
    assert "inert" in cfg["itera_lite"]["note"]
    card = open(f"{path}/README.md").read()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\nlicense: apache-2.0\n")
    assert "datasets:\n- shakespeare\n" in card and "inert attention layer" in card
    assert "| 2.3457 |" in card and "| 2.4568 |" in card  # from the run's summary.json, nothing invented
    assert "bits/byte | not known" in open(f"{folders['baseline']}/README.md").read()  # no summary beside it
    tok = AutoTokenizer.from_pretrained(path)
    ours = Tokenizer.from_str(load_checkpoint(tiny_itera.checkpoint)["tokenizer_json"])
    assert tok(PROMPT).input_ids == ours.encode(PROMPT).ids
    assert tok.decode(tok(PROMPT).input_ids) == PROMPT
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(hf).__name__ == "GraniteMoeHybridForCausalLM"
    model = _ours(tiny_itera.checkpoint)
    ids = torch.tensor([tok(PROMPT * 3).input_ids])
    with torch.no_grad():
        assert _rel(hf(ids).logits, model(ids).logits) < 1e-5


def test_itera_generate_with_cache_matches_our_decode(folders, tiny_itera):
    """transformers' recurrent path (generate with its cache) gives our logits, and greedy tokens equal
    the bundle's greedy decode in our runtime on the same checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from itera_runtime.generate import Generator
    from itera_runtime.sampling import SamplingConfig

    path = folders["itera"]
    tok, hf = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = tok(PROMPT).input_ids
    n = 24
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, use_cache=True,
                          return_dict_in_generate=True, output_logits=True)
    new = out.sequences[0, len(prompt):].tolist()
    step_logits = torch.stack(out.logits, dim=1)[0]  # (n, V): one per cached step
    model = _ours(tiny_itera.checkpoint)
    with torch.no_grad():
        want = model(out.sequences[:, :-1]).logits[0, len(prompt) - 1:]
    assert _rel(step_logits, want) < 1e-5
    runtime = Generator(tiny_itera.bundle, threads=1).generate_ids(prompt, n, SamplingConfig(temperature=0))
    assert new == runtime


def test_baseline_folder_is_llama(folders, tiny_baseline):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(folders["baseline"]).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([AutoTokenizer.from_pretrained(folders["baseline"])(PROMPT).input_ids])
    with torch.no_grad():
        assert _rel(hf(ids).logits, _ours(tiny_baseline.checkpoint)(ids).logits) < 1e-5


def test_inexpressible_config_refused_and_nothing_written(tmp_path, tiny_itera):
    from clirun import invoke

    from itera_export.cli import main
    from itera_lite.checkpoint import load_checkpoint, save_checkpoint
    from itera_lite.models import build_model, make_config
    from itera_lite.models.config import config_to_dict

    cfg = make_config("itera", "tiny", vocab_size=256, n_layers=1, n_groups=2)
    ckpt = tmp_path / "groups.pt"
    save_checkpoint(ckpt, {"model_config": config_to_dict(cfg), "model": build_model(cfg).state_dict(),
                           "tokenizer_json": load_checkpoint(tiny_itera.checkpoint)["tokenizer_json"]})
    for fmt in ("hf", "gguf"):
        r = invoke(main, ckpt, "--format", fmt, "-o", tmp_path / f"out-{fmt}")
        assert r.returncode == 1 and r.stderr.startswith("error: n_groups = 2") and len(r.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["groups.pt"]
