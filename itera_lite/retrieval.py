"""Build a kNN-LM datastore from a checkpoint's training split (`itera-train retrieval-index`).

Keys are the model's own final hidden states (the final-norm output that feeds the tied
head, `ModelOutput.hidden`) at positions of the training split, values the token that came
next (Khandelwal et al. 2020). The positions are whole windows of `seq_len` tokens, each run
from a fresh state as training ran them, drawn without replacement with a fixed seed until
`max_entries` is reached, so a small store still samples every document.

The mix settings the runtime uses by default (metric, k, λ, temperature) are chosen here on
the validation split, never on test: the model's logits and hidden states of the first
`tune_tokens` validation tokens, the exact search of `itera_runtime.retrieval`, and a grid
scored on the loss at the true next token.

The folder written (atomically) is what `itera-export --retrieval DIR` puts in a bundle:

    keys.npy        float16 (N, D)   no pickle, memory-mappable
    values.npy      int32 (N,)
    datastore.json  format, fingerprints of the tokenizer and weights, settings, tuning
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from itera_runtime.errors import UserError

DATASTORE_FORMAT = "itera-datastore"
DATASTORE_FORMAT_VERSION = 1
META_NAME = "datastore.json"
KEYS_NAME, VALUES_NAME = "keys.npy", "values.npy"
KEY_DTYPE = "float16"
# The tuning grid. Temperatures are multiples of the median nearest-neighbour score
# magnitude, so one grid fits models whose hidden states differ in scale.
GRID_K = (4, 8, 16, 32, 64)
GRID_LAMBDA = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
GRID_T_SCALE = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
METRICS = ("l2", "ip")


class DatastoreError(UserError):
    """A datastore that cannot be built or used; one line for the user."""


def tokenizer_sha256(tokenizer_json: str) -> str:
    """sha256 of the tokenizer file as the exporter writes it (tokenizer.json, UTF-8)."""
    return hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()


@torch.no_grad()
def hidden_states(model, windows: np.ndarray, batch_size: int = 16, progress=None):
    """Windows (W, T) through the model in batches → yields (hidden (b, T, D), logits (b, T, V)) as float32."""
    model.eval()
    for start in range(0, len(windows), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(windows[start:start + batch_size], dtype=np.int64))
        out = model(x)
        if progress is not None:
            progress.update(x.numel())
        yield out.hidden.float().numpy(), out.logits.float().numpy()


def _windows(ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Disjoint windows of seq_len + 1 tokens (inputs and the next token) covering ids, (W, seq_len + 1)."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise DatastoreError(f"only {len(ids)} tokens; a window needs {seq_len + 1}")
    starts = np.arange(n) * seq_len
    return np.asarray(ids, dtype=np.int64)[starts[:, None] + np.arange(seq_len + 1)]


def _log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    top = x.max(axis=1)
    lse = top + np.log(np.exp(x - top[:, None]).sum(axis=1))
    return x[np.arange(len(targets)), targets] - lse


def tune(store, queries: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> dict:
    """The mix settings with the lowest loss on (validation) queries; the grid's results too.

    store: an `itera_runtime.retrieval.Datastore` per metric ({metric: store}).
    """
    logp_model = _log_softmax_at(logits, targets)  # (M,)
    p_model = np.exp(logp_model)
    base = float(-logp_model.mean())
    best = None
    for metric, ds in store.items():
        scores, idx = ds.search(queries, max(GRID_K))  # best first: top-k is a prefix
        hit = ds.values[idx] == targets[:, None]  # (M, kmax)
        scale = float(np.median(np.abs(scores[:, 0]))) or 1.0
        for k in GRID_K:
            s = scores[:, :k].astype(np.float64)
            for ts in GRID_T_SCALE:
                t = ts * scale
                w = np.exp((s - s[:, :1]) / t)
                p_knn = (w * hit[:, :k]).sum(1) / w.sum(1)
                for lam in GRID_LAMBDA:
                    nats = float(-np.log(lam * p_knn + (1 - lam) * p_model).mean())
                    if best is None or nats < best["nats_per_token"]:
                        best = {"metric": metric, "k": k, "lambda": lam, "temperature": t, "nats_per_token": nats}
    return {**best, "nats_per_token_model": base, "tokens": int(len(targets)),
            "grid": {"k": list(GRID_K), "lambda": list(GRID_LAMBDA), "temperature_x_median_score": list(GRID_T_SCALE),
                     "metric": list(store)}}


def default_out(checkpoint: Path) -> Path:
    """runs/x/best.pt → runs/x/datastore."""
    return Path(checkpoint).resolve().parent / "datastore"


def build_datastore(checkpoint, out=None, max_entries: int | None = 100_000, seq_len: int | None = None,
                    tune_tokens: int = 8192, seed: int = 0, force: bool = False, progress: bool = True,
                    log=lambda msg: None, texts: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[Path, dict]:
    """Keys/values from the checkpoint's training split, settings tuned on its val split; (folder, meta).

    texts: (train ids, val ids) to use instead of the checkpoint's prepared data (tests, own text).
    """
    from tqdm import tqdm

    from itera_runtime.retrieval import Datastore

    from .checkpoint import load_model, weights_sha256
    from .data import DataError, prepare_data

    checkpoint = Path(checkpoint)
    model, ckpt = load_model(checkpoint)  # CheckpointError: one line
    if model.config.family != "itera":
        raise DatastoreError(f"{checkpoint}: retrieval is built for Itera-Lite checkpoints, not {model.config.family}")
    if max_entries is not None and max_entries < 1:
        raise DatastoreError(f"--max-entries must be at least 1, got {max_entries}")
    out = Path(out) if out else default_out(checkpoint)
    check_replaceable(out, force)
    train_cfg = ckpt.get("train_config") or {}
    seq_len = seq_len or int(train_cfg.get("seq_len", 256))
    if texts is None:
        spec, vocab = train_cfg.get("data"), train_cfg.get("vocab_size")
        if spec is None or vocab is None:
            raise DatastoreError(f"{checkpoint}: the checkpoint does not record its training data (train_config)")
        try:
            data = prepare_data(spec, vocab, progress=progress)  # the cache training made (rebuilt if gone)
        except DataError as e:
            raise DatastoreError(str(e)) from None
        if data.tokenizer_json != ckpt["tokenizer_json"]:
            raise DatastoreError(f"{checkpoint}: the prepared data's tokenizer is not the checkpoint's "
                                 f"(--data {spec} changed since training?)")
        train_ids, val_ids = data.split("train"), data.split("val")
    else:
        spec = "given ids"
        train_ids, val_ids = texts

    windows = _windows(train_ids, seq_len)
    order = np.random.default_rng(seed).permutation(len(windows))
    n_windows = len(windows) if max_entries is None else min(len(windows), math.ceil(max_entries / seq_len))
    chosen = np.sort(order[:n_windows])
    n_entries = n_windows * seq_len if max_entries is None else min(max_entries, n_windows * seq_len)
    D = model.config.d_model
    keys = np.zeros((n_entries, D), dtype=KEY_DTYPE)
    values = np.zeros(n_entries, dtype=np.int32)
    log(f"keys for {n_entries:,} positions ({n_windows} windows of {seq_len} from {len(windows)} in train)")
    filled = 0
    with tqdm(total=n_windows * seq_len, unit="tok", desc="datastore", file=sys.stderr, leave=False,
              disable=not progress) as bar:
        sel = windows[chosen]
        for hidden, _ in hidden_states(model, sel[:, :-1], progress=bar):
            b = len(hidden)
            nxt = sel[filled // seq_len: filled // seq_len + b, 1:].reshape(-1)
            take = min(len(nxt), n_entries - filled)
            keys[filled:filled + take] = hidden.reshape(-1, D)[:take]
            values[filled:filled + take] = nxt[:take]
            filled += take

    log(f"tuning k, lambda, temperature on {tune_tokens} validation tokens")
    val = np.asarray(val_ids[:tune_tokens + 1], dtype=np.int64)
    vw = _windows(val, min(seq_len, len(val) - 1))
    q, lg = zip(*hidden_states(model, vw[:, :-1]))
    queries, logits = np.concatenate(q).reshape(-1, D), np.concatenate(lg).reshape(-1, model.config.vocab_size)
    targets = vw[:, 1:].reshape(-1)
    keys32 = keys.astype(np.float32)
    tuned = tune({m: Datastore(keys32, values, m) for m in METRICS}, queries, logits, targets)
    meta = {
        "format": DATASTORE_FORMAT, "format_version": DATASTORE_FORMAT_VERSION,
        "n_entries": int(n_entries), "dim": int(D), "key_dtype": KEY_DTYPE, "value_dtype": "int32",
        "metric": tuned["metric"], "k": tuned["k"], "lambda": tuned["lambda"], "temperature": tuned["temperature"],
        "tokenizer_sha256": tokenizer_sha256(ckpt["tokenizer_json"]), "model_sha256": weights_sha256(model),
        "source": {"checkpoint": str(checkpoint), "step": ckpt.get("step"), "data": spec, "split": "train",
                   "seq_len": seq_len, "windows": int(n_windows), "windows_in_split": int(len(windows)),
                   "seed": seed, "tuning": {"split": "val", **tuned}},
    }
    _write(out, keys, values, meta, force)
    return out, meta


def _write(out: Path, keys: np.ndarray, values: np.ndarray, meta: dict, force: bool) -> None:
    """Write the folder beside `out` and rename it into place: never half a datastore.

    meta gets the arrays' sha256 and size ("files"): what says, next time, that they are ours.
    """
    from itera_runtime.bundle import file_entry

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        np.save(tmp / KEYS_NAME, keys, allow_pickle=False)
        np.save(tmp / VALUES_NAME, values, allow_pickle=False)
        meta["files"] = {n: dataclasses.asdict(file_entry(tmp / n)) for n in (KEYS_NAME, VALUES_NAME)}
        (tmp / META_NAME).write_text(json.dumps(meta, indent=1) + "\n")
        os.chmod(tmp, 0o755)
        if out.exists():
            check_replaceable(out, force)  # still ours after the minutes of work
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_datastore(folder, vocab_size: int | None = None):
    """(spec, keys path, values path) of a datastore folder, checked as the runtime checks it; one line if not.

    spec is an `itera_runtime.manifest.Retrieval` built from datastore.json (its settings
    checked); with vocab_size the arrays are loaded and checked too (`load_arrays`), every
    message naming the user's file.
    """
    from itera_runtime.bundle import BundleError
    from itera_runtime.retrieval import datastore_spec, load_arrays

    folder = Path(folder)
    meta_path = folder / META_NAME
    try:
        if meta_path.is_symlink():
            raise DatastoreError(f"{meta_path}: a symbolic link; a datastore's files are its own")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatastoreError(f"{folder}: no {META_NAME}; not a datastore (build one with itera-train "
                             "retrieval-index)") from None
    except (OSError, ValueError, RecursionError) as e:
        raise DatastoreError(f"{meta_path}: unreadable ({' '.join(str(e).split())})") from None
    if not isinstance(meta, dict) or meta.get("format") != DATASTORE_FORMAT:
        raise DatastoreError(f"{meta_path}: not an {DATASTORE_FORMAT} file")
    if meta.get("format_version") != DATASTORE_FORMAT_VERSION:
        raise DatastoreError(f"{meta_path}: datastore format version {meta.get('format_version')} is not "
                             f"{DATASTORE_FORMAT_VERSION}; rebuild it")
    try:
        spec = datastore_spec({**meta, "keys": KEYS_NAME, "values": VALUES_NAME}, str(meta_path))
        if vocab_size is not None:
            load_arrays(folder, spec, vocab_size, str(meta_path))
    except BundleError as e:
        raise DatastoreError(str(e)) from None
    return spec, folder / KEYS_NAME, folder / VALUES_NAME


def check_replaceable(out: Path, force: bool) -> None:
    """Refuse, before any work, an --out that is not a datastore of ours (exactly its three files, as written).

    The arrays must have the sha256 datastore.json pins; a datastore from before the pins must
    at least read as one (of any vocabulary: it may be another model's).
    """
    from itera_runtime.owned import NotOursError, refuse_strays, strays

    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise DatastoreError(f"{out}: exists and is not a datastore folder; refusing to replace it")
    if not any(out.iterdir()):
        return  # an empty folder holds nothing to lose
    try:
        meta = json.loads((out / META_NAME).read_text(encoding="utf-8"))
        pinned = meta.get("files") if isinstance(meta, dict) and isinstance(meta.get("files"), dict) else {}
        read_datastore(out, None if pinned else np.iinfo(np.int64).max)
    except (OSError, ValueError, RecursionError):
        raise DatastoreError(f"{out}: exists and is not a datastore of ours ({out / META_NAME} does not read as "
                             "one); refusing to replace it") from None
    except DatastoreError as e:
        raise DatastoreError(f"{out}: exists and is not a datastore of ours ({e}); refusing to replace it") from None
    expected = {}
    for name in (KEYS_NAME, VALUES_NAME):
        entry = pinned.get(name) if isinstance(pinned.get(name), dict) else {}
        expected[name] = (entry.get("sha256"), entry.get("bytes"))
    try:
        refuse_strays(out, strays(out, expected, ignore=(META_NAME,)), "a datastore")
    except NotOursError as e:
        raise DatastoreError(str(e)) from None
    if not force:
        raise DatastoreError(f"{out}: a datastore is already there; --force replaces it")


def check_fits(spec, model, tokenizer_json: str, where: str) -> None:
    """Refuse, in one line, a datastore (its `Retrieval` spec) made with another tokenizer or other weights."""
    from .checkpoint import weights_sha256

    if spec.tokenizer_sha256 != tokenizer_sha256(tokenizer_json):
        raise DatastoreError(f"{where}: the datastore was built with another tokenizer than this checkpoint's; refused")
    if spec.model_sha256 != weights_sha256(model):
        raise DatastoreError(f"{where}: the datastore was built from other weights than this checkpoint's; refused")
    if spec.dim != model.config.d_model:
        raise DatastoreError(f"{where}: keys have {spec.dim} dims, the model's hidden state "
                             f"{model.config.d_model}; refused")
