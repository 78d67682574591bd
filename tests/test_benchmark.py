import json
import os

import pytest
import torch

from benchmark import ALL_RUNS, TARGETS, benchmark, listening_test, run_config, selected_runs
from encoders import make_codec, make_text_encoder
from model import load_model
from test_train import cfg_for

# 3 CLAP windows: per-song FAD needs 2
MICRO_CLAP = ["data.clip_seconds=1.0", "clap.window_frames=32", "clap.hop_frames=16",
              "data.n_test=12", "data.n_valid=16",
              "clap.steps=20", "clap.batch_size=16", "reward.n_reference=32", "eval.n_prompts=12",
              "benchmark.rounds=2", "benchmark.listen_prompts=16", "eval.rewards=[vendi/latent]",
              "benchmark.prompts_per_round=6", "benchmark.lr=0.002"]


def test_the_run_list_names_every_configuration_and_rejects_unknown_names(tmp_path):
    assert len(TARGETS) == 16 and len(ALL_RUNS) == 21
    assert list(selected_runs(cfg_for(tmp_path))) == list(ALL_RUNS)            # default: everything
    assert (list(selected_runs(cfg_for(tmp_path, "benchmark.runs=[vendi_clap,aesthetics]")))
            == ["vendi_clap", "aesthetics"])
    with pytest.raises(ValueError, match="benchmark.runs: unknown run.*'nope'"):
        selected_runs(cfg_for(tmp_path, "benchmark.runs=[aesthetics,nope]"))
    # listen_runs=[]: nothing generated
    assert listening_test(cfg_for(tmp_path), None, {}, None, None, None) == []


def test_every_run_takes_the_benchmark_dragon_settings_unless_it_overrides_them(tmp_path):
    cfg = cfg_for(tmp_path, "benchmark.prompts_per_round=7", "benchmark.lr=0.003",
                  "benchmark.noise_draws=2", "benchmark.demo_steps=5", "dragon.demo_steps=9")
    dc = run_config(cfg, "clap_score", "clap_score", {"dragon.demo_steps": 40})["dragon"]
    assert (dc["prompts_per_round"], dc["lr"], dc["noise_draws"], dc["demo_steps"]) == (7, 0.003,
                                                                                          2, 40)
    assert run_config(cfg, "aesthetics", "aesthetics", {})["dragon"]["demo_steps"] == 5


def test_micro_benchmark_writes_every_table(tmp_path):
    cfg = cfg_for(tmp_path, *MICRO_CLAP,
                  "benchmark.runs=[aesthetics,fad_song_latent_sd,vendi_latent,aesthetics_demo20]",
                  "benchmark.listen_runs=[aesthetics,fad_song_latent_sd]")
    rows = benchmark(cfg)
    assert [r["run"] for r in rows] == ["aesthetics", "fad_song_latent_sd", "vendi_latent",
                                        "aesthetics_demo20"]
    assert [r["group"] for r in rows] == ["target", "target", "target", "Fig. 3"]
    assert [r["type"] for r in rows[:3]] == ["instance", "instance-to-distribution", "distribution"]
    for r in rows:
        assert 0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 1 and r["forwards_per_s"] > 0
    log = [json.loads(line) for line in open(tmp_path / "bench_vendi_latent" / "log.jsonl")]
    # benchmark.rounds, not dragon.rounds
    assert [e["round"] for e in log] == [1, 2]
    # no held-out evaluation inside the run
    assert not any("eval_reward" in e for e in log)
    report = json.load(open(tmp_path / "benchmark.json"))
    # every run on every reward (eval.rewards and the runs' targets, deduplicated); the table is its
    # target column
    assert [(r["model"], r["reward"]) for r in report["matrix"]][:4] == [
        ("aesthetics", "vendi[latent]"), ("fad_song_latent_sd", "vendi[latent]"),
        ("vendi_latent", "vendi[latent]"), ("aesthetics_demo20", "vendi[latent]")]
    assert report["matrix"][2]["win_rate"] == rows[2]["win_rate"]

    # Fig. 7: thirds of the prompts by the base model's score; together they are the aesthetics row
    bins = report["fig7"]
    assert ([b["bin"] for b in bins] == ["low", "medium", "high"]
            and sum(b["prompts"] for b in bins) == 12)
    assert bins[0]["base"] <= bins[1]["base"] <= bins[2]["base"]
    assert (sum(b["win_rate"] * b["prompts"] for b in bins) / 12
            == pytest.approx(rows[0]["win_rate"]))
    assert sum(b["base"] * b["prompts"] for b in bins) / 12 == pytest.approx(rows[0]["base"])

    # the D+ table: the paired D+ takes the better clip of every pair, so its mean per-song FAD
    # cannot exceed D1's; greedy swaps start from the better of D1 / D2 and only improve its
    # dataset FAD
    for encoder in ("latent", "clap"):
        d = {r["set"]: r for r in report["dplus"] if r["encoder"] == encoder}
        # one clip per prompt of the round
        assert all(r["clips"] == 6 for r in d.values())
        assert d["D+ by per-song FAD"]["per_song_fad"] <= d["demonstrations (D1)"]["per_song_fad"]
        assert d["D+ by dataset FAD"]["dataset_fad"] <= d["demonstrations (D1)"]["dataset_fad"]

    # the listening test: one vote per decisive pair, ties dropped, against the paper's counts
    votes = report["listening_test"]
    assert [v["model"] for v in votes] == ["aesthetics", "fad_song_latent_sd"]
    for v in votes:
        assert 0 <= v["wins"] <= v["decisive"] == 16 - v["ties"]
    # it reused the evaluation's 12 clips per model and generated 4 more: the votes of 16 fresh
    # clips
    codec, text_encoder = make_codec(cfg), make_text_encoder(cfg)
    base, tuned = (load_model(tmp_path / p)[0].eval()
                   for p in ("base.pt", "bench_aesthetics/dragon.pt"))
    with torch.no_grad():
        fresh = listening_test(cfg, base, {"aesthetics": tuned}, codec, text_encoder, "cpu")
    assert (fresh[0]["wins"], fresh[0]["decisive"]) == (votes[0]["wins"], votes[0]["decisive"])
    # heard 4 prompts at a time, it stops at the first chunk that brings the decisive pairs to
    # listen_pairs, and its votes are those of the fixed-size test on the prompts it heard
    need = max(1, votes[0]["decisive"] // 2)

    def votes_of(*overrides):
        with torch.no_grad():
            return listening_test(cfg_for(tmp_path, *MICRO_CLAP, *overrides), base,
                                  {"aesthetics": tuned}, codec, text_encoder, "cpu", chunk=4)[0]
    stopped = votes_of(f"benchmark.listen_pairs={need}")
    assert stopped["heard"] % 4 == 0 and (stopped["decisive"] >= need or stopped["heard"] == 16)
    fixed = votes_of(f"benchmark.listen_prompts={stopped['heard']}")
    assert (fixed["wins"], fixed["decisive"]) == (stopped["wins"], stopped["decisive"])
    if stopped["heard"] > 4:
        assert votes_of(f"benchmark.listen_prompts={stopped['heard'] - 4}")["decisive"] < need
    accuracy = report["listener_accuracy"]
    assert set(accuracy) == {"as rendered", "codec round trip"}
    assert set(accuracy["as rendered"]) == {"hiss", "dropout", "clipping", "register", "dynamics"}

    text = open(tmp_path / "benchmark.md").read()
    for needle in ("Average win rate over the 3 target rewards", "| trained on |", "Fig. 7",
                   "The D+ table", "The listening test", "253 / 420", "tuned only / base only",
                   "register accuracy", "Wall time: "):
        assert needle in text, needle
    for name in ("benchmark.png", "benchmark_radar.png", "benchmark_fig3_fig7.png"):
        assert os.path.isfile(tmp_path / name), name
