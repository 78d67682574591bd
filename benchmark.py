"""The reproduction benchmark at toy scale: one DRAGON run per reward, each against the base model.

    python benchmark.py config.yaml [section.key=value ...]

For every target reward (and the paper's Fig. 2 ablation: DPO vs KTO, paired vs unpaired, on
aesthetics) it fine-tunes the base model with train.py for benchmark.rounds rounds under
out_dir/bench_<name>, then evaluates every fine-tuned model on every reward on held-out prompts
against the base model (same prompts, same noise; eval.py). It prints the target-reward table
next to the paper's 81.45% average win rate, with the cost of a round, and the cross-reward
matrix. Writes out_dir/benchmark.md, benchmark.json, benchmark.png and benchmark_radar.png.
"""
import copy
import json
import os
import resource
import sys
import time

import numpy as np
import torch

from encoders import TextEncoder, make_codec
from eval import evaluate_models, plot_radar, plot_win_rates
from model import load_model
from launch import parse_args, set_key, setup_distributed
from pretrain import pretrain
from rewards import parse_reward
from train import train

PAPER_AVERAGE_WIN_RATE = 0.8145
TARGETS = {   # run name: (the target reward's spec, as in eval.rewards; further train.py overrides)
    "aesthetics": ("aesthetics", {}),
    "clap_score": ("clap_score", {}),
    "fad_song_latent": ("fad_per_song/latent/audio:alim", {}),
    "fad_song_clap": ("fad_per_song/clap/audio:alim", {}),
    "fad_song_text": ("fad_per_song/clap/text:alim", {}),
    "fad_dataset": ("fad_dataset/clap/audio:alim", {"dragon.sets": "greedy"}),
    "vendi": ("vendi/clap", {"dragon.sets": "greedy"}),
}
ABLATIONS = {  # Fig. 2: loss x set construction on aesthetics (dpo + paired is the target run above)
    "aesthetics_kto_paired": ("aesthetics", {"dragon.loss": "kto"}),
    "aesthetics_dpo_unpaired": ("aesthetics", {"dragon.sets": "unpaired"}),
    "aesthetics_kto_unpaired": ("aesthetics", {"dragon.loss": "kto", "dragon.sets": "unpaired"}),
}


def run_config(cfg, name, spec, overrides):
    c = copy.deepcopy(cfg)
    rounds = cfg["benchmark"]["rounds"]          # one held-out evaluation at the end of each run
    fixed = {"dragon.rounds": rounds, "dragon.eval_every": rounds, "dragon.run_name": f"bench_{name}"}
    target = {f"reward.{key}": value for key, value in parse_reward(spec).items()}
    for key, value in {**target, **overrides, **fixed}.items():
        set_key(c, key, value, f"benchmark run {name}")
    return c


def round_costs(log_path, cfg):
    """Median seconds per round in generate / score / update, and model forwards per second
    during generation (demo_steps x 2B forwards for B demonstrations, batched CFG)."""
    entries = [json.loads(line) for line in open(log_path)]
    costs = {k: float(np.median([e[k] for e in entries])) for k in ("t_generate", "t_score", "t_update")}
    dc = cfg["dragon"]
    costs["forwards_per_s"] = dc["demo_steps"] * 2 * (2 * dc["prompts_per_round"]) / costs["t_generate"]
    return costs


def benchmark(cfg, runs=None):
    """Fine-tune one model per run (benchmark.rounds DRAGON rounds each), then evaluate every model
    on every reward on held-out prompts: the target column gives the table, the whole matrix the
    radar chart. A finished run is resumed as finished, so an interrupted benchmark continues."""
    _, _, device = setup_distributed(cfg)
    if not os.path.isfile(os.path.join(cfg["out_dir"], "base.pt")):
        pretrain(cfg)
    runs = runs or {**TARGETS, **ABLATIONS}
    t_start, checkpoints, costs = time.time(), {}, {}
    for i, (name, (spec, overrides)) in enumerate(runs.items()):
        print(f"[{i + 1}/{len(runs)}] {name} ({time.time() - t_start:.0f}s so far)", flush=True)
        c = run_config(cfg, name, spec, overrides)
        t0 = time.time()
        checkpoints[name] = train(c)
        costs[name] = {"train_seconds": time.time() - t0,
                       **round_costs(os.path.join(c["out_dir"], c["dragon"]["run_name"], "log.jsonl"), c)}
    print(f"evaluating {len(runs)} fine-tuned models against the base model", flush=True)
    c = copy.deepcopy(cfg)
    specs = list(dict.fromkeys([*cfg["eval"]["rewards"], *(spec for spec, _ in runs.values())]))
    c["eval"].update(rewards=specs, prompt_sets=["heldout"])
    codec = make_codec(c)
    text_encoder = TextEncoder(c["text_encoder"]["name"], c["text_encoder"]["max_tokens"])
    base = load_model(os.path.join(c["out_dir"], "base.pt"), map_location=device)[0].eval()
    models = {name: load_model(path, map_location=device)[0].eval() for name, path in checkpoints.items()}
    with torch.no_grad():
        matrix = evaluate_models(c, base, models, codec, text_encoder, device)[0]
    rows = []
    for name, (spec, _) in runs.items():
        row = [r for r in matrix if r["model"] == name][specs.index(spec)]     # the run's own target reward
        rows.append({**row, "run": name, "ablation": name in ABLATIONS, **costs[name]})
    report(cfg, rows, matrix, time.time() - t_start)
    return rows


def report(cfg, rows, matrix, seconds):
    """benchmark.md / .json / .png: the target-reward table with round costs, then every run's win
    rate on every reward (how optimising one reward moves the others); the radar draws the targets."""
    targets = [r for r in rows if not r["ablation"]]
    average = float(np.mean([r["win_rate"] for r in targets])) if targets else float("nan")
    lines = ["| run | reward | type | base | fine-tuned | win rate [95% CI] | s/round gen / score / update | "
             "forwards/s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['reward']} | {r['type']} | {r['base']:.4f} | {r['finetuned']:.4f} | "
                     f"{r['win_rate']:.1%} [{r['ci_low']:.1%}, {r['ci_high']:.1%}] | "
                     f"{r['t_generate']:.1f} / {r['t_score']:.1f} / {r['t_update']:.2f} | {r['forwards_per_s']:.0f} |")
    rewards = list(dict.fromkeys(r["reward"] for r in matrix))
    lines += ["", "Win rate against the base model of each run (rows) on every reward (columns):", "",
              "| trained on | " + " | ".join(rewards) + " |", "| --- |" + " --- |" * len(rewards)]
    for model in dict.fromkeys(r["model"] for r in matrix):
        rate = {r["reward"]: r["win_rate"] for r in matrix if r["model"] == model}
        lines.append(f"| {model} | " + " | ".join(f"{rate[k]:.0%}" for k in rewards) + " |")
    peak = f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f} GB (process)"
    if torch.cuda.is_available():
        peak += f", {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GB (GPU)"
    text = "\n".join(lines) + (f"\n\nAverage win rate over the {len(targets)} target rewards: {average:.2%} "
                               f"(paper: {PAPER_AVERAGE_WIN_RATE:.2%} over 20 rewards). Wall time {seconds / 60:.1f} min, "
                               f"{peak}.\n")
    print(text)
    with open(os.path.join(cfg["out_dir"], "benchmark.md"), "w") as f:
        f.write(text)
    with open(os.path.join(cfg["out_dir"], "benchmark.json"), "w") as f:
        json.dump({"rows": rows, "matrix": matrix, "average_win_rate": average, "seconds": seconds}, f, indent=1)
    plot_win_rates(rows, os.path.join(cfg["out_dir"], "benchmark.png"))
    plot_radar([r for r in matrix if r["model"] not in ABLATIONS], os.path.join(cfg["out_dir"], "benchmark_radar.png"))


if __name__ == "__main__":
    benchmark(parse_args(sys.argv[1:]))
