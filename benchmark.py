"""The paper's experiments at toy scale, from one command.

    python benchmark.py config.yaml [benchmark.runs=[aesthetics,vendi_clap]] [section.key=value ...]

1. One DRAGON run per target reward configuration the paper names (TARGETS, 16), each fine-tuned
   from the same base model with train.py for benchmark.rounds rounds under out_dir/bench_<name>,
   with the section's demo_steps, prompts_per_round, lr and noise_draws (run overrides win).
2. The paper's ablations: Fig. 2 (DPO vs KTO x paired vs unpaired on aesthetics, ABLATIONS) and
   Fig. 3 (demonstration steps: the aesthetics run with more demonstration steps than the
   benchmark's benchmark.demo_steps, DEMO_STEPS, each evaluated with the inference sampler).
3. Every fine-tuned model evaluated on every reward on the held-out prompts against the base model
   (same prompts, same noise; eval.py): the target table, the cross-reward matrix, the radar chart
   (Fig. 1), and Fig. 7 (the aesthetics run's gain per bin of the base model's score).
4. The D+ table: FAD of one round of the base model's demonstrations, of D+ built with the per-song
   FAD reward and of D+ built with the dataset FAD reward, by both statistics.
5. The listening-test analogue: the listener (listen.py: defects and the prompt's attributes, read
   from the audio alone) votes between the base model and each of the paper's two human-study
   models on held-out prompts until benchmark.listen_pairs decisive pairs, ties dropped,
   human_study_stats on the votes; and
   the listener's own accuracy on corpus clips with known attributes and defects.

benchmark.runs selects runs by name (default: all). A finished run is not retrained, so an
interrupted benchmark continues. Writes out_dir/benchmark.md, benchmark.json, benchmark.png,
benchmark_radar.png and benchmark_fig3_fig7.png, with the wall time of every stage.
"""
import copy
import json
import os
import resource
import sys
import time

import numpy as np
import torch

from data import prompt_set
from encoders import clip_latent_length, make_codec, make_text_encoder
from listen import listen, preference, validate_on_corpus, validation_table
from dragon import build_sets
from eval import changes_table, evaluate_models, evaluation_prompts, human_study_stats, plot_radar
from eval import listening_rows, listening_table, listening_vote, plot_win_rates, win_rate
from model import load_model
from launch import check_dragon_values, parse_args, seeded_generator, set_key, setup_distributed
from launch import use_bf16
from pretrain import base_model
from rewards import build_reward_from_spec, parse_reward
from sampler import generate_latents
from train import sample_prompts, train

PAPER_AVERAGE_WIN_RATE = 0.8145
GREEDY = {"dragon.sets": "greedy"}           # set rewards: D+ / D- by pair swaps
TARGETS = {   # run name: (the target reward's spec, as in eval.rewards; further train.py overrides)
    "aesthetics": ("aesthetics", {}),
    "clap_score": ("clap_score", {"dragon.demo_steps": 40}),   # 40-step demos (RESULTS.md)
    # the paper's VAE-PSFAD-ALIM, at the paper's beta (RESULTS.md: per-song FAD and silent gaps)
    "fad_song_latent_alim": ("fad_per_song/latent/audio:alim", {"dragon.beta": 5000.0}),
    "fad_song_latent_sd": ("fad_per_song/latent/audio:sd", {}),
    # 80 prompts per round: runs differing only in their draws won 66 / 74 / 88% with 40, 77-81%
    "fad_song_clap_alim": ("fad_per_song/clap/audio:alim", {"dragon.prompts_per_round": 80}),
    "fad_song_clap_sd": ("fad_per_song/clap/audio:sd", {}),
    "fad_song_text_alim": ("fad_per_song/clap/text:alim", {}),             # text-only exemplars
    "fad_song_text_sd": ("fad_per_song/clap/text:sd", {}),
    "fad_dataset_latent_alim": ("fad_dataset/latent/audio:alim", GREEDY),
    "fad_dataset_latent_sd": ("fad_dataset/latent/audio:sd", GREEDY),
    "fad_dataset_clap_alim": ("fad_dataset/clap/audio:alim", GREEDY),
    "fad_dataset_clap_sd": ("fad_dataset/clap/audio:sd", GREEDY),
    "fad_dataset_text_alim": ("fad_dataset/clap/text:alim", GREEDY),
    "fad_dataset_text_sd": ("fad_dataset/clap/text:sd", GREEDY),
    # 40-step demos (RESULTS.md)
    "vendi_clap": ("vendi/clap", {**GREEDY, "dragon.demo_steps": 40}),
    "vendi_latent": ("vendi/latent", GREEDY),
}
# Fig. 2: loss x set construction on aesthetics (dpo + paired is the target run above)
ABLATIONS = {
    "aesthetics_kto_paired": ("aesthetics", {"dragon.loss": "kto"}),
    "aesthetics_dpo_unpaired": ("aesthetics", {"dragon.sets": "unpaired"}),
    "aesthetics_kto_unpaired": ("aesthetics", {"dragon.loss": "kto", "dragon.sets": "unpaired"}),
}
# Fig. 3: demonstrations from more sampler steps (every other run uses benchmark.demo_steps)
DEMO_STEPS = {
    "aesthetics_demo20": ("aesthetics", {"dragon.demo_steps": 20}),
    "aesthetics_demo40": ("aesthetics", {"dragon.demo_steps": 40}),
}
ALL_RUNS = {**TARGETS, **ABLATIONS, **DEMO_STEPS}
# DRAGON-Aesthetics, -VAE-PSFAD-ALIM
PAPER_LISTENING_TEST = {"aesthetics": (253, 420), "fad_song_latent_alim": (256, 420)}


def selected_runs(cfg):
    names = cfg["benchmark"]["runs"] or list(ALL_RUNS)
    unknown = [n for n in names if n not in ALL_RUNS]
    if unknown:
        raise ValueError(f"benchmark.runs: unknown run(s) {unknown}; known: {list(ALL_RUNS)}")
    return {n: ALL_RUNS[n] for n in names}


def run_config(cfg, name, spec, overrides):
    c = copy.deepcopy(cfg)
    # no held-out evaluation inside the run: benchmark() evaluates
    bc = cfg["benchmark"]
    fixed = {"dragon.rounds": bc["rounds"], "dragon.n_eval": 0, "dragon.run_name": f"bench_{name}"}
    target = {f"reward.{key}": value for key, value in parse_reward(spec).items()}
    shared = {f"dragon.{key}": bc[key] for key in ("demo_steps", "prompts_per_round", "lr",
                                                    "noise_draws")}
    for key, value in {**target, **shared, **overrides, **fixed}.items():
        set_key(c, key, value, f"benchmark run {name}")
    check_dragon_values(c["dragon"])
    return c


def round_costs(log_path, cfg):
    """Median seconds per round in generate / score / update, and model forwards per second
    during generation (demo_steps x 2B forwards for B demonstrations, batched CFG)."""
    entries = [json.loads(line) for line in open(log_path)]
    costs = {k: float(np.median([e[k] for e in entries]))
             for k in ("t_generate", "t_score", "t_update")}
    dc = cfg["dragon"]
    steps = dc["demo_steps"] or cfg["sampler"]["steps"]
    costs["forwards_per_s"] = steps * 2 * (2 * dc["prompts_per_round"]) / costs["t_generate"]
    return costs


def benchmark(cfg, runs=None):
    """Everything in the module docstring; `runs` (name -> (spec, overrides)) overrides
    benchmark.runs."""
    _, _, device = setup_distributed(cfg, single="benchmark.py")
    t_start, seconds = time.time(), {}
    # pre-trained first when missing
    base = load_model(base_model(cfg), map_location=device)[0].eval()
    seconds["pre-training"] = time.time() - t_start
    runs = runs or selected_runs(cfg)
    codec = make_codec(cfg, device)
    text_encoder = make_text_encoder(cfg, device)
    checkpoints, costs = {}, {}
    for i, (name, (spec, overrides)) in enumerate(runs.items()):
        print(f"[{i + 1}/{len(runs)}] {name} ({time.time() - t_start:.0f}s so far)", flush=True)
        c = run_config(cfg, name, spec, overrides)
        t0 = time.time()
        # the first run also fits and caches the reward models
        checkpoints[name] = train(c)
        costs[name] = {"train_seconds": time.time() - t0,
                       **round_costs(os.path.join(c["out_dir"], c["dragon"]["run_name"],
                                                  "log.jsonl"), c)}
    seconds["DRAGON runs"] = sum(c["train_seconds"] for c in costs.values())

    t0 = time.time()
    with torch.no_grad():
        dplus = dplus_table(cfg, base, codec, text_encoder, device)
    seconds["D+ table"] = time.time() - t0

    print(f"evaluating {len(runs)} fine-tuned models against the base model", flush=True)
    t0 = time.time()
    c = copy.deepcopy(cfg)
    specs = list(dict.fromkeys([*cfg["eval"]["rewards"], *(spec for spec, _ in runs.values())]))
    c["eval"].update(rewards=specs, prompt_sets=["heldout"])
    models = {name: load_model(path, map_location=device)[0].eval()
              for name, path in checkpoints.items()}
    with torch.no_grad():
        matrix, latents, audio = evaluate_models(c, base, models, codec, text_encoder, device)
        bins = (quality_bins(c, codec, latents["heldout"], audio["heldout"])
                if "aesthetics" in models else [])
        # loudness and defects per model
        heard, _ = listening_rows(c, audio, codec.sample_rate)
    rows = []
    for name, (spec, _) in runs.items():
        # the run's own target reward
        row = [r for r in matrix if r["model"] == name][specs.index(spec)]
        rows.append({**row, "run": name, "group": group_of(name), **costs[name]})
    seconds["evaluation"] = time.time() - t0

    t0 = time.time()
    listeners = [n for n in cfg["benchmark"]["listen_runs"] if n in models]
    with torch.no_grad():
        votes = listening_test(cfg, base, {n: models[n] for n in listeners}, codec, text_encoder,
                               device, audio["heldout"])
        accuracy = (validate_on_corpus(cfg["data"], codec) if cfg["data"]["source"] == "synthetic"
                    else {})
    seconds["listening test"] = time.time() - t0
    seconds["total"] = time.time() - t_start
    report(cfg, rows, matrix, bins, dplus, heard, votes, accuracy, seconds)
    return rows


def group_of(name):
    return "target" if name in TARGETS else "Fig. 2" if name in ABLATIONS else "Fig. 3"


# =============================================================================================
# Fig. 7, the D+ table, the listening test
# =============================================================================================

def quality_bins(cfg, codec, latents, audio, n_bins=3):
    """Fig. 7: the held-out prompts split into thirds by the base model's aesthetics score (low /
    medium / high quality); per third the mean score of both models and the aesthetics run's win
    rate."""
    reward = build_reward_from_spec(cfg, "aesthetics", codec)
    prompts, _ = evaluation_prompts(cfg, "heldout")
    base, ft = (reward.scores(reward.features(latents[n], prompts, audio[n]), prompts).per_example
                for n in ("base", "aesthetics"))
    order = base.argsort()
    rows = []
    for name, members in zip(("low", "medium", "high"), order.tensor_split(n_bins)):
        rate, lo, hi = win_rate(ft[members].numpy(), base[members].numpy())
        rows.append({"bin": name, "prompts": len(members), "base": float(base[members].mean()),
                     "finetuned": float(ft[members].mean()), "win_rate": rate, "ci_low": lo,
                     "ci_high": hi})
    return rows


def dplus_table(cfg, base, codec, text_encoder, device, encoders=("latent", "clap")):
    """The paper's demonstration-set table: one round of the base model's demonstrations (round 1's
    prompts and seeds, F1-F3), D+ built from it with per-song FAD (paired) and with dataset FAD
    (greedy pair swaps), each set scored by both statistics: the mean per-song FAD of its clips and
    its dataset FAD, against the same reference (reward.reference). The demonstration row is D1, the
    first seed of every prompt, so that all three sets have one clip per prompt."""
    dc = cfg["dragon"]
    g = seeded_generator(cfg["seed"], 0)
    prompts, seeds = sample_prompts(prompt_set(cfg["data"], "train"), dc["prompts_per_round"], g)
    T = clip_latent_length(codec, cfg["data"])
    sampler_cfg = dict(cfg["sampler"], steps=cfg["benchmark"]["demo_steps"]
                       or cfg["sampler"]["steps"])
    latents = generate_latents(base, prompts, seeds, T, text_encoder, sampler_cfg, device,
                               bf16=use_bf16(dc, device))
    audio = codec.decode(latents)
    P = dc["prompts_per_round"]
    pairs = torch.stack([torch.arange(P), torch.arange(P) + P], dim=1)
    rows = []
    for encoder in encoders:
        rewards = {}
        for kind in ("fad_per_song", "fad_dataset"):
            reward = build_reward_from_spec(cfg, f"{kind}/{encoder}", codec)
            rewards[kind] = reward.scores(reward.features(latents, prompts, audio), prompts)
        song, dataset = rewards["fad_per_song"], rewards["fad_dataset"]
        sets = {"demonstrations (D1)": pairs[:, 0],
                "D+ by per-song FAD": build_sets("paired", pairs, song.per_example).pos,
                "D+ by dataset FAD": build_sets("greedy", pairs, set_reward=dataset.of,
                                                generator=g).pos}
        for name, members in sets.items():         # rewards are -FAD: report FAD
            rows.append({"encoder": encoder, "reference": cfg["reward"]["reference"], "set": name,
                         "clips": len(members), "per_song_fad": -song.of(members),
                         "dataset_fad": -dataset.of(members)})
    return rows


def listening_test(cfg, base, models, codec, text_encoder, device, evaluated=None, chunk=128):
    """The paper's human study with the listener as the voter: the base model and each model on
    held-out prompts (cycled, with new seeds), same noise; the listener's preference per pair
    (listen.preference), ties dropped; human_study_stats on the votes. Prompts are heard `chunk` at
    a time until each model has benchmark.listen_pairs decisive pairs (the paper's 420), at most
    benchmark.listen_prompts: the stopping rule looks only at how many pairs were decisive, never
    at who won them, so the wins stay binomial given the decisive count and the test is exact.
    The prompts and seeds start as the evaluation's (eval.py), so the clips it decoded
    (`evaluated`: model name -> audio) are not generated again."""
    n, need = cfg["benchmark"]["listen_prompts"], cfg["benchmark"]["listen_pairs"]
    if not models or not n:
        return []
    # eval.py's prompts and seeds, and more
    prompts, seeds = evaluation_prompts(cfg, "heldout", n)
    T = clip_latent_length(codec, cfg["data"])

    def heard(name, model, a, b):                      # listen() report of prompts[a:b]
        clips = (evaluated or {}).get(name)
        k = 0 if clips is None else max(0, min(len(clips), b) - a)
        parts = [clips[a:a + k]] if k else []
        if a + k < b:
            parts.append(codec.decode(generate_latents(model, prompts[a + k:b], seeds[a + k:b], T,
                                                       text_encoder, cfg["sampler"], device,
                                                       bf16=use_bf16(cfg["dragon"], device))))
        return listen(torch.cat(parts), codec.sample_rate, prompts[a:b])

    # the first m clips of a list of listen() reports
    def joined(reports, m):
        return {key: torch.cat([r[key] for r in reports])[:m] for key in reports[0]}
    reports = {name: [] for name in ["base", *models]}
    decisive = dict.fromkeys(models, 0)
    for a in range(0, n, chunk):
        b, todo = min(a + chunk, n), [name for name in models if decisive[name] < need]
        if not todo:
            break
        reports["base"].append(heard("base", base, a, b))
        for name in todo:
            reports[name].append(heard(name, models[name], a, b))
            decisive[name] += int((preference(reports[name][-1], reports["base"][-1]) != 0).sum())
    votes = []
    for name in models:
        m = sum(len(r["rms"]) for r in reports[name])
        tuned, reference = joined(reports[name], m), joined(reports["base"], m)
        votes.append(listening_vote(name, "heldout", tuned, reference, heard=m))
    return votes


# =============================================================================================
# The report
# =============================================================================================

def report(cfg, rows, matrix, bins, dplus, heard, votes, accuracy, seconds):
    """benchmark.md / .json / .png: the tables in the paper's shape, with costs and wall times."""
    targets = [r for r in rows if r["group"] == "target"]
    average = float(np.mean([r["win_rate"] for r in targets])) if targets else float("nan")
    lines = ["| run | group | reward | type | base | fine-tuned | win rate [95% CI] | "
             "s/round gen / score / update | forwards/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['group']} | {r['reward']} | {r['type']} | {r['base']:.4f} "
                     f"| {r['finetuned']:.4f} | {r['win_rate']:.1%} [{r['ci_low']:.1%}, "
                     f"{r['ci_high']:.1%}] | {r['t_generate']:.1f} / {r['t_score']:.1f} / "
                     f"{r['t_update']:.2f} | {r['forwards_per_s']:.0f} |")
    lines += ["", f"Average win rate over the {len(targets)} target rewards: {average:.2%} (paper: "
              f"{PAPER_AVERAGE_WIN_RATE:.2%} over 20 rewards); "
              f"{sum(r['ci_low'] > 0.6 for r in targets)} of {len(targets)} intervals above 60%."]
    rewards = list(dict.fromkeys(r["reward"] for r in matrix))
    lines += ["", "Win rate against the base model of each run (rows) on every reward (columns):",
              "",
              "| trained on | " + " | ".join(rewards) + " |", "| --- |" + " --- |" * len(rewards)]
    for model in dict.fromkeys(r["model"] for r in matrix):
        rate = {r["reward"]: r["win_rate"] for r in matrix if r["model"] == model}
        lines.append(f"| {model} | " + " | ".join(f"{rate[k]:.0%}" for k in rewards) + " |")
    if bins:
        lines += ["", "Fig. 7: the aesthetics run per third of the held-out prompts by the base "
                  "model's score:", "",
                  "| base quality | prompts | base | fine-tuned | win rate [95% CI] |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {b['bin']} | {b['prompts']} | {b['base']:.3f} | {b['finetuned']:.3f} | "
                  f"{b['win_rate']:.1%} [{b['ci_low']:.1%}, {b['ci_high']:.1%}] |" for b in bins]
    lines += ["", "The D+ table: one round of the base model's demonstrations and the positive "
              "sets built from it (FAD, lower is better):", "",
              "| encoder | reference | set | clips | per-song FAD (mean) | dataset FAD |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {d['encoder']} | {d['reference']} | {d['set']} | {d['clips']} | "
              f"{d['per_song_fad']:.4f} | {d['dataset_fad']:.4f} |" for d in dplus]
    lines += ["", "What the listener hears in each model's evaluation clips (the same clips as "
              "the table above):", "", listening_table(heard)]
    if votes:
        lines += ["", "The listening test (held-out prompts until "
                  f"{cfg['benchmark']['listen_pairs']} decisive pairs, at most "
                  f"{cfg['benchmark']['listen_prompts']}; the listener prefers fewer defects, then "
                  "more of the prompt's register and dynamics; ties dropped):", "",
                  "| model | prompts | preferred / decisive (ties) | win rate | p-value | "
                  "95% lower bound | paper |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for v in votes:
            paper = PAPER_LISTENING_TEST.get(v["model"])
            paper = (f"{paper[0]} / {paper[1]} ({paper[0] / paper[1]:.2%}, p = "
                     f"{human_study_stats(*paper)['p_value']:.1e})") if paper else "-"
            stats = (f"{v['win_rate']:.2%} | {v['p_value']:.2g} | {v['lower_bound']:.1%}"
                     if v["decisive"] else "- | - | -")
            lines.append(f"| {v['model']} | {v['heard']} | {v['wins']} / {v['decisive']} "
                         f"({v['ties']}) | {stats} | {paper} |")
        lines += ["", "Clip by clip (same prompt and noise): pairs where only the tuned or only "
                  "the base clip has a defect or matches the prompt, with McNemar's exact "
                  "two-sided p:", "", changes_table(votes)]
    if accuracy:
        lines += ["", "How well the listener hears corpus clips with known defects and attributes:",
                  "", validation_table(accuracy)]
    peak = (f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f} GB "
            "(process)")
    if torch.cuda.is_available():
        peak += f", {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GB (GPU)"
    lines += ["", "Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
              + f"; {peak}."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = cfg["out_dir"]
    with open(os.path.join(out, "benchmark.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "benchmark.json"), "w") as f:
        json.dump({"rows": rows, "matrix": matrix, "average_win_rate": average, "fig7": bins,
                   "dplus": dplus, "listening": heard, "listening_test": votes,
                   "listener_accuracy": accuracy, "seconds": seconds}, f, indent=1)
    plot_win_rates(rows, os.path.join(out, "benchmark.png"))
    plot_radar([r for r in matrix if r["model"] in TARGETS],
               os.path.join(out, "benchmark_radar.png"))
    plot_fig3_fig7(cfg, rows, bins, os.path.join(out, "benchmark_fig3_fig7.png"))


def plot_fig3_fig7(cfg, rows, bins, path):
    """Fig. 3 (win rate against demonstration steps) and Fig. 7 (gain per base-quality bin)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = {"aesthetics": cfg["benchmark"]["demo_steps"] or cfg["sampler"]["steps"],
             **{n: o["dragon.demo_steps"] for n, (_, o) in DEMO_STEPS.items()}}
    fig3 = sorted((steps[r["run"]], r) for r in rows if r["run"] in steps)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    if fig3:
        x = [s for s, _ in fig3]
        y = np.array([r["win_rate"] for _, r in fig3]) * 100
        err = np.array([[r["win_rate"] - r["ci_low"], r["ci_high"] - r["win_rate"]]
                        for _, r in fig3]).T * 100
        a.errorbar(x, y, yerr=err, marker="o", capsize=3)
    a.axhline(50, color="gray", ls="--")
    a.set(xlabel=f"demonstration steps (inference: {cfg['sampler']['steps']})",
          ylabel="aesthetics win rate (%)", ylim=(0, 100), title="Fig. 3: demonstration steps")
    if bins:
        x = np.arange(len(bins))
        a_base, a_ft = [v["base"] for v in bins], [v["finetuned"] for v in bins]
        b.bar(x - 0.2, a_base, 0.4, label="base")
        b.bar(x + 0.2, a_ft, 0.4, label="DRAGON aesthetics")
        b.set_xticks(x, [f"{v['bin']}\n{v['win_rate']:.0%} win" for v in bins])
        b.legend(fontsize=8)
    b.set(xlabel="base model's aesthetics, per third of the prompts", ylabel="aesthetics score",
          title="Fig. 7: where aesthetics helps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    benchmark(parse_args(sys.argv[1:]))
