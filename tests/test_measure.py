import math

import torch

from measure import EDITS, SAMPLER_VARIANTS, main, silent_gap
from test_train import cfg_for


def test_micro_measure_prints_costs_sampler_variants_and_listener_accuracy(tmp_path, capsys):
    cfg = cfg_for(tmp_path, "eval.rewards=[fad_per_song/latent/audio:sd, vendi/latent]", "data.n_valid=10")
    main(cfg, n=6)
    out = capsys.readouterr().out
    assert "| fad_per_song[latent,audio:sd] | instance-to-distribution |" in out
    assert "| vendi[latent] | distribution |" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and " | " in line]
    for name in SAMPLER_VARIANTS:                       # one row per variant, every cell a number
        row = next(r for r in rows if r.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert len(cells) == 9 and not any(math.isnan(float(c)) for c in cells), row
    edited = next(r for r in rows if r.startswith("| fad_per_song[latent,audio:sd] |") and "higher in" in r)
    assert len(edited.strip("|").split("|")) == 1 + 1 + len(EDITS)   # the reward, clean, one cell per edit
    assert "| as rendered |" in out and "| codec round trip |" in out


def test_edits_make_the_defect_they_name():
    audio = torch.full((2, 100), 0.5)
    gap = silent_gap(audio, 10)
    assert (gap[:, 45:55] == 0).all() and (gap[:, :45] == 0.5).all() and (gap[:, 55:] == 0.5).all()
    loud = EDITS["x3 gain, clipped at full scale"](audio, 1000)
    assert (loud == 1.0).all()                            # 1.5 clipped to full scale
    assert (EDITS["+0.25 s silent gap (a dropout)"](torch.ones(1, 1000), 100) == 0).sum() == 25
