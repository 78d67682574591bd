import json
import os

from benchmark import benchmark
from test_train import cfg_for


def test_micro_benchmark_runs_instance_and_set_rewards_and_writes_the_table(tmp_path):
    cfg = cfg_for(tmp_path, "benchmark.rounds=2", "eval.n_prompts=8", "eval.rewards=[vendi/latent]")
    runs = {"fad": ("fad_per_song/latent/audio:sd", {}), "vendi": ("vendi/latent", {"dragon.sets": "greedy"})}
    rows = benchmark(cfg, runs)
    assert [r["run"] for r in rows] == ["fad", "vendi"]
    assert rows[0]["type"] == "instance-to-distribution" and rows[1]["type"] == "distribution"
    for r in rows:
        assert 0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 1 and r["forwards_per_s"] > 0
    log = [json.loads(line) for line in open(tmp_path / "bench_fad" / "log.jsonl")]
    assert [e["round"] for e in log] == [1, 2]                      # benchmark.rounds, not dragon.rounds
    report = json.load(open(tmp_path / "benchmark.json"))
    assert report["rows"][1]["run"] == "vendi"
    # every run on every reward (eval.rewards and the runs' targets, deduplicated), held-out prompts
    assert [(r["model"], r["reward"]) for r in report["matrix"]] == [
        ("fad", "vendi[latent]"), ("vendi", "vendi[latent]"), ("fad", rows[0]["reward"]), ("vendi", rows[0]["reward"])]
    assert report["matrix"][1]["win_rate"] == rows[1]["win_rate"]   # the table is the matrix's target column
    for name in ("benchmark.png", "benchmark_radar.png"):
        assert os.path.isfile(tmp_path / name), name
    text = open(tmp_path / "benchmark.md").read()
    assert "Average win rate over the 2 target rewards" in text and "| trained on |" in text
