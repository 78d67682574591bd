import math

from measure import SAMPLER_VARIANTS, main
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
    assert "| as rendered |" in out and "| codec round trip |" in out
