import json
import os

from benchmark import benchmark
from test_train import cfg_for


def test_micro_benchmark_runs_instance_and_set_rewards_and_writes_the_table(tmp_path):
    cfg = cfg_for(tmp_path, "dragon.rounds=2", "dragon.eval_every=2", "eval.n_prompts=8")
    runs = {"fad": ("fad_per_song/latent/audio:sd", {"reward.kind": "fad_per_song"}),
            "vendi": ("vendi/latent", {"reward.kind": "vendi", "reward.encoder": "latent", "dragon.sets": "greedy"})}
    rows = benchmark(cfg, runs)
    assert [r["run"] for r in rows] == ["fad", "vendi"]
    assert rows[0]["type"] == "instance-to-distribution" and rows[1]["type"] == "distribution"
    for r in rows:
        assert 0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 1 and r["forwards_per_s"] > 0
    assert os.path.isfile(tmp_path / "benchmark.png")
    assert "Average win rate over the 2 target rewards" in open(tmp_path / "benchmark.md").read()
    assert json.load(open(tmp_path / "benchmark.json"))["rows"][1]["run"] == "vendi"
