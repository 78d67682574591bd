"""Evaluation: the fine-tuned model against the base model, reward by reward.

    python eval.py config.yaml [eval.checkpoint=PATH] [section.key=value ...]

Both models generate from the same prompts with the same initial noise per prompt (seeded by
the prompt's index), on each evaluation prompt set (held-out captions, user prompts), with the
full inference sampler. For every reward in `eval.rewards`: the value for both models and the
fine-tuned model's win rate with a 95% bootstrap interval (per prompt for instance-type rewards,
ties count 1/2; over random prompt subsets for set rewards), and what a listener would notice in
the same samples of both models (listen.listen: loudness, clipping, hiss, dropouts, the prompt's
pitch register and dynamics), so that a reward gain bought by worse audio shows; and the paper's
listening test with that listener as the voter (listen.preference on each pair of clips, ties
dropped, human_study_stats on the votes). Writes eval.md, eval.json, win_rates.png, radar.png and
base-vs-fine-tuned WAV pairs next to the checkpoint.
"""
import json
import os
import sys

import numpy as np
import scipy.stats
import torch

from data import cycled, prompt_set, write_wav
from encoders import clip_latent_length, make_codec, make_text_encoder
from listen import listen, listening_summary, paired_changes, preference
from model import load_model
from launch import EVAL_SEED, gather, parse_args, rank_shard, setup_distributed, use_bf16
from sampler import generate_latents
from rewards import build_reward_from_spec


def human_study_stats(wins, n):
    """Paired-preference votes: win rate, exact one-sided binomial p-value for H0: rate = 1/2,
    one-sided 95% Clopper-Pearson lower bound, and P(rate > 1/2) under a uniform Beta(1, 1)
    prior."""
    if not 0 <= wins <= n or n < 1:
        raise ValueError(f"need 0 <= wins <= n and n >= 1, got wins={wins}, n={n}")
    return {"win_rate": wins / n,
            "lower_bound": (float(scipy.stats.beta.ppf(0.05, wins, n - wins + 1)) if wins > 0
                            else 0.0),
            "p_value": float(scipy.stats.binom.sf(wins - 1, n, 0.5)),
            "posterior": float(scipy.stats.beta.sf(0.5, wins + 1, n - wins + 1))}


def win_rate(rewards_finetuned, rewards_base, n_boot=2000, seed=0):
    """Per-prompt win rate of paired rewards (ties 1/2) and its 95% percentile-bootstrap interval
    over prompts: (rate, ci_low, ci_high)."""
    ft, base = np.asarray(rewards_finetuned, dtype=float), np.asarray(rewards_base, dtype=float)
    if ft.shape != base.shape or ft.ndim != 1 or len(ft) == 0:
        raise ValueError(f"win_rate needs two equal-length 1-D reward vectors, got {ft.shape} and "
                         f"{base.shape}")
    wins = (ft > base) + 0.5 * (ft == base)
    boot = np.random.default_rng(seed).choice(wins, size=(n_boot, len(wins))).mean(axis=1)
    return float(wins.mean()), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def set_win_rate(set_reward_ft, set_reward_base, n, n_halves=200, n_boot=100, halves_per_boot=10,
                 seed=0):
    """Set rewards score a whole set, not a prompt. The fine-tuned model wins a subset of prompts
    when its set reward on them beats the base model's on the same prompts (ties 1/2); the win rate
    is over random halves of the n prompts. The 95% interval bootstraps the prompts themselves (n
    drawn with replacement, then halves of that resample's distinct prompts, all of them when fewer
    than n // 2), so it covers which prompts were evaluated, not only which halves were drawn. A
    half never holds a clip twice, as no real half does: a repeated clip shrinks a set's effective
    size, which makes its FAD noisier and pulls every bootstrap win rate toward 1/2. The same seed
    draws the same subsets for every model, so a memoized set_reward_base (remembered) is computed
    once. set_reward_ft / set_reward_base score a batch of subsets, members [K, m] -> [K], as
    Scores.of does. Returns (rate, ci_low, ci_high)."""
    rng = np.random.default_rng(seed)

    def rate(prompts, draws):
        size = min(n // 2, len(prompts))
        subsets = torch.from_numpy(np.stack([rng.choice(prompts, size=size, replace=False)
                                             for _ in range(draws)]))
        # [draws] rewards of each model, one batched call each
        a, b = np.asarray(set_reward_ft(subsets)), np.asarray(set_reward_base(subsets))
        return float(np.mean((a > b) + 0.5 * (a == b)))
    boot = [rate(np.unique(rng.choice(n, size=n)), halves_per_boot) for _ in range(n_boot)]
    low, high = np.percentile(boot, [2.5, 97.5])
    return rate(np.arange(n), n_halves), float(low), float(high)


def remembered(set_reward):
    """set_reward(members), computed once per distinct member set (or batch of sets)."""
    cache = {}

    def of(members):
        key = (tuple(members.shape), tuple(members.flatten().tolist()))
        if key not in cache:
            cache[key] = set_reward(members)
        return cache[key]
    return of


N_WAV = 4    # base / fine-tuned WAV pairs written


@torch.no_grad()
def held_out(model, prompts, seeds, cfg, codec, text_encoder, reward, device, rank=0, world=1):
    """train.py's check (F10): the model's samples for the held-out prompts with fixed seeds and the
    inference sampler, each rank generating, decoding and encoding its shard: their Scores, the
    set's reward (value), the audio, and what the listener hears in it (listen.listen)."""
    model.eval()
    latents = generate_latents(model, prompts, seeds, clip_latent_length(codec, cfg["data"]),
                               text_encoder, cfg["sampler"], device,
                               bf16=use_bf16(cfg["dragon"], device), rank=rank, world=world)
    s = rank_shard(len(latents), rank, world)
    audio = codec.decode(latents[s])
    features = gather(reward.features(latents[s], prompts[s], audio), world)
    audio = gather(audio, world)
    scores = reward.scores(features, prompts)
    return {"scores": scores, "value": scores.of(torch.arange(len(latents))), "audio": audio,
            "listening": listening_summary(listen(audio, codec.sample_rate, prompts))}


def plot_reward_curve(log_path, png_path, name):
    """Left: the reward of the demonstrations per round and of held-out samples at each evaluation.
    Right: the held-out win rate against the base model (same prompts, same noise), with its 95%
    bootstrap interval over prompts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    entries = [json.loads(line) for line in open(log_path)]
    ev = [e for e in entries if "eval_reward" in e]
    fig, (ax, ax_win) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax.plot([e["round"] for e in entries], [e["reward"] for e in entries], alpha=0.4,
            label="demonstrations")
    # rounds f_ref generated (F2, probability p_ref)
    ref = [e for e in entries if e.get("generator") == "ref"]
    if ref:
        ax.plot([e["round"] for e in ref], [e["reward"] for e in ref], "x", color="tab:blue",
                label="… by f_ref")
    if ev:
        ax.plot([0] + [e["round"] for e in ev], [ev[0]["eval_reward_base"]]
                + [e["eval_reward"] for e in ev], "o-", label="held-out prompts")
    ax.set_xlabel("DRAGON round")
    ax.set_ylabel(name)
    ax.legend()
    wins = [e for e in ev if "eval_win_rate" in e]
    rate = [100 * e["eval_win_rate"] for e in wins]
    bounds = [[100 * b for b in e.get("eval_win_ci", [e["eval_win_rate"]] * 2)] for e in wins]
    ci = [[r - lo for r, (lo, _) in zip(rate, bounds)],
          [hi - r for r, (_, hi) in zip(rate, bounds)]]
    ax_win.plot([0] + [e["round"] for e in wins], [50] + rate, "-", color="tab:green")
    ax_win.errorbar([e["round"] for e in wins], rate, yerr=ci, fmt="o", color="tab:green",
                    capsize=3, label="95% interval over prompts")
    ax_win.legend(loc="lower right")
    ax_win.axhline(50, color="gray", ls="--", lw=1)
    ax_win.set_ylim(0, 100)
    ax_win.set_xlabel("DRAGON round")
    ax_win.set_ylabel("held-out win rate vs base (%)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def evaluation_prompts(cfg, set_name, n=None):
    """n (default eval.n_prompts) prompts of a prompt set, cycled when the set is smaller, and their
    noise seeds: the same for every model, and each repeat of a prompt with its own noise."""
    n = cfg["eval"]["n_prompts"] if n is None else n
    return cycled(prompt_set(cfg["data"], set_name), n), [EVAL_SEED + i for i in range(n)]


def evaluate_models(cfg, base, finetuned, codec, text_encoder, device):
    """Rows of the metric table, one per (prompt set, reward, fine-tuned model); `finetuned` maps a
    name to a model. Every model's samples are generated and decoded once; its features once per
    encoder (CLAP or latent frames), shared by every reward on that encoder; the base model's set
    rewards on set_win_rate's subsets once, shared by every fine-tuned model."""
    ec = cfg["eval"]
    T = clip_latent_length(codec, cfg["data"])
    rows, latents, audio = [], {}, {}
    for set_name in ec["prompt_sets"]:
        # same noise for every model
        prompts, seeds = evaluation_prompts(cfg, set_name)
        latents[set_name] = {name: generate_latents(m, prompts, seeds, T, text_encoder,
                                                    cfg["sampler"], device,
                                                    bf16=use_bf16(cfg["dragon"], device))
                             for name, m in {"base": base, **finetuned}.items()}
        # decoded once
        audio[set_name] = {name: codec.decode(z) for name, z in latents[set_name].items()}
        # (model, encoder) -> features
        features = {}
        for spec in ec["rewards"]:
            reward = build_reward_from_spec(cfg, spec, codec)
            everyone = torch.arange(len(prompts))
            def scored(name):
                key = (name, reward.encoder)
                if key not in features:
                    features[key] = reward.features(latents[set_name][name], prompts,
                                                    audio[set_name][name])
                return reward.scores(features[key], prompts)
            base_scores = scored("base")
            base_of = remembered(base_scores.of)
            for name in finetuned:
                ft_scores = scored(name)
                v_base, v_ft = base_scores.of(everyone), ft_scores.of(everyone)
                if reward.is_set:
                    rate, lo, hi = set_win_rate(ft_scores.of, base_of, len(prompts))
                else:
                    rate, lo, hi = win_rate(ft_scores.per_example.numpy(),
                                            base_scores.per_example.numpy())
                rows.append({"model": name, "prompts": set_name, "reward": reward.name,
                             "type": reward.type, "base": v_base, "finetuned": v_ft,
                             "win_rate": rate, "ci_low": lo, "ci_high": hi, "n": len(prompts)})
                print(f"{name:14.14s} {set_name:8s} {reward.name:34s} base {v_base:9.4f}  "
                      f"fine-tuned {v_ft:9.4f}  win {rate:6.1%} [{lo:.1%}, {hi:.1%}]", flush=True)
    return rows, latents, audio


def listening_rows(cfg, audio, sample_rate):
    """What a listener would notice (listen.listen), per prompt set and model, from the same samples
    the rewards scored: median RMS, share of samples at full scale, share of clips with hiss or
    dropouts, and how often the measured pitch register matches the prompt's. And the paper's
    listening test by that listener: each fine-tuned clip against the base model's for the same
    prompt and noise (listen.preference), ties dropped, with human_study_stats on the votes."""
    rows, votes = [], []
    for set_name, by_model in audio.items():
        prompts, _ = evaluation_prompts(cfg, set_name)
        reports = {name: listen(a, sample_rate, prompts) for name, a in by_model.items()}
        for name, report in reports.items():
            rows.append({"model": name, "prompts": set_name, **listening_summary(report)})
            if name != "base":
                votes.append(listening_vote(name, set_name, report, reports["base"]))
    return rows, votes


def listening_vote(name, prompts_name, tuned_report, base_report, **extra):
    """One model's listening test against the base model on the same prompts and noise, from the
    listen() reports of both clip sets: its wins, decisive pairs and ties (listen.preference, ties
    dropped), human_study_stats on the decisive pairs, and the clip-by-clip changes
    (listen.paired_changes). `extra` entries (e.g. heard=) follow "prompts"."""
    pref = preference(tuned_report, base_report)
    wins, decisive = int((pref > 0).sum()), int((pref != 0).sum())
    return {"model": name, "prompts": prompts_name, **extra, "wins": wins, "decisive": decisive,
            "ties": len(pref) - decisive,
            **(human_study_stats(wins, decisive) if decisive else {}),
            "changes": paired_changes(tuned_report, base_report)}


def votes_table(votes):
    lines = ["| prompts | model | preferred / decisive pairs (ties) | win rate | p-value "
             "(one-sided) | 95% lower bound |",
             "| --- | --- | --- | --- | --- | --- |"]
    for v in votes:
        stats = (f"{v['win_rate']:.1%} | {v['p_value']:.2g} | {v['lower_bound']:.1%}"
                 if v["decisive"] else "- | - | -")
        lines.append(f"| {v['prompts']} | {v['model']} | {v['wins']} / {v['decisive']} "
                     f"({v['ties']}) | {stats} |")
    return "\n".join(lines)


def changes_table(votes):
    """Per prompt set, clip pairs (same prompt and noise) where only the fine-tuned clip / only the
    base clip has a defect or matches the prompt's attribute, with McNemar's exact two-sided p."""
    names = votes[0]["changes"]
    lines = ["| prompts | model | " + " | ".join(f"{k}: tuned only / base only (p)" for k in names)
             + " |",
             "| --- " * (len(votes[0]["changes"]) + 2) + "|"]
    for v in votes:
        lines.append(f"| {v['prompts']} | {v['model']} | " + " | ".join(
            f"{c['a_only']} / {c['b_only']} ({c['p_value']:.2g})" for c in v["changes"].values())
            + " |")
    return "\n".join(lines)


def listening_table(rows):
    keys = [k for k in rows[0] if k not in ("model", "prompts")]
    lines = ["| prompts | model | " + " | ".join(keys) + " |", "| --- " * (len(keys) + 2) + "|"]
    lines += [f"| {r['prompts']} | {r['model']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |"
              for r in rows]
    return "\n".join(lines)


def markdown_table(rows):
    lines = ["| prompts | reward | type | base | fine-tuned | win rate [95% CI] |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['prompts']} | {r['reward']} | {r['type']} | {r['base']:.4f} | "
                     f"{r['finetuned']:.4f} | {r['win_rate']:.1%} [{r['ci_low']:.1%}, "
                     f"{r['ci_high']:.1%}] |")
    return "\n".join(lines)


def plot_win_rates(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.2))
    labels = [f"{r['reward']} ({r['prompts']})" for r in rows]
    rates = np.array([r["win_rate"] for r in rows]) * 100
    # a set reward's rate (all prompts) may fall outside its interval (resampled halves): no bar
    err = np.array([[max(0.0, r["win_rate"] - r["ci_low"]), max(0.0, r["ci_high"] - r["win_rate"])]
                    for r in rows]).T * 100
    ax.barh(labels, rates, xerr=err, color="tab:blue", alpha=0.8)
    ax.axvline(50, color="gray", ls="--")
    ax.set_xlabel("win rate against the base model (%)")
    ax.set_xlim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_radar(rows, path):
    """A Fig. 1-style radar: one axis per reward, one polygon per (model, prompt set) giving its win
    rate against the base model; the base model itself is the 50% circle."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rewards = list(dict.fromkeys(r["reward"] for r in rows))
    groups = list(dict.fromkeys((r["model"], r["prompts"]) for r in rows))
    angles = np.linspace(0, 2 * np.pi, len(rewards), endpoint=False)
    closed = np.append(angles, angles[0])
    fig, ax = plt.subplots(figsize=(8, 6.5), subplot_kw={"polar": True})
    ax.plot(closed, np.full(len(closed), 50.0), "k--", lw=1, label="base model (50%)")
    several_sets = len({prompts for _, prompts in groups}) > 1
    for model, prompts in groups:
        rate = {r["reward"]: 100 * r["win_rate"] for r in rows
                if (r["model"], r["prompts"]) == (model, prompts)}
        values = [rate.get(k, np.nan) for k in rewards]
        ax.plot(closed, values + values[:1], lw=1.5, marker="o", ms=3,
                label=f"{model} ({prompts})" if several_sets else model)
    ax.set_xticks(angles)
    ax.set_xticklabels(rewards, fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_title("win rate against the base model (%), per evaluation reward", fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.12, 1.0), fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


@torch.no_grad()
def main(cfg):
    _, _, device = setup_distributed(cfg, single="eval.py")
    ec = cfg["eval"]
    ckpt = ec["checkpoint"] or os.path.join(cfg["out_dir"], cfg["dragon"]["run_name"], "dragon.pt")
    out = os.path.dirname(os.path.abspath(ckpt))
    base = load_model(os.path.join(cfg["out_dir"], "base.pt"), map_location=device)[0].eval()
    finetuned = load_model(ckpt, map_location=device)[0].eval()
    codec = make_codec(cfg, device)
    text_encoder = make_text_encoder(cfg, device)
    rows, _, audio = evaluate_models(cfg, base, {"finetuned": finetuned}, codec, text_encoder,
                                     device)
    heard, votes = listening_rows(cfg, audio, codec.sample_rate)
    table = (markdown_table(rows) + "\n\nWhat a listener would notice (same samples):\n\n"
             + listening_table(heard)
             + "\n\nThe listening test (the listener prefers the clip with fewer defects, then the "
               "one matching more of the prompt's register and dynamics; ties dropped):\n\n"
             + votes_table(votes)
             + "\n\nClip by clip (same prompt and noise): pairs where only one of the two clips "
               "has a defect or matches the prompt, with McNemar's exact two-sided p:\n\n"
             + changes_table(votes))
    with open(os.path.join(out, "eval.md"), "w") as f:
        f.write(f"Fine-tuned {ckpt} against the base model\n\n{table}\n")
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump({"rewards": rows, "listening": heard, "listening_test": votes}, f, indent=1)
    plot_win_rates(rows, os.path.join(out, "win_rates.png"))
    plot_radar(rows, os.path.join(out, "radar.png"))
    first = ec["prompt_sets"][0]
    for name in audio[first]:
        for i, a in enumerate(audio[first][name][:N_WAV]):
            write_wav(os.path.join(out, "eval_samples", f"{i:02d}_{name}.wav"), a,
                      cfg["data"]["sample_rate"])
    print(table)
    print(f"wrote {out}/eval.md, eval.json, win_rates.png, radar.png, eval_samples/")
    return rows


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
