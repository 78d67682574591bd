import json
import os

import numpy as np
import pytest
import scipy.stats
import torch

from eval import human_study_stats, listening_vote, remembered, set_win_rate, win_rate


@pytest.mark.parametrize("wins,rate,lower,p",
                         [(253, 0.6024, 0.5615, 1.58e-5), (256, 0.6095, 0.5687, 4.15e-6)])
def test_human_study_stats_on_the_papers_numbers(wins, rate, lower, p):
    s = human_study_stats(wins, 420)
    assert s["win_rate"] == pytest.approx(rate, abs=5e-5)
    assert s["lower_bound"] == pytest.approx(lower, abs=5e-5)
    assert s["p_value"] == pytest.approx(p, rel=5e-3)
    assert 0.999 < s["posterior"] < 1.0


def test_human_study_stats_against_direct_sums():
    # p-value = sum_{k >= wins} C(n, k) / 2^n ; posterior of Beta(wins+1, n-wins+1) above 1/2
    from math import comb
    n, w = 30, 20
    assert human_study_stats(w, n)["p_value"] == pytest.approx(
        sum(comb(n, k) for k in range(w, n + 1)) / 2 ** n)
    grid = np.linspace(0, 1, 200001)
    dens = grid ** w * (1 - grid) ** (n - w)
    assert human_study_stats(w, n)["posterior"] == pytest.approx(
        dens[grid > 0.5].sum() / dens.sum(), abs=1e-4)
    # the Clopper-Pearson bound is where the binomial tail P(X >= w | p) equals 5%
    lb = human_study_stats(w, n)["lower_bound"]
    assert scipy.stats.binom.sf(w - 1, n, lb) == pytest.approx(0.05, abs=1e-9)
    with pytest.raises(ValueError, match="0 <= wins <= n"):
        human_study_stats(5, 4)


def test_win_rate_counts_ties_as_half_and_brackets_the_rate():
    ft = np.array([1.0, 2.0, 3.0, 4.0, 0.0])
    base = np.array([0.0, 2.0, 4.0, 1.0, 0.0])
    rate, lo, hi = win_rate(ft, base)
    assert rate == pytest.approx((1 + 0.5 + 0 + 1 + 0.5) / 5)
    assert lo <= rate <= hi and 0 <= lo and hi <= 1
    r, lo, hi = win_rate(np.arange(200.0) + 1, np.arange(200.0))
    assert r == lo == hi == 1.0
    with pytest.raises(ValueError, match="equal-length"):
        win_rate([1.0, 2.0], [1.0])


def test_set_win_rate_for_a_clearly_better_set():
    good, bad = torch.rand(40) + 1.0, torch.rand(40)
    rate, lo, hi = set_win_rate(lambda m: good[m].mean(-1), lambda m: bad[m].mean(-1), 40)
    assert rate == 1.0 and lo == 1.0
    rate, lo, hi = set_win_rate(lambda m: torch.ones(len(m)), lambda m: torch.ones(len(m)), 40)
    assert (rate, lo, hi) == (0.5, 0.5, 0.5)


def test_the_base_models_set_reward_is_computed_once_for_every_model():
    calls = []
    base = remembered(lambda m: calls.append(m.tolist()) or m.sum(-1).double())
    ft = torch.arange(40.0, dtype=torch.float64)
    first = set_win_rate(lambda m: ft[m].sum(-1) + 0.5, base, 40, n_halves=20, n_boot=10,
                         halves_per_boot=5)
    distinct = len(calls)
    # one batched call for the estimate and one per bootstrap resample
    assert first == (1.0, 1.0, 1.0) and distinct == 1 + 10
    second = set_win_rate(lambda m: ft[m].sum(-1) - 0.5, base, 40, n_halves=20, n_boot=10,
                          halves_per_boot=5)
    # the same subsets: no new base calls
    assert second == (0.0, 0.0, 0.0) and len(calls) == distinct


def test_set_win_rate_halves_hold_distinct_prompts_in_the_bootstrap_too():
    # A real half holds n // 2 different prompts, and so must every half of a bootstrap resample
    # (which repeats prompts): a repeated clip would shrink the set's effective size, make its FAD
    # noisier than a real half's and pull every bootstrap win rate toward 1/2.
    seen = []
    set_win_rate(lambda m: seen.extend(m.tolist()) or m.sum(-1), lambda m: torch.zeros(len(m)),
                 40, n_halves=20, n_boot=30, halves_per_boot=5)
    assert len(seen) == 20 + 30 * 5
    assert all(len(s) == 20 and len(set(s)) == 20 for s in seen)


def test_set_win_rate_interval_covers_prompt_sampling():
    # Two models with the same distribution of per-prompt quality: the true win rate is 1/2. Each
    # trial evaluates a fresh draw of 40 prompts; its interval must cover 1/2 in most trials (95%
    # nominal). Resampling only halves of the same 40 prompts would cover it in few trials, since
    # each draw's own win rate swings far from 1/2.
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(30):
        ft, base = rng.normal(size=40), rng.normal(size=40)
        rate, lo, hi = set_win_rate(lambda m: ft[m].mean(-1), lambda m: base[m].mean(-1),
                                    40, n_halves=50, n_boot=100, halves_per_boot=10, seed=trial)
        assert lo <= rate <= hi
        covered += lo <= 0.5 <= hi
    assert covered >= 24


def test_eval_main_writes_table_json_plot_and_wavs(tmp_path):
    from eval import main
    from test_train import cfg_for
    from train import train
    ckpt = train(cfg_for(tmp_path, "dragon.rounds=1", "dragon.eval_every=1"))
    cfg = cfg_for(tmp_path, "eval.n_prompts=6",
                  "eval.rewards=[fad_per_song/latent/audio:sd, vendi/latent]")
    rows = main(cfg)
    assert [(r["prompts"], r["type"]) for r in rows] == [("heldout", "instance-to-distribution"),
                                                         ("heldout", "distribution"),
                                                         ("user", "instance-to-distribution"),
                                                         ("user", "distribution")]
    out = os.path.dirname(ckpt)
    for name in ("eval.md", "eval.json", "win_rates.png", "radar.png", "eval_samples/00_base.wav",
                 "eval_samples/01_finetuned.wav"):
        assert os.path.isfile(os.path.join(out, name)), name
    heard = json.load(open(os.path.join(out, "eval.json")))["listening"]
    assert [(r["prompts"], r["model"]) for r in heard] == [("heldout", "base"),
                                                           ("heldout", "finetuned"),
                                                           ("user", "base"),
                                                           ("user", "finetuned")]
    assert all(0 <= r["full_scale"] <= 1 and not r["register_match"] > 1 for r in heard)
    assert "What a listener would notice" in open(os.path.join(out, "eval.md")).read()
    votes = json.load(open(os.path.join(out, "eval.json")))["listening_test"]
    assert [(v["prompts"], v["model"]) for v in votes] == [("heldout", "finetuned"),
                                                           ("user", "finetuned")]
    assert all(v["decisive"] + v["ties"] == 6 and 0 <= v["wins"] <= v["decisive"] for v in votes)


def test_a_model_against_itself_ties_on_every_reward(tmp_path):
    # Same prompts and same initial noise per prompt: the base model compared with itself makes
    # identical samples, so every instance reward ties per prompt and every set reward ties per
    # subset: win rate exactly 1/2, interval [1/2, 1/2], equal values.
    from encoders import make_codec, make_text_encoder
    from eval import evaluate_models
    from model import load_model
    from pretrain import pretrain
    from test_train import cfg_for
    cfg = cfg_for(tmp_path, "eval.n_prompts=6", "eval.prompt_sets=[heldout]",
                  "eval.rewards=[fad_per_song/latent/audio:sd, vendi/latent]")
    pretrain(cfg)
    base = load_model(os.path.join(tmp_path, "base.pt"))[0].eval()
    codec, text_encoder = make_codec(cfg), make_text_encoder(cfg)
    with torch.no_grad():
        rows, latents, audio = evaluate_models(cfg, base, {"itself": base, "again": base}, codec,
                                               text_encoder, torch.device("cpu"))
    assert [(r["model"], r["type"]) for r in rows] == [("itself", "instance-to-distribution"),
                                                       ("again", "instance-to-distribution"),
                                                       ("itself", "distribution"),
                                                       ("again", "distribution")]
    for r in rows:
        assert ((r["win_rate"], r["ci_low"], r["ci_high"]) == (0.5, 0.5, 0.5)
                and r["finetuned"] == r["base"])
    assert torch.equal(latents["heldout"]["base"], latents["heldout"]["itself"])
    from eval import listening_rows
    # the listener cannot tell a model from itself
    _, votes = listening_rows(cfg, audio, codec.sample_rate)
    assert [(v["wins"], v["decisive"], v["ties"]) for v in votes] == [(0, 0, 6), (0, 0, 6)]
    assert all(c["a_only"] == c["b_only"] == 0 for v in votes for c in v["changes"].values())


def test_win_rate_plot_takes_a_rate_outside_its_interval(tmp_path):
    # a set reward's win rate on all prompts can lie outside the interval of its resampled halves
    # (the benchmark's vendi[latent] row: 1.0% [0.0%, ...] and 0.0% with an interval above it)
    from eval import plot_win_rates
    rows = [{"reward": "vendi[latent]", "prompts": "heldout", "win_rate": 0.0, "ci_low": 0.02,
             "ci_high": 0.3}, {"reward": "aesthetics", "prompts": "heldout", "win_rate": 0.9,
                               "ci_low": 0.85, "ci_high": 0.95}]
    plot_win_rates(rows, tmp_path / "w.png")
    assert (tmp_path / "w.png").stat().st_size > 0


def test_listening_vote_counts_by_hand_with_the_keys_both_listening_tests_write():
    """eval.py's and benchmark.py's listening tests both build their votes with listening_vote:
    the same keys in the same order (benchmark's heard= right after prompts)."""
    def report(clipping):
        n, nan = len(clipping), torch.full((len(clipping),), float("nan"))
        return {"clipping": torch.tensor(clipping, dtype=torch.float), "hiss": torch.zeros(n),
                "dropout": torch.zeros(n), "register_match": nan, "dynamics_match": nan}
    tuned, base = report([0, 0, 1, 0]), report([1, 0, 0, 1])
    vote = listening_vote("tuned", "heldout", tuned, base)
    assert list(vote) == ["model", "prompts", "wins", "decisive", "ties", "win_rate", "lower_bound",
                          "p_value", "posterior", "changes"]
    assert (vote["model"], vote["prompts"], vote["wins"], vote["decisive"], vote["ties"]) == (
        "tuned", "heldout", 2, 3, 1)
    assert vote["changes"]["clipping"] == {"a_only": 1, "b_only": 2, "p_value": 1.0}
    assert list(listening_vote("tuned", "heldout", tuned, base, heard=4))[:4] == [
        "model", "prompts", "heard", "wins"]
    same = listening_vote("base", "user", base, base)   # no decisive pair: no statistics
    assert (same["decisive"], same["ties"]) == (0, 4) and "win_rate" not in same
