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


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    # Token 1 generated twice: 3.0 - 2 * 0.1 = 2.8 falls below token 5's 2.9.
    assert Sampler(SamplingParams(frequency_penalty=0.1))(LOGITS, history=[0, 1, 1], generated=2) == 5
    # Present, whatever the count: 3.0 - 0.05 = 2.95 stays above 2.9; 0.2 takes it below.
    assert Sampler(SamplingParams(presence_penalty=0.05))(LOGITS, history=[1, 1, 1], generated=3) == 1
    assert Sampler(SamplingParams(presence_penalty=0.2))(LOGITS, history=[1], generated=1) == 5
    # Prompt tokens (before the last `generated`) are not penalized.
    assert Sampler(SamplingParams(frequency_penalty=2.0))(LOGITS, history=[1, 1, 4], generated=1) == 1
    # A negative penalty encourages: token 2 (2.0) rises above 3.0 after three occurrences of -0.4.
    assert Sampler(SamplingParams(frequency_penalty=-0.4))(LOGITS, history=[2, 2, 2], generated=3) == 2
    from llmc.runtime.sampler import penalized
    x = penalized(LOGITS, [SamplingParams(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25)],
                  [[3, 1, 1, 4]], [3])
    want = LOGITS.copy()
    want[[1, 3, 4]] = [3.0 / 1.5, 0.5 / 1.5, -1.0 * 1.5]         # the repetition penalty: the whole history
    want[1] -= 0.5 + 2 * 0.25                                      # then the output's: token 1 twice,
    want[4] -= 0.5 + 1 * 0.25                                      # token 4 once (token 3 is the prompt's)
    np.testing.assert_allclose(x[0], want)


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
                                 dict(min_p=1.0), dict(repetition_penalty=0), dict(presence_penalty=2.5),
                                 dict(frequency_penalty=-3), dict(frequency_penalty=float("nan"))])
def test_bad_parameters_are_clear_errors(bad):
    with pytest.raises(LlmcError, match="bad sampling parameters"):
        SamplingParams(**bad)


def test_a_row_samples_the_same_alone_and_in_any_batch():
    """sample_rows over a batch of rows with mixed parameters draws, row by row, what each row's
    own Sampler draws alone: a seeded request does not depend on its batch."""
    from llmc.runtime.sampler import sample_rows

    rng = np.random.default_rng(0)
    vocab = 301
    options = [dict(), dict(temperature=0.7, seed=1), dict(temperature=1.0, top_k=7, seed=2),
               dict(temperature=1.3, top_p=0.6, seed=3), dict(temperature=0.9, min_p=0.1, seed=4),
               dict(temperature=1.0, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.3, seed=5),
               dict(repetition_penalty=1.5), dict(presence_penalty=1.0, frequency_penalty=0.5),
               dict(temperature=0.8, frequency_penalty=1.5, seed=6)]
    params = [SamplingParams(**o) for o in options]
    alone = [Sampler(p) for p in params]
    together = [np.random.default_rng(p.seed) for p in params]
    histories = [rng.integers(0, vocab, size=int(rng.integers(0, 30))).tolist() for _ in params]
    generated = [int(rng.integers(0, len(h) + 1)) for h in histories]
    for _ in range(50):
        logits = (rng.standard_normal((len(params), vocab)) * 4).astype(np.float32)
        order = rng.permutation(len(params))[: int(rng.integers(1, len(params) + 1))]
        got = sample_rows(logits[order], [params[i] for i in order], [together[i] for i in order],
                          [histories[i] for i in order], [generated[i] for i in order])
        want = [alone[i](logits[i], histories[i], generated[i]) for i in order]
        assert got.tolist() == want


def test_top_logprobs_are_log_softmax_of_the_raw_logits():
    from llmc.runtime.sampler import top_logprobs

    logits = np.array([[1.0, 3.0, 2.0, 3.0, -1.0]])
    (chosen, best), = top_logprobs(logits, [2], 3)
    logp = logits[0] - np.log(np.exp(logits[0]).sum())
    assert chosen == pytest.approx(logp[2])
    assert [t for t, _ in best] == [1, 3, 2] and [v for _, v in best] == pytest.approx(logp[[1, 3, 2]])


def plain_sample_rows(logits, params, rngs, histories, generated):
    """The oracle: the same arithmetic done plainly (a full sort for top-p, every exponential);
    the penalties are the sampler's own (test_greedy_and_repetition_penalty and
    test_presence_and_frequency_penalties_count_generated_tokens_only check them)."""
    from llmc.runtime.sampler import penalized

    x = penalized(logits, params, histories, generated)
    rows, vocab = x.shape
    out = np.argmax(x, axis=1)
    hot = [i for i, p in enumerate(params) if p.temperature > 0]
    if not hot:
        return out
    z = x[hot] / np.array([[params[i].temperature] for i in hot])
    ks = np.array([params[i].top_k for i in hot])
    for k in np.unique(ks[(ks > 0) & (ks < vocab)]):
        rows_k = np.flatnonzero(ks == k)
        cutoff = np.partition(z[rows_k], -k, axis=1)[:, -k]
        z[rows_k] = np.where(z[rows_k] >= cutoff[:, None], z[rows_k], -np.inf)
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    top_p = np.array([params[i].top_p for i in hot])
    nucleus = np.flatnonzero(top_p < 1.0)
    if nucleus.size:
        sub = probs[nucleus]
        order = np.argsort(-sub, axis=1, kind="stable")
        mass = np.cumsum(np.take_along_axis(sub, order, axis=1), axis=1)
        count = (mass < top_p[nucleus, None]).sum(axis=1) + 1
        keep = np.zeros_like(sub, dtype=bool)
        np.put_along_axis(keep, order, np.arange(vocab)[None, :] < count[:, None], axis=1)
        probs[nucleus] = np.where(keep, sub, 0.0)
    min_p = np.array([[params[i].min_p] for i in hot])
    probs = np.where(probs >= min_p * probs.max(axis=1, keepdims=True), probs, 0.0)
    probs /= probs.sum(axis=1, keepdims=True)
    cdf = np.cumsum(probs, axis=1)
    cdf /= cdf[:, -1:]
    uniform = np.array([rngs[i].random() for i in hot])
    out[hot] = np.minimum((cdf <= uniform[:, None]).sum(axis=1), vocab - 1)
    return out


@pytest.mark.parametrize("vocab", [7, 600, 5003])
def test_sample_rows_draws_what_the_plain_arithmetic_draws(vocab):
    """sample_rows (exponentials only where top-k keeps a token, top-p sorting a row's likeliest
    tokens first) draws exactly the tokens of the plain version, on peaked rows, flat rows whose
    nucleus overflows the candidates, and rows of tied logits."""
    from llmc.runtime.sampler import sample_rows

    rng = np.random.default_rng(vocab)
    for trial in range(40):
        rows = int(rng.integers(1, 12))
        scale = rng.choice([0.05, 1.0, 4.0, 12.0], size=(rows, 1))
        logits = rng.standard_normal((rows, vocab)) * scale
        if trial % 4 == 0:
            logits = np.round(logits * 2) / 2                   # many ties
        params = [SamplingParams(temperature=float(rng.choice([0.0, 0.5, 1.0, 1.7])),
                                 top_k=int(rng.choice([0, 0, 1, 5, 40, vocab + 3])),
                                 top_p=float(rng.choice([1.0, 1.0, 0.3, 0.9, 0.999])),
                                 min_p=float(rng.choice([0.0, 0.0, 0.05])),
                                 repetition_penalty=float(rng.choice([1.0, 1.3])), seed=trial * 100 + i,
                                 presence_penalty=float(rng.choice([0.0, 0.0, 0.5])),
                                 frequency_penalty=float(rng.choice([0.0, 0.0, 0.3, -0.2])))
                  for i in range(rows)]
        histories = [rng.integers(0, vocab, size=int(rng.integers(0, 20))).tolist() for _ in range(rows)]
        generated = [int(rng.integers(0, len(h) + 1)) for h in histories]
        got = sample_rows(logits.astype(np.float32), params, [np.random.default_rng(p.seed) for p in params],
                          histories, generated)
        want = plain_sample_rows(logits.astype(np.float32), params,
                                 [np.random.default_rng(p.seed) for p in params], histories, generated)
        assert got.tolist() == want.tolist(), trial
