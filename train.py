"""DRAGON fine-tuning: the loop of the paper's Appendix F, step by step.

    python train.py config.yaml [section.key=value ...]
    torchrun --standalone --nproc_per_node=N train.py config.yaml     (NCCL on GPUs, gloo on CPUs)

f_ref is the pre-trained base model (frozen, never updated); f_theta starts as its copy. Each
round: sample prompts -> choose the generator -> generate demonstrations -> decode/encode as the
reward needs -> score -> build D+ and D- -> DPO/KTO loss -> backward -> clip -> Adam -> log.
Under torchrun each rank generates its share of the demonstrations; rewards and set construction
run on the gathered global batch (set rewards need the whole set); each rank computes the loss
on its share of D+/D-, and DDP averages the gradients.
"""
import copy
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data import TextEncoder, check_finite, listen, listening_summary, make_codec, prompt_set, write_wav
from dragon import Sets, build_sets, dpo_loss, kto_loss, pair_up, per_example_errors, rank_shard
from model import drop_condition, load_checkpoint, load_model, sample_sigma, save_atomic, save_model
from pretrain import autocast, log, parse_args, pretrain, setup_distributed, use_bf16
from sampler import generate_latents
from rewards import build_reward

CHOICES = {"loss": ("dpo", "kto"), "sets": ("paired", "unpaired", "greedy", "loo", "set_vs_set"),
           "lr_schedule": ("constant", "linear")}


def check_dragon_config(cfg, reward):
    dc = cfg["dragon"]
    for key, allowed in CHOICES.items():
        if dc[key] not in allowed:
            raise ValueError(f"dragon.{key}={dc[key]!r}: allowed values are {list(allowed)}")
    if reward.is_set and dc["sets"] in ("paired", "unpaired"):
        raise ValueError(f"dragon.sets={dc['sets']!r} needs a per-example reward, but {reward.name} scores sets: "
                         f"use greedy, loo or set_vs_set")
    if not reward.is_set and dc["sets"] in ("greedy", "loo", "set_vs_set"):
        raise ValueError(f"dragon.sets={dc['sets']!r} is for set rewards; {reward.name} is {reward.type}: "
                         f"use paired or unpaired")
    if not 0 <= dc["p_ref"] <= 1:
        raise ValueError(f"dragon.p_ref must be in [0, 1], got {dc['p_ref']}")
    for key in ("beta", "kto_beta", "lr"):
        if not dc[key] > 0:
            raise ValueError(f"dragon.{key} must be positive, got {dc[key]}")


def lr_at(rnd, dc):
    """The learning rate of round rnd: constant (paper), or falling linearly to 0 at the last round."""
    return dc["lr"] * (1 - rnd / dc["rounds"] if dc["lr_schedule"] == "linear" else 1.0)


def round_generator(seed, rnd, salt=0):
    """Everything random in a round comes from (seed, round): identical on every rank, and a
    resumed run draws exactly what the uninterrupted run drew."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rnd, salt]).generate_state(1)[0]))


def gather(x, world):
    """Concatenate every rank's tensor along dim 0 (ranks hold rank_shard-sized pieces)."""
    if world == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    biggest = int(max(s.item() for s in sizes))
    padded = torch.zeros((biggest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def generate_demos(generator_model, prompts, seeds, T, text_encoder, sampler_cfg, device, rank, world, bf16=False):
    """Demonstrations for the global batch: each rank samples its shard, then all ranks gather."""
    shard = rank_shard(len(prompts), rank, world)
    mine = generate_latents(generator_model, prompts[shard], seeds[shard], T, text_encoder, sampler_cfg, device,
                            batch=len(prompts), bf16=bf16)
    return gather(mine.to(device), world).cpu()


def dragon_update(model, train_model, ref_model, opt, latents, text, mask, sets, cfg, g, rank, world, device):
    """Appendix F, loss -> backward -> clip -> Adam on this rank's share of D+ / D-.

    sigma, noise and condition dropout are drawn for the whole global batch from the round's
    generator (pairs share them, for DPO and KTO alike), then sliced, so any number of ranks gives
    the same update."""
    dc, C_T = cfg["dragon"], latents.shape[1:]
    if dc["loss"] == "dpo":
        sets = pair_up(sets, g)                                        # DPO needs pairs
    if dc["sigma_draws"] > 1:                                          # each pair / example at several sigma, noise
        sets = Sets(sets.pos.repeat(dc["sigma_draws"]), sets.neg.repeat(dc["sigma_draws"]), sets.paired)
    K = len(sets.pos) if sets.paired else len(sets.pos) + len(sets.neg)   # one sigma / noise per pair or example
    sigma = sample_sigma(K, cfg["pretrain"]["P_mean"], cfg["pretrain"]["P_std"], g)   # the training log-normal
    noise = torch.randn((K, *C_T), generator=g)
    keep = drop_condition(torch.ones(K, 1, dtype=torch.bool), dc["cond_dropout"], g)[:, 0]
    s = rank_shard(K, rank, world)
    if sets.paired:                                                    # x+ and x- of a pair: same sigma, noise
        idx = torch.cat([sets.pos[s], sets.neg[s]])
        labels = torch.arange(len(idx)) < len(idx) // 2
        sig, nz, kp = sigma[s].repeat(2), noise[s].repeat(2, 1, 1), keep[s].repeat(2)
    else:
        idx, labels = torch.cat([sets.pos, sets.neg])[s], (torch.arange(K) < len(sets.pos))[s]
        sig, nz, kp = sigma[s], noise[s], keep[s]
    x0 = latents[idx].to(device)
    c, m = text[idx].to(device), (mask[idx] & kp[:, None]).to(device)   # 10% condition dropout
    with autocast(device, dc["loss_bf16"]):       # float32 by default: A_theta is a small difference of two errors
        e_theta, e_ref = per_example_errors(train_model, ref_model, x0, c, m, sig.to(device), nz.to(device))
    e_theta, e_ref = e_theta.float(), e_ref.float()
    if dc["loss"] == "dpo":                                            # Eq. (6)
        n = len(idx) // 2
        loss, metrics = dpo_loss(e_theta[:n], e_ref[:n], e_theta[n:], e_ref[n:], dc["beta"], dc["kappa"],
                                 normalizer=K / world)
    else:                                                              # Eq. (8)
        loss, metrics = kto_loss(e_theta, e_ref, labels.to(device), dc["kto_beta"], dc["kto_w_pos"],
                                 dc["kto_w_neg"], normalizer=(2 * K if sets.paired else K) / world)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"DRAGON loss is {loss.item()}; the last good checkpoint is kept")
    opt.zero_grad(set_to_none=True)
    loss.backward()                                                    # DDP averages gradients
    metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), dc["grad_clip"]).item()  # clip 45
    opt.step()                                                         # Adam
    metrics["loss"] = loss.item() / world      # world = 1: the mean loss; else this rank's share
    return metrics


def score(reward, latents, prompts):
    """Per-example rewards [B] for instance-type rewards; for set rewards the function r(members)."""
    features = reward.features(latents, prompts)
    if reward.is_set:
        return reward.set_scorer(features)
    r = reward.score(features, prompts).double()
    check_finite_rewards(r, reward.name)
    return r


def check_finite_rewards(r, name):
    """A NaN reward stops the run; the last resumable checkpoint (dragon_state.pt) is kept."""
    check_finite(r, f"reward {name} (the last good checkpoint is kept)", "examples", FloatingPointError)


@torch.no_grad()
def evaluate(model, reward, codec, prompts, seeds, T, text_encoder, cfg, device, rank, world, bf16):
    """Fresh samples on held-out prompts with fixed seeds and the inference sampler: per-prompt
    rewards (instance types) or the set value, the latents, and what a listener would notice
    (data.listen: loudness, clipping, hiss, dropouts, the prompt's register)."""
    latents = generate_demos(model, prompts, seeds, T, text_encoder, cfg["sampler"], device, rank, world, bf16)
    r = score(reward, latents, prompts)
    listening = listening_summary(listen(codec.decode(latents), codec.sample_rate, prompts))
    return (r if not callable(r) else r(torch.arange(len(prompts)))), latents, listening


def fmt(listening):
    return ", ".join(f"{k} {v:.3f}" for k, v in listening.items())


def summary(values):
    return float(values.mean()) if torch.is_tensor(values) else float(values)


def win_rate(ft, base):
    """Share of prompts where the fine-tuned sample beats the base sample (ties count 1/2)."""
    return float(((ft > base).double() + 0.5 * (ft == base).double()).mean())


def train(cfg):
    rank, world, device = setup_distributed(cfg)
    dc, out = cfg["dragon"], cfg["out_dir"]
    run_dir = os.path.join(out, dc["run_name"])
    base_path = os.path.join(out, "base.pt")
    if not os.path.isfile(base_path):
        log(rank, f"no base model at {base_path}: pre-training it first (what pretrain.py does)")
        pretrain(cfg)
    codec = make_codec(cfg)
    text_encoder = TextEncoder(cfg["text_encoder"]["name"], cfg["text_encoder"]["max_tokens"])
    if rank != 0:
        dist.barrier()          # rank 0 fits the reward models once and caches them in out_dir/rewards ...
    reward = build_reward(cfg, codec, text_encoder, rank)
    if rank == 0 and world > 1:
        dist.barrier()          # ... then the other ranks load them
    check_dragon_config(cfg, reward)

    ref_model = load_model(base_path, map_location=device)[0].eval().requires_grad_(False)   # f_ref: frozen
    model = copy.deepcopy(ref_model).train().requires_grad_(True)                               # f_theta
    model.grad_checkpointing = dc["grad_checkpointing"]
    opt = torch.optim.Adam(model.parameters(), lr=dc["lr"])
    state_path, log_path = os.path.join(run_dir, "dragon_state.pt"), os.path.join(run_dir, "log.jsonl")
    os.makedirs(run_dir, exist_ok=True)
    start = 0
    if dc["resume"] and os.path.isfile(state_path):
        state = load_checkpoint(state_path, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["round"]
        log(rank, f"resumed {state_path} at round {start}")
    elif rank == 0 and os.path.isfile(log_path):
        os.remove(log_path)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    train_prompts = prompt_set(cfg["data"], "train")
    eval_prompts = prompt_set(cfg["data"], "heldout")[: dc["n_eval"]]
    eval_seeds = [10_000 + i for i in range(len(eval_prompts))]
    T = codec.latent_length(int(cfg["data"]["sample_rate"] * cfg["data"]["clip_seconds"]))
    demo_sampler = dict(cfg["sampler"], steps=dc["demo_steps"] or cfg["sampler"]["steps"])   # paper: the inference sampler
    bf16 = use_bf16(dc, device)
    P = dc["prompts_per_round"]
    pairs = torch.stack([torch.arange(P), torch.arange(P) + P], dim=1)   # two seeds per prompt

    def held_out(generator_model):
        return evaluate(generator_model, reward, codec, eval_prompts, eval_seeds, T, text_encoder, cfg, device,
                        rank, world, bf16)
    base_eval, base_latents, base_listening = held_out(ref_model)
    log(rank, f"DRAGON on {reward.name} ({reward.type}), {dc['loss'].upper()}, sets={dc['sets']}: "
              f"base model held-out reward {summary(base_eval):.4f}; listening {fmt(base_listening)}")

    def save_state(rnd):
        if rank == 0:
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "round": rnd,
                         "model_config": cfg["model"]}, state_path)

    bar = tqdm(total=dc["rounds"], initial=start, desc=f"DRAGON {reward.name}", disable=rank != 0, dynamic_ncols=True)
    completed = start                                                    # rounds whose update is applied
    try:
        for rnd in range(start, dc["rounds"]):
            g = round_generator(cfg["seed"], rnd)
            for group in opt.param_groups:
                group["lr"] = lr_at(rnd, dc)
            t0 = time.time()
            # F1: sample prompts
            prompts = [train_prompts[i] for i in torch.randint(len(train_prompts), (P,), generator=g).tolist()]
            demo_prompts = prompts + prompts
            seeds = torch.randint(2 ** 31, (2 * P,), generator=g).tolist()
            # F2: choose the generator: f_ref with probability p_ref, else f_theta
            use_ref = torch.rand(1, generator=g).item() < dc["p_ref"]
            # F3: generate demonstrations (no grad, batched CFG)
            model.eval()
            latents = generate_demos(ref_model if use_ref else model, demo_prompts, seeds, T, text_encoder,
                                     demo_sampler, device, rank, world, bf16)
            model.train()
            t1 = time.time()
            # F4-F5: decode / encode as the reward needs, and score
            scored = score(reward, latents, demo_prompts)
            # F6: build D+ and D-
            if reward.is_set:
                sets = build_sets(dc["sets"], pairs, set_reward=scored, generator=g)
                r_pos, r_neg = scored(sets.pos), scored(sets.neg)
                r_mean = scored(torch.arange(2 * P))
                check_finite_rewards(torch.tensor([r_pos, r_neg, r_mean]), reward.name)
            else:
                sets = build_sets(dc["sets"], pairs, rewards=scored, generator=g)
                r_pos, r_neg, r_mean = scored[sets.pos].mean().item(), scored[sets.neg].mean().item(), scored.mean().item()
            t2 = time.time()
            # F7-F9: DPO / KTO loss -> backward -> clip grad norm (45) -> Adam
            text, mask = text_encoder(demo_prompts)
            for _ in range(dc["updates_per_round"]):                  # paper: 1; each a fresh sigma / noise draw
                metrics = dragon_update(model, train_model, ref_model, opt, latents, text, mask, sets, cfg, g,
                                        rank, world, device)
            completed = rnd + 1
            t3 = time.time()
            # F10: log
            entry = {"round": rnd + 1, "generator": "ref" if use_ref else "theta", "reward": r_mean,
                     "reward_pos": r_pos, "reward_neg": r_neg, "n_pos": len(sets.pos), "n_neg": len(sets.neg),
                     **metrics, "t_generate": t1 - t0, "t_score": t2 - t1, "t_update": t3 - t2}
            if (rnd + 1) % dc["eval_every"] == 0 or rnd + 1 == dc["rounds"]:
                ft_eval, ft_latents, listening = held_out(model.eval())
                model.train()
                entry["eval_reward"] = summary(ft_eval)
                entry["eval_reward_base"] = summary(base_eval)
                if torch.is_tensor(ft_eval):
                    entry["eval_win_rate"] = win_rate(ft_eval, base_eval)
                entry["eval_listening"], entry["eval_listening_base"] = listening, base_listening
                if rank == 0:
                    write_samples(codec, ft_latents[: dc["n_wav"]], cfg, run_dir, rnd + 1)
            if (rnd + 1) % dc["ckpt_every"] == 0 or rnd + 1 == dc["rounds"]:
                save_state(rnd + 1)
            if rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
            bar.update(1)
            bar.set_postfix(r=f"{r_mean:.3f}", acc=f"{metrics['implicit_acc']:.2f}",
                            **({"eval": f"{entry['eval_reward']:.3f}"} if "eval_reward" in entry else {}))
    except KeyboardInterrupt:
        save_state(completed)
        log(rank, f"interrupted: saved round {completed} to {state_path}; run the same command to resume")
        return None
    bar.close()
    if rank == 0:
        save_model(os.path.join(run_dir, "dragon.pt"), model, rounds=dc["rounds"], reward=reward.name)
        plot_log(log_path, os.path.join(run_dir, "reward_curve.png"), reward.name)
        last = [json.loads(line) for line in open(log_path)][-1]
        log(rank, f"done: held-out {reward.name} {last['eval_reward_base']:.4f} (base) -> {last['eval_reward']:.4f}"
                  + (f", win rate {last['eval_win_rate']:.1%}" if "eval_win_rate" in last else "")
                  + f"; listening {fmt(last['eval_listening'])} (base: {fmt(last['eval_listening_base'])})"
                  + f"; checkpoint {os.path.join(run_dir, 'dragon.pt')}")
    if world > 1:
        dist.barrier()
    return os.path.join(run_dir, "dragon.pt")


def write_samples(codec, latents, cfg, run_dir, rnd):
    audio = codec.decode(latents)
    for i, a in enumerate(audio):
        write_wav(os.path.join(run_dir, "samples", f"round{rnd:04d}_{i:02d}.wav"), a, cfg["data"]["sample_rate"])


def plot_log(log_path, png_path, name):
    """Left: the reward of the demonstrations per round and of held-out samples at each evaluation.
    Right: the held-out win rate against the base model (same prompts, same noise)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    entries = [json.loads(line) for line in open(log_path)]
    ev = [e for e in entries if "eval_reward" in e]
    fig, (ax, ax_win) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax.plot([e["round"] for e in entries], [e["reward"] for e in entries], alpha=0.4, label="demonstrations")
    ax.plot([0] + [e["round"] for e in ev], [ev[0]["eval_reward_base"]] + [e["eval_reward"] for e in ev], "o-",
            label="held-out prompts")
    ax.set_xlabel("DRAGON round")
    ax.set_ylabel(name)
    ax.legend()
    wins = [e for e in ev if "eval_win_rate" in e]
    ax_win.plot([0] + [e["round"] for e in wins], [50] + [100 * e["eval_win_rate"] for e in wins], "o-", color="tab:green")
    ax_win.axhline(50, color="gray", ls="--", lw=1)
    ax_win.set_ylim(0, 100)
    ax_win.set_xlabel("DRAGON round")
    ax_win.set_ylabel("held-out win rate vs base (%)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    train(parse_args(sys.argv[1:]))
