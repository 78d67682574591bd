import math

import numpy as np
import pytest
import torch

from data import synthetic_corpus
from listen import detect_defects, dynamics_of, melody_pitch, paired_changes, preference
from listen import register_of, validate

SR = 16000


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus("valid", 120, SR, 2.0, seed=0, p_defect=0.5)


def test_measured_pitch_register_matches_the_attribute(corpus):
    # an independent physical check: the spectral pitch of the audio, not the generator's
    # bookkeeping
    got = register_of(corpus.audio, SR)
    want = [a["register"] for a in corpus.attributes]
    assert np.mean([g == w for g, w in zip(got, want)]) > 0.95


def test_pitch_estimator_on_pure_tones():
    t = torch.arange(SR) / SR
    tones = torch.stack([0.3 * torch.sin(2 * math.pi * f * t) for f in (110.0, 330.0, 880.0)])
    torch.testing.assert_close(melody_pitch(tones, SR), torch.tensor([110.0, 330.0, 880.0]),
                               atol=4.0, rtol=0)
    assert register_of(tones, SR) == ["low", "mid", "high"]


def test_detect_defects_finds_a_gap_and_hiss_but_not_short_pauses_between_notes():
    t = np.arange(2 * SR) / SR
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    gap = tone.copy()
    gap[SR // 2: SR // 2 + int(0.1 * SR)] = 0                            # a 100 ms cut-out
    pauses = tone.copy()
    # three 20 ms pauses between notes
    for start in (0.4, 0.9, 1.4):
        pauses[int(start * SR): int((start + 0.02) * SR)] = 0
    hiss = tone + 0.05 * np.random.default_rng(0).standard_normal(len(t))
    found = detect_defects(torch.tensor(np.stack([tone, gap, pauses, hiss]), dtype=torch.float32),
                           SR)
    assert found == [set(), {"dropout"}, set(), {"hiss"}]


def test_measured_dynamics_match_the_attribute(corpus):
    got = dynamics_of(corpus.audio)
    want = [a["dynamics"] for a in corpus.attributes]
    assert np.mean([g == w for g, w in zip(got, want)]) > 0.95
    # peaks 0.15 and 0.5: soft, loud
    t = torch.arange(SR) / SR
    assert dynamics_of(torch.stack([a * torch.sin(2 * math.pi * 440 * t)
                                    for a in (0.15, 0.5)])) == ["soft", "loud"]


def test_validate_counts_by_hand():
    """Four tones with known truth: the listener's rates, counted by hand."""
    t = torch.arange(2 * SR) / SR
    low, high = 0.15 * torch.sin(2 * math.pi * 110 * t), 0.5 * torch.sin(2 * math.pi * 880 * t)
    hissy = high + 0.1 * torch.randn(len(t), generator=torch.Generator().manual_seed(0))
    audio = torch.stack([low, high, hissy, low])
    captions = ["soft low flute", "loud high flute", "loud high flute", "loud mid-range flute"]
    # clip 1's "hiss" is not in the audio
    defects = [{}, {"hiss": 1.0}, {"hiss": 1.0}, {}]
    v = validate(audio, SR, captions, defects)
    assert v["hiss"] == {"found": 0.5, "false_alarms": 0.0, "clips_with_it": 2}
    # the last clip is low, not mid
    assert v["register"] == {"accuracy": 0.75, "clips": 4}
    assert v["dynamics"] == {"accuracy": 0.75, "clips": 4}            # and soft, not loud


def test_preference_by_hand():
    """Defects decide first, then how many named attributes match; equal clips tie (hand-made
    listen() reports)."""
    def report(clipping, hiss, dropout, register, dynamics):
        return {"clipping": torch.tensor(clipping, dtype=torch.float),
                "hiss": torch.tensor(hiss, dtype=torch.float),
                "dropout": torch.tensor(dropout, dtype=torch.float),
                "register_match": torch.tensor(register), "dynamics_match": torch.tensor(dynamics)}
    nan = float("nan")
    a = report([0, 1, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0, 0],
               [1.0, 1.0, 1.0, 0.0, nan, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, nan, 1.0, 0.0])
    b = report([1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 0],
               [0.0, 1.0, 1.0, 1.0, nan, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, nan, 1.0, 1.0])
    #          a cleaner | tie on defects, same matches | a has a dropout | b follows the register
    #          | nothing to tell them apart | a: 2 defects, b: 1
    #          | one match each (register vs dynamics)
    assert preference(a, b).tolist() == [1, 0, -1, -1, 0, -1, 0]
    assert preference(b, a).tolist() == [-1, 0, 1, 1, 0, 1, 0]


def test_paired_changes_by_hand():
    """Discordant clips counted by hand; the p-value is the two-sided exact binomial tail, summed
    directly."""
    nan = float("nan")
    a = {"clipping": torch.tensor([1., 1., 0., 0., 1., 1., 1.]), "hiss": torch.zeros(7),
         "dropout": torch.zeros(7), "register_match": torch.tensor([1., 0., nan, 1., 1., 1., 1.])}
    b = {"clipping": torch.tensor([1., 0., 1., 0., 0., 0., 0.]), "hiss": torch.zeros(7),
         "dropout": torch.ones(7), "register_match": torch.tensor([1., 1., nan, 0., 0., 0., 0.])}
    c = paired_changes(a, b)
    assert (c["clipping"]["a_only"], c["clipping"]["b_only"]) == (4, 1)
    assert (c["dropout"]["a_only"], c["dropout"]["b_only"]) == (0, 7)
    # NaN: no register named
    assert (c["register_match"]["a_only"], c["register_match"]["b_only"]) == (4, 1)
    assert c["hiss"] == {"a_only": 0, "b_only": 0, "p_value": 1.0}
    # 4 of 5 discordant: P(X <= 1) + P(X >= 4) for X ~ Bin(5, 1/2) = (1 + 5 + 5 + 1) / 32
    assert c["clipping"]["p_value"] == pytest.approx(12 / 32)
    assert c["dropout"]["p_value"] == pytest.approx(2 / 2 ** 7)
    assert "dynamics_match" not in c
