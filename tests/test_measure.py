import math
import os

import pytest
import torch

from measure import EDITS, SAMPLER_VARIANTS, edited_clip_scores, main, share_higher, silent_gap
from rewards import parse_reward, reward_name
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
CLAP_PER_SONG_FAD = [f"fad_per_song/clap/{reference}" for reference in
                     ("audio:alim", "audio:sd", "text:alim", "text:sd")]
# A micro world at the default clip length, noise floor and CLAP windows (2 s clips, 1.5 s windows:
# 5 per clip), with a micro CLAP (600 clips, 500 steps; the default fits 6000 clips, 1500 steps).
# 90% of its clips have defects (default 50%), so that 600 clips hold enough dropouts for the CLAP
# to tell a dropout from soft playing; 400 held-out clips leave about 37 clean ones to edit.
MICRO = ["device=cpu", "data.n_train=600", "data.n_valid=200", "data.n_test=200",
         "data.p_defect=0.9", "reward.n_reference=60", "codec.griffin_lim_iters=4",
         "clap.steps=500", "clap.batch_size=64", "clap.lr=0.003", "aesthetics.max_clips=300"]


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    from encoders import make_codec
    from launch import load_config
    from test_train import ROOT
    cfg = load_config(os.path.join(ROOT, "config.yaml"),
                      MICRO + [f"out_dir={tmp_path_factory.mktemp('edited')}"])
    clips, scores = edited_clip_scores(cfg, make_codec(cfg), PER_SONG_FAD + CLAP_PER_SONG_FAD)
    assert len(clips) >= 30 and len(scores) == len(PER_SONG_FAD + CLAP_PER_SONG_FAD)
    return cfg, scores


GAP, CLIPPED = "+0.25 s silent gap (a dropout)", "x3 gain, clipped at full scale"


def test_latent_per_song_fad_prefers_the_clean_clip_to_a_dropout_or_clipping(edited):
    # Both latent per-song FAD rewards score a defect-free clip above the same clip with a 0.25 s
    # silent gap and above it driven x3 into clipping, in at least 90% of the clips. In the world
    # before (digital silence between notes, the codec scaled for it) the first prefers the gap:
    # the reversal.
    from encoders import make_codec
    cfg, scores = edited
    for spec in PER_SONG_FAD:
        name = reward_name(parse_reward(spec))
        for edit in EDITS:
            higher = share_higher(scores[name], edit)
            assert higher <= 0.1, f"{name}: '{edit}' beats the clean clip in {higher:.0%} of clips"
    old = {"data": dict(cfg["data"], noise_floor=0.0),
           "codec": dict(cfg["codec"], log_mean=-4.5, log_scale=9.0)}
    silent = dict(cfg, **old)
    _, scores = edited_clip_scores(silent, make_codec(silent), PER_SONG_FAD[:1])
    assert share_higher(next(iter(scores.values())), GAP) > 0.5


def test_clap_per_song_fad_prefers_the_clean_clip_to_a_dropout(edited):
    # The four CLAP per-song FAD rewards (audio or text exemplars, alim or sd) score a clean clip
    # above the same clip with a 0.25 s silent gap in at least 90% of the clips: 92-100% with
    # micro CLAPs of seeds 0-9. Against the sd exemplars (soft, quiet clips: a gap looks soft) it
    # takes a CLAP that has heard enough dropouts: at the default 50% defects the micro CLAP
    # preferred the gap in up to 65% of clips (full-size CLAPs of seeds 0-2: 92-98% clean higher).
    _, scores = edited
    for spec in CLAP_PER_SONG_FAD:
        name = reward_name(parse_reward(spec))
        higher = share_higher(scores[name], GAP)
        assert higher <= 0.1, f"{name}: the gap beats the clean clip in {higher:.0%} of clips"


def test_clap_per_song_fad_prefers_the_clean_clip_to_clipping(world):
    # The four CLAP per-song FAD rewards on the micro world's CLAP (250 steps, 1 s clips): each
    # scores a clean clip above the same clip driven x3 into clipping in at least 90% of the clips
    # (94-100% on seeds 0-2). The 0.25 s gap: the test above.
    cfg, codec = world[0], world[1]
    clips, scores = edited_clip_scores(cfg, codec, CLAP_PER_SONG_FAD)
    assert len(clips) >= 30 and len(scores) == len(CLAP_PER_SONG_FAD)
    for name, s in scores.items():
        higher = share_higher(s, CLIPPED)
        assert higher <= 0.1, f"{name}: the clipped clip beats the clean one in {higher:.0%}"
