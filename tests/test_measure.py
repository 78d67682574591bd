import math
import os

import torch

from measure import EDITS, SAMPLER_VARIANTS, edited_clip_scores, main, silent_gap
from test_train import cfg_for


def test_micro_measure_prints_costs_sampler_variants_and_listener_accuracy(tmp_path, capsys):
    cfg = cfg_for(tmp_path, "eval.rewards=[fad_per_song/latent/audio:sd, vendi/latent]",
                  "data.n_valid=10")
    main(cfg, n=6)
    out = capsys.readouterr().out
    assert "| fad_per_song[latent,audio:sd] | instance-to-distribution |" in out
    assert "| vendi[latent] | distribution |" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and " | " in line]
    for name in SAMPLER_VARIANTS:                       # one row per variant, every cell a number
        row = next(r for r in rows if r.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert len(cells) == 9 and not any(math.isnan(float(c)) for c in cells), row
    edited = next(r for r in rows if r.startswith("| fad_per_song[latent,audio:sd] |")
                  and "higher in" in r)
    # the reward, clean, one cell per edit
    assert len(edited.strip("|").split("|")) == 1 + 1 + len(EDITS)
    assert "| as rendered |" in out and "| codec round trip |" in out
    by_attribute = next(r for r in rows if r.startswith("| fad_per_song[latent,audio:sd] |")
                        and "(" in r and "higher in" not in r)
    # low / mid / high, soft / loud
    assert len(by_attribute.strip("|").split("|")) == 1 + 5


def test_edits_make_the_defect_they_name():
    audio = torch.full((2, 100), 0.5)
    gap = silent_gap(audio, 10)
    assert (gap[:, 45:55] == 0).all() and (gap[:, :45] == 0.5).all() and (gap[:, 55:] == 0.5).all()
    loud = EDITS["x3 gain, clipped at full scale"](audio, 1000)
    assert (loud == 1.0).all()                            # 1.5 clipped to full scale
    assert (EDITS["+0.25 s silent gap (a dropout)"](torch.ones(1, 1000), 100) == 0).sum() == 25


PER_SONG_FAD = [f"fad_per_song/latent/{reference}" for reference in ("audio:alim", "audio:sd")]


def test_latent_per_song_fad_prefers_the_clean_clip_to_a_dropout_or_clipping(tmp_path):
    # A micro world at the default clip length and noise floor: both latent per-song FAD rewards
    # score a defect-free clip above the same clip with a 0.25 s silent gap and above it driven x3
    # into clipping, in at least 90% of the clips. In the world before (digital silence between
    # notes, the codec scaled for it) the first prefers the gap: the reversal. (The CLAP variants:
    # test_clap_per_song_fad_prefers_the_clean_clip_to_clipping below.)
    from encoders import make_codec
    from launch import load_config
    from test_train import ROOT
    micro = ["device=cpu", "data.n_train=100", "data.n_valid=40", "data.n_test=40",
             "reward.n_reference=60", "codec.griffin_lim_iters=4", f"out_dir={tmp_path}"]
    cfg = load_config(os.path.join(ROOT, "config.yaml"), micro)
    clips, scores = edited_clip_scores(cfg, make_codec(cfg), PER_SONG_FAD)
    assert len(clips) >= 30 and len(scores) == len(PER_SONG_FAD)
    for name, s in scores.items():
        for edit in EDITS:
            higher = (s[edit].per_example > s["clean"].per_example).float().mean().item()
            assert higher <= 0.1, f"{name}: '{edit}' beats the clean clip in {higher:.0%} of clips"
    # the world before
    old = ["data.noise_floor=0.0", "codec.log_mean=-4.5", "codec.log_scale=9.0"]
    silent = load_config(os.path.join(ROOT, "config.yaml"), micro + old)
    _, scores = edited_clip_scores(silent, make_codec(silent), PER_SONG_FAD[:1])
    s = next(iter(scores.values()))
    assert (s["+0.25 s silent gap (a dropout)"].per_example
            > s["clean"].per_example).float().mean() > 0.5


CLAP_PER_SONG_FAD = [f"fad_per_song/clap/{reference}" for reference in
                     ("audio:alim", "audio:sd", "text:alim", "text:sd")]


def test_clap_per_song_fad_prefers_the_clean_clip_to_clipping(world):
    # The four CLAP per-song FAD rewards on the micro world's CLAP (250 steps, 1 s clips): each
    # scores a clean clip above the same clip driven x3 into clipping in at least 90% of the clips
    # (94-100% on seeds 0-2). Against a 0.25 s gap they need a trained CLAP: with the full-size one
    # measure.py measures 96-100% of 203 clips for all four; micro CLAPs give 51-100% from seed to
    # seed, so that half of the property is not asserted here.
    cfg, codec = world[0], world[1]
    clips, scores = edited_clip_scores(cfg, codec, CLAP_PER_SONG_FAD)
    assert len(clips) >= 30 and len(scores) == len(CLAP_PER_SONG_FAD)
    for name, s in scores.items():
        clipped = s["x3 gain, clipped at full scale"].per_example
        higher = (clipped > s["clean"].per_example).float().mean().item()
        assert higher <= 0.1, f"{name}: the clipped clip beats the clean one in {higher:.0%}"
