"""Carried state saved and loaded (runtime/statefile.py): continuing from a file gives the text of
re-reading the whole prompt, and a file of another model, a tampered or a foreign file is refused
in one line. The committed golden bundles, so no torch."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from itera_runtime.generate import Generator
from itera_runtime.sampling import SamplingConfig
from itera_runtime.statefile import StateFileError, read_header

DATA = Path(__file__).resolve().parent / "data"
GREEDY = SamplingConfig(temperature=0)
FAMILIES = ["itera", "baseline"]


@pytest.fixture(scope="module")
def generators():
    return {f: Generator(DATA / f"golden-{f}", threads=1) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_state_continues_as_re_reading_the_whole_text_would(generators, family, tmp_path):
    gen = generators[family]
    first = gen.generate("To be, or not", 30, GREEDY, stop=["question"], keep_state=True)
    assert first.finish().stop_reason == "stop_string"  # the state holds the text returned, not the stop string
    path = gen.save_state(first.state, tmp_path / "s.itera-state", meta={"note": "x"})
    assert read_header(path)["position"] == len(("To be, or not" + first.text).encode())
    assert read_header(path)["meta"] == {"note": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["s.itera-state"]  # no temporary file left
    loaded = gen.load_state(path)
    cont = gen.generate("question:\nWhether", 16, GREEDY, state=loaded).text
    whole = gen.generate("To be, or not" + first.text + "question:\nWhether", 16, GREEDY).text
    assert cont == whole and cont
    assert gen.generate("question:\nWhether", 16, GREEDY, state=loaded).text == cont  # not consumed


def test_a_state_of_another_model_is_refused(generators, tmp_path):
    path = generators["itera"].save_state(generators["itera"].generate("To be", 4, GREEDY, keep_state=True).state,
                                          tmp_path / "itera.itera-state")
    with pytest.raises(StateFileError, match="state of another model"):
        generators["baseline"].load_state(path)


@pytest.mark.parametrize("damage", ["not a zip", "no header", "bad shape", "truncated data"])
def test_a_tampered_state_file_is_refused_in_one_line(generators, tmp_path, damage):
    gen = generators["itera"]
    good = gen.save_state(gen.generate("To be", 4, GREEDY, keep_state=True).state, tmp_path / "good")
    bad = tmp_path / "bad"
    if damage == "not a zip":
        bad.write_bytes(b"\x80\x04pickle? no")
    else:
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
            for info in src.infolist():
                data = src.read(info)
                if info.filename == "header.json" and damage == "no header":
                    continue
                if info.filename == "0.npy" and damage == "bad shape":
                    data = data.replace(b"(1, 160, 3)", b"(1, 999, 3)")
                if info.filename == "0.npy" and damage == "truncated data":
                    data = data[:-8]
                dst.writestr(info, data)
    with pytest.raises(StateFileError) as info:
        gen.load_state(bad)
    assert "\n" not in str(info.value) and str(bad) in str(info.value)


def test_itera_run_state_carries_a_text_across_processes(tmp_path):
    bundle = str(DATA / "golden-itera")
    state = tmp_path / "chat.itera-state"

    def run(prompt: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "itera_runtime.cli", bundle, "-p", prompt, "-n", "12",
                               "--temperature", "0", "--threads", "1", "--json", *extra],
                              capture_output=True, text=True, timeout=120)

    one = json.loads(run("To be, or not", "--state", str(state)).stdout)
    two = json.loads(run("\nWhether", "--state", str(state)).stdout)
    assert two["continued_after_tokens"] == len(("To be, or not" + one["text"]).encode())
    whole = json.loads(run("To be, or not" + one["text"] + "\nWhether").stdout)
    assert two["text"] == whole["text"]
    (tmp_path / "notes.txt").write_text("mine")
    refused = run("x", "--state", str(tmp_path / "notes.txt"))
    assert refused.returncode == 1 and refused.stderr.startswith("error: ") and "not an itera state file" in refused.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"  # not overwritten


def test_interactive_itera_run_keeps_the_state_across_turns(generators):
    gen = generators["itera"]
    run = subprocess.run([sys.executable, "-m", "itera_runtime.cli", str(DATA / "golden-itera"), "--interactive",
                          "-n", "10", "--temperature", "0", "--threads", "1", "--json"],
                         input="To be, or not\nWhether\n/reset\nTo be, or not\n", capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    turns = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    assert [t["continued_after_tokens"] for t in turns] == [0, 23, 0]
    whole = gen.generate("To be, or not" + turns[0]["text"] + "\nWhether", 10, GREEDY).text
    assert turns[1]["prompt"] == "\nWhether" and turns[1]["text"] == whole
    assert turns[2]["text"] == turns[0]["text"]  # /reset started afresh


def test_the_session_store_keeps_sessions_under_its_byte_bound_least_recently_used_first(generators, tmp_path):
    from itera_runtime.serve_sessions import SessionStore

    gen = generators["itera"]
    state = gen.generate("To be", 4, GREEDY, keep_state=True).state
    store = SessionStore(max_sessions=100, max_bytes=int(2.5 * state.nbytes), directory=tmp_path)
    for sid in ("a", "b", "a", "c"):  # b is the least recently used when c arrives
        assert store.checkout(sid, gen.bundle.sha256, "m") is None or sid == "a"
        assert store.checkin(store.new_session(sid, gen.bundle.sha256, state, "To be"), gen)
    assert len(store) == 2 and store.bytes <= store.max_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.itera-state", "c.itera-state"]
    # a session larger than the whole bound is not kept (and nothing else is evicted for it)
    big = generators["baseline"].generate("To be, or not to be" * 10, 4, GREEDY, keep_state=True).state
    assert big.nbytes > store.max_bytes
    store.checkout("d", generators["baseline"].bundle.sha256, "m")
    assert not store.checkin(store.new_session("d", generators["baseline"].bundle.sha256, big, "x"), generators["baseline"])
    assert len(store) == 2 and store.stats()["busy"] == 0
    # what a restarted server reads back: the same two sessions, continuing where they were
    again = SessionStore(max_sessions=100, max_bytes=store.max_bytes, directory=tmp_path)
    assert again.restore({gen.bundle.sha256: gen}) == (2, [])
    a = again.checkout("a", gen.bundle.sha256, "m")
    assert a.continues("To be, or") and not a.continues("To be") and not a.continues("Not to be")


def test_the_session_store_never_overwrites_a_file_it_cannot_read(generators, tmp_path):
    from itera_runtime.serve_api import ApiError
    from itera_runtime.serve_sessions import SessionStore

    gen = generators["itera"]
    (tmp_path / "notes.itera-state").write_text("mine")
    store = SessionStore(max_sessions=10, max_bytes=1 << 30, directory=tmp_path)
    loaded, skipped = store.restore({gen.bundle.sha256: gen})
    assert loaded == 0 and len(skipped) == 1 and "not an itera state file" in skipped[0]
    with pytest.raises(ApiError) as info:
        store.checkout("notes", gen.bundle.sha256, "m")
    assert info.value.status == 409 and info.value.code == "session_unreadable"
    assert (tmp_path / "notes.itera-state").read_text() == "mine"
