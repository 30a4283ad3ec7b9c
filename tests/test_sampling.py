"""Sampling: each filter on crafted logits, and the Sampler's empirical distribution."""

import numpy as np
import pytest

from itera_runtime.sampling import (
    Sampler,
    SamplingConfig,
    apply_repetition_penalty,
    softmax,
    top_k_filter,
    top_p_filter,
)


def random_logits(seed=0, vocab=64):
    return np.random.default_rng(seed).normal(0, 2, vocab).astype(np.float32)


def test_greedy_is_argmax():
    sampler = Sampler(SamplingConfig(temperature=0))
    for seed in range(20):
        logits = random_logits(seed)
        assert sampler(logits, []) == int(np.argmax(logits))


def test_greedy_handles_neg_inf():
    logits = np.array([-np.inf, 1.0, -np.inf, 3.0, -np.inf])
    assert Sampler(SamplingConfig(temperature=0))(logits, []) == 3


def test_temperature_to_zero_approaches_greedy():
    sampler = Sampler(SamplingConfig(temperature=1e-4, seed=0))
    for seed in range(20):
        logits = random_logits(seed)
        assert sampler(logits, []) == int(np.argmax(logits))


def test_same_seed_same_samples_different_seed_differs():
    logits = random_logits(1, vocab=200) / 4  # flat enough that draws vary
    a, b, c = (Sampler(SamplingConfig(seed=s)) for s in (7, 7, 8))
    seq_a = [a(logits, []) for _ in range(50)]
    seq_b = [b(logits, []) for _ in range(50)]
    seq_c = [c(logits, []) for _ in range(50)]
    assert seq_a == seq_b
    assert seq_a != seq_c
    assert len(set(seq_a)) > 5


def test_top_k_1_is_greedy():
    sampler = Sampler(SamplingConfig(temperature=1.5, top_k=1, seed=0))
    for seed in range(20):
        logits = random_logits(seed)
        assert sampler(logits, []) == int(np.argmax(logits))


def test_top_k_never_picks_outside_top_k():
    vocab, k = 1000, 5
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 0.1, vocab)  # nearly flat: without top-k most mass is outside
    top = rng.choice(vocab, size=k, replace=False)
    logits[top] += 0.5
    sampler = Sampler(SamplingConfig(top_k=k, seed=1))
    picks = {sampler(logits, []) for _ in range(2000)}
    assert picks <= set(top.tolist())
    assert picks == set(top.tolist())  # and all k stay reachable


def test_top_k_filter_keeps_exactly_k():
    logits = np.array([1.0, 5.0, 3.0, -np.inf, 4.0, 2.0])
    out = top_k_filter(logits, 3)
    assert np.flatnonzero(np.isfinite(out)).tolist() == [1, 2, 4]
    assert np.array_equal(top_k_filter(logits, 0), logits)
    assert np.array_equal(top_k_filter(logits, 100), logits)
    assert logits[0] == 1.0  # input untouched


@pytest.mark.parametrize(
    "p, kept",
    [(0.5, [0]), (0.8, [0, 1]), (0.81, [0, 1, 2]), (0.95, [0, 1, 2]), (0.96, [0, 1, 2, 3]),
     (1e-6, [0]), (1.0, [0, 1, 2, 3])],
)
def test_top_p_keeps_expected_nucleus(p, kept):
    probs = np.array([0.15, 0.5, 0.05, 0.3])  # shuffled so order comes from the filter
    order = [1, 3, 0, 2]
    out = top_p_filter(np.log(probs), p)
    assert sorted(np.flatnonzero(np.isfinite(out)).tolist()) == sorted(order[i] for i in kept)


def test_top_p_sampler_stays_in_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    sampler = Sampler(SamplingConfig(top_p=0.8, seed=0))
    picks = [sampler(np.log(probs), []) for _ in range(2000)]
    assert set(picks) == {0, 1}
    # renormalised: 0.5/0.8 = 0.625
    assert abs(np.mean(np.array(picks) == 0) - 0.625) < 0.04


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_frequencies_match_softmax_over_temperature(temperature):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -np.inf])
    expected = softmax(logits / temperature)
    n = 20_000
    sampler = Sampler(SamplingConfig(temperature=temperature, seed=123))
    counts = np.bincount([sampler(logits, []) for _ in range(n)], minlength=len(logits))
    assert counts[-1] == 0  # -inf is never drawn
    live = expected > 0
    chi2 = np.sum((counts[live] - n * expected[live]) ** 2 / (n * expected[live]))
    # 6 degrees of freedom: P(chi2 > 30) ~ 4e-5, while a wrong temperature gives thousands.
    assert chi2 < 30, chi2
    wrong = softmax(logits / (temperature * 1.3))
    chi2_wrong = np.sum((counts[live] - n * wrong[live]) ** 2 / (n * wrong[live]))
    assert chi2_wrong > 100


def test_repetition_penalty_only_touches_seen_ids():
    logits = np.array([2.0, -2.0, 3.0, -1.0, 0.0], dtype=np.float32)
    out = apply_repetition_penalty(logits, [0, 1, 1, 4, 0], 2.0)
    assert out.tolist() == [1.0, -4.0, 3.0, -1.0, 0.0]
    assert logits.tolist() == [2.0, -2.0, 3.0, -1.0, 0.0]  # input untouched
    assert np.array_equal(apply_repetition_penalty(logits, [0, 1], 1.0), logits)
    assert np.array_equal(apply_repetition_penalty(logits, [], 2.0), logits)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        apply_repetition_penalty(logits, [5], 2.0)


def test_repetition_penalty_changes_greedy_choice():
    logits = np.array([3.0, 2.0, 0.0])
    assert Sampler(SamplingConfig(temperature=0, repetition_penalty=2.0))(logits, [0]) == 1
    assert Sampler(SamplingConfig(temperature=0))(logits, [0]) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"top_k": -1},
        {"top_k": 2.5},
        {"top_p": 0.0},
        {"top_p": 1.1},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": -1.0},
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError) as e:
        SamplingConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_all_neg_inf_raises():
    with pytest.raises(ValueError, match="-inf"):
        Sampler(SamplingConfig(seed=0))(np.full(4, -np.inf), [])


def test_topk_topp_temperature_fast_path_matches_reference_filters():
    # The sampler's top-k path works on the k candidates only; its distribution must equal
    # the documented pipeline written with the general filters.
    from itera_runtime.sampling import softmax, top_k_filter, top_p_filter

    logits = np.array([2.0, 1.5, 1.4, 0.3, -0.2, 3.1, 0.9, -1.0, 2.2, 0.0])
    cfg = SamplingConfig(temperature=0.7, top_k=6, top_p=0.8, seed=5)
    expected = softmax(top_p_filter(top_k_filter(logits / cfg.temperature, 6), 0.8))
    sampler = Sampler(cfg)
    n = 20000
    counts = np.bincount([sampler(logits) for _ in range(n)], minlength=logits.size)
    assert set(np.flatnonzero(counts)) == set(np.flatnonzero(expected))
    assert np.abs(counts / n - expected).max() < 0.015
