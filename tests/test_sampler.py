import numpy as np
import pytest

from llmc.errors import LlmcError
from llmc.runtime.sampler import Sampler, SamplingParams

LOGITS = np.array([1.0, 3.0, 2.0, 0.5, -1.0, 2.9])


def draws(params, n=2000, history=()):
    sampler = Sampler(params)
    return np.bincount([sampler(LOGITS, history) for _ in range(n)], minlength=LOGITS.size)


def test_greedy_and_repetition_penalty():
    assert Sampler(SamplingParams())(LOGITS) == 1
    # Token 1 seen before: 3.0 / 1.5 = 2.0 falls below token 5's 2.9.
    assert Sampler(SamplingParams(repetition_penalty=1.5))(LOGITS, history=[1, 1]) == 5
    # A negative logit is multiplied: -1.0 * 1.5 = -1.5 falls below -1.2.
    assert Sampler(SamplingParams(repetition_penalty=1.5))(np.array([-1.0, -1.2]), history=[0]) == 1


def test_filters_restrict_the_support():
    assert set(np.flatnonzero(draws(SamplingParams(temperature=1.0, top_k=2, seed=1)))) == {1, 5}
    # p(1) ~ 0.36, p(5) ~ 0.33: top_p 0.5 needs both, and nothing else.
    assert set(np.flatnonzero(draws(SamplingParams(temperature=1.0, top_p=0.5, seed=2)))) == {1, 5}
    # p = [.054, .399, .147, .033, .007, .361]: min_p 0.3 keeps p >= .12, that is tokens 1, 2 and 5.
    assert set(np.flatnonzero(draws(SamplingParams(temperature=1.0, min_p=0.3, seed=3)))) == {1, 2, 5}


def test_temperature_one_follows_softmax():
    counts = draws(SamplingParams(temperature=1.0, seed=4), n=20000)
    probs = np.exp(LOGITS - LOGITS.max())
    probs /= probs.sum()
    np.testing.assert_allclose(counts / counts.sum(), probs, atol=0.015)


def test_seed_makes_runs_repeatable():
    sampler_a, sampler_b = Sampler(SamplingParams(temperature=0.8, seed=7)), Sampler(SamplingParams(temperature=0.8, seed=7))
    first = [sampler_a(LOGITS) for _ in range(50)]
    assert first == [sampler_b(LOGITS) for _ in range(50)] and len(set(first)) > 1


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5),
                                 dict(min_p=1.0), dict(repetition_penalty=0)])
def test_bad_parameters_are_clear_errors(bad):
    with pytest.raises(LlmcError, match="bad sampling parameters"):
        SamplingParams(**bad)
