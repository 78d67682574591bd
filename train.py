"""DRAGON fine-tuning: the loop of the paper's Appendix F, step by step.

    python train.py config.yaml [section.key=value ...]
    torchrun --standalone --nproc_per_node=N train.py config.yaml     (NCCL on GPUs, gloo on CPUs)

f_ref is the pre-trained base model (frozen, never updated); f_theta starts as its copy. Each
round (`train`, one commented line per step): F1 sample prompts -> F2 choose the generator ->
F3 generate demonstrations -> F4 decode/encode as the reward needs -> F5 score -> F6 build D+ and
D- -> F7 DPO/KTO loss -> F8 backward -> F9 clip and Adam -> F10 log. Set-up, the held-out
evaluation and the bookkeeping are named functions around the loop.
Under torchrun each rank generates its share of the demonstrations; rewards and set construction
run on the gathered global batch (set rewards need the whole set); each rank computes the loss
on its share of D+/D-, and DDP averages the gradients.
"""
import copy
import json
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import cycled, prompt_set, write_wav
from encoders import TextEncoder, clip_latent_length, make_codec
from listen import listen, listening_summary
from dragon import A_theta, Sets, build_sets, dpo_loss, kto_loss, kto_reference_point, pair_up, per_example_errors
from dragon import rank_shard
from eval import win_rate
from launch import autocast, log, parse_args, seeded_generator, setup_distributed, use_bf16
from model import drop_condition, load_checkpoint, load_model, sample_sigma, save_atomic, save_model
from pretrain import pretrain
from rewards import build_reward
from sampler import generate_latents

CHOICES = {"loss": ("dpo", "kto"), "sets": ("paired", "unpaired", "greedy", "loo", "set_vs_set"),
           "lr_schedule": ("constant", "linear")}


# =============================================================================================
# The loop
# =============================================================================================

def train(cfg):
    run = set_up(cfg)                        # f_ref, f_theta, Adam, reward, prompts; resumes dragon_state.pt
    dc, P = cfg["dragon"], cfg["dragon"]["prompts_per_round"]
    base = held_out(run, run.ref_model) if dc["n_eval"] else None   # the baseline: f_ref, held-out prompts, same noise
    log(run.rank, f"DRAGON on {run.reward.name} ({run.reward.type}), {dc['loss'].upper()}, sets={dc['sets']}: "
                  + (f"base model held-out reward {base.value:.4f}; listening {fmt(base.listening)}" if base else
                     "no held-out evaluation (dragon.n_eval=0)"))
    bar = tqdm(total=dc["rounds"], initial=run.start, desc=f"DRAGON {run.reward.name}", disable=run.rank != 0,
               dynamic_ncols=True)
    run.completed = run.logged = run.start   # rounds whose update is applied / whose log line is written
    try:
        for rnd in range(run.start, dc["rounds"]):
            g = seeded_generator(cfg["seed"], rnd)          # every random draw of the round
            set_lr(run.opt, lr_at(rnd, dc))
            t0 = time.time()
            # F1: sample prompts, each with two seeds
            prompts, seeds = sample_prompts(run.train_prompts, P, g)
            # F2: f_ref generates the round with probability p_ref, else f_theta
            use_ref = torch.rand(1, generator=g).item() < dc["p_ref"]
            # F3: generate demonstrations with the inference sampler (no grad, batched CFG)
            latents = generate_demos(run, run.ref_model if use_ref else run.model, prompts, seeds, run.demo_sampler)
            t1 = time.time()
            # F4: decode / encode as the reward needs (audio -> CLAP windows, or latent frames)
            features = run.reward.features(latents, prompts)
            # F5: score: per clip for instance rewards, r(S) of any subset for set rewards
            scores = run.reward.scores(features, prompts)
            # F6: build D+ and D-
            sets = build_sets(dc["sets"], run.pairs, scores.per_example, scores.of, g)
            t2 = time.time()
            # F7-F9: DPO / KTO loss -> backward -> clip the gradient norm (45) -> Adam
            text, mask = run.text_encoder(prompts)
            for _ in range(dc["updates_per_round"]):        # paper: 1; each a fresh sigma / noise draw
                metrics = dragon_update(run.model, run.train_model, run.ref_model, run.opt, latents, text, mask,
                                        sets, cfg, g, run.rank, run.world, run.device)
            # F10: log (and every eval_every rounds: held-out evaluation, WAV samples; checkpoints)
            entry = {"round": rnd + 1, "generator": "ref" if use_ref else "theta",
                     "reward": scores.of(torch.arange(2 * P)), "reward_pos": scores.of(sets.pos),
                     "reward_neg": scores.of(sets.neg), "n_pos": len(sets.pos), "n_neg": len(sets.neg), **metrics,
                     "t_generate": t1 - t0, "t_score": t2 - t1, "t_update": time.time() - t2}
            run.completed = rnd + 1
            bookkeeping(run, entry, base, bar)
    except KeyboardInterrupt:
        if run.completed > run.logged:       # stopped in the held-out evaluation: log the round without it
            append_log(run, dict(entry, eval_interrupted=True))
        save_state(run, run.completed)
        log(run.rank, f"interrupted: saved round {run.completed} to {run.state_path}; run the same command to resume")
        return None
    bar.close()
    return finish(run)


# =============================================================================================
# Appendix F steps 3 and 7-9
# =============================================================================================

def sample_prompts(train_prompts, P, g):
    """F1: P training prompts, each twice (prompt i and i + P are a pair), and a noise seed per clip."""
    picks = torch.randint(len(train_prompts), (P,), generator=g).tolist()
    seeds = torch.randint(2 ** 31, (2 * P,), generator=g).tolist()
    return [train_prompts[i] for i in picks] * 2, seeds


def generate_demos(run, generator_model, prompts, seeds, sampler_cfg):
    """F3 for the global batch: each rank samples its shard, then all ranks gather."""
    shard = rank_shard(len(prompts), run.rank, run.world)
    generator_model.eval()
    mine = generate_latents(generator_model, prompts[shard], seeds[shard], run.T, run.text_encoder, sampler_cfg,
                            run.device, batch=len(prompts), bf16=run.bf16)
    run.model.train()
    return gather(mine.to(run.device), run.world).cpu()


def dragon_update(model, train_model, ref_model, opt, latents, text, mask, sets, cfg, g, rank, world, device):
    """F7-F9 on this rank's share of D+ / D-: Eq. (7) A_theta, Eq. (6) or (8), backward, clip, Adam.

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
        is_pos = torch.arange(len(idx)) < len(idx) // 2
        sig, nz, kp = sigma[s].repeat(2), noise[s].repeat(2, 1, 1), keep[s].repeat(2)
    else:
        idx, is_pos = torch.cat([sets.pos, sets.neg])[s], (torch.arange(K) < len(sets.pos))[s]
        sig, nz, kp = sigma[s], noise[s], keep[s]
    x0, c, m = latents[idx].to(device), text[idx].to(device), (mask[idx] & kp[:, None]).to(device)  # 10% dropout
    with autocast(device, dc["loss_bf16"]):       # float32 by default: A_theta is a small difference of two errors
        e_theta, e_ref = per_example_errors(train_model, ref_model, x0, c, m, sig.to(device), nz.to(device))
    e_theta, e_ref, is_pos = e_theta.float(), e_ref.float(), is_pos.to(device)
    A = A_theta(e_theta, e_ref)                                        # Eq. (7)
    if dc["loss"] == "dpo":                                            # Eq. (6), one term per pair
        n = len(idx) // 2
        terms, logits = dpo_loss(A[:n], A[n:], dc["beta"], dc["kappa"])
        n_terms, extra = K, {}
    else:                                                              # Eq. (8), z over the global batch
        z = kto_reference_point(gather(A.detach(), world))
        terms, logits = kto_loss(A, is_pos, dc["kto_beta"], z, dc["kto_w_pos"], dc["kto_w_neg"])
        n_terms, extra = (2 * K if sets.paired else K), {"z": z.item()}
    loss = terms.sum() * world / n_terms          # the global-batch mean: DDP divides the summed gradients by world
    if not torch.isfinite(loss):
        raise FloatingPointError(f"DRAGON loss is {loss.item()}; the last good checkpoint is kept")
    opt.zero_grad(set_to_none=True)
    loss.backward()                                                    # F8 (DDP averages gradients)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), dc["grad_clip"]).item()   # F9: clip at 45 ...
    opt.step()                                                         # ... and Adam
    return {"loss": loss.item() / world, "grad_norm": grad_norm,      # world 1: the mean loss; else this rank's share
            **loss_metrics(A, e_theta, e_ref, is_pos, logits, dc["loss"]), **extra}


def loss_metrics(A, e_theta, e_ref, is_pos, logits, loss_kind):
    """What F10 logs about the update (this rank's share): implicit accuracy (f_theta prefers D+
    over D- relative to f_ref), share of saturated terms (|sigmoid argument| > 5: weight ~0 or ~1),
    mean A_theta and errors on D+ and D-."""
    def mean(x, m):
        return x[m].mean().item() if m.any() else float("nan")
    pos, neg = is_pos, ~is_pos
    correct = logits > 0 if loss_kind == "kto" else (A[pos] < A[neg]).float() + 0.5 * (A[pos] == A[neg]).float()
    return {"implicit_acc": correct.float().mean().item(), "saturated": (logits.detach().abs() > 5).float().mean().item(),
            "A_pos": mean(A, pos), "A_neg": mean(A, neg), "e_theta_pos": mean(e_theta, pos),
            "e_ref_pos": mean(e_ref, pos), "e_theta_neg": mean(e_theta, neg), "e_ref_neg": mean(e_ref, neg)}


# =============================================================================================
# Set-up, held-out evaluation, bookkeeping
# =============================================================================================

def set_up(cfg):
    """Pre-train the base model if there is none; build the codec, text encoder and reward (rank
    0 fits and caches the reward models, the other ranks then load them); f_ref frozen, f_theta
    its copy, Adam; resume dragon_state.pt when there is one."""
    rank, world, device = setup_distributed(cfg)
    dc, out = cfg["dragon"], cfg["out_dir"]
    run = SimpleNamespace(cfg=cfg, rank=rank, world=world, device=device, run_dir=os.path.join(out, dc["run_name"]))
    base_path = os.path.join(out, "base.pt")
    if not os.path.isfile(base_path):
        log(rank, f"no base model at {base_path}: pre-training it first (what pretrain.py does)")
        pretrain(cfg)
    run.codec = make_codec(cfg)
    run.text_encoder = TextEncoder(cfg["text_encoder"]["name"], cfg["text_encoder"]["max_tokens"])
    if rank != 0:
        dist.barrier()
    run.reward = build_reward(cfg, run.codec, rank)
    if rank == 0 and world > 1:
        dist.barrier()
    check_dragon_config(cfg, run.reward)
    run.ref_model = load_model(base_path, map_location=device)[0].eval().requires_grad_(False)   # f_ref: frozen
    run.model = copy.deepcopy(run.ref_model).train().requires_grad_(True)                      # f_theta
    run.model.grad_checkpointing = dc["grad_checkpointing"]
    run.opt = torch.optim.Adam(run.model.parameters(), lr=dc["lr"])
    run.state_path, run.log_path = os.path.join(run.run_dir, "dragon_state.pt"), os.path.join(run.run_dir, "log.jsonl")
    os.makedirs(run.run_dir, exist_ok=True)
    run.start = 0
    if dc["resume"] and os.path.isfile(run.state_path):
        state = load_checkpoint(run.state_path, map_location=device)
        run.model.load_state_dict(state["model"])
        run.opt.load_state_dict(state["optimizer"])
        run.start = state["round"]
        if rank == 0:
            resume_log(run.log_path, run.start)
        log(rank, f"resumed {run.state_path} at round {run.start}")
    elif rank == 0 and os.path.isfile(run.log_path):
        os.remove(run.log_path)
    run.train_model = torch.nn.parallel.DistributedDataParallel(run.model) if world > 1 else run.model
    run.train_prompts = prompt_set(cfg["data"], "train")
    heldout = prompt_set(cfg["data"], "heldout")
    run.eval_prompts = cycled(heldout, dc["n_eval"])                  # new seeds for the repeats when the
    run.eval_seeds = [10_000 + i for i in range(dc["n_eval"])]        # set is smaller
    run.T = clip_latent_length(run.codec, cfg["data"])
    run.demo_sampler = dict(cfg["sampler"], steps=dc["demo_steps"] or cfg["sampler"]["steps"])  # paper: inference sampler
    run.bf16 = use_bf16(dc, device)
    P = dc["prompts_per_round"]
    run.pairs = torch.stack([torch.arange(P), torch.arange(P) + P], dim=1)   # the two seeds of each prompt
    return run


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


def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr


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


@torch.no_grad()
def held_out(run, model):
    """Fresh samples on the held-out prompts with fixed seeds and the inference sampler: their
    Scores, the set's reward (value), the decoded audio, and what a listener would notice (listen.listen:
    loudness, clipping, hiss, dropouts, the prompt's register)."""
    latents = generate_demos(run, model, run.eval_prompts, run.eval_seeds, run.cfg["sampler"])
    audio = run.codec.decode(latents)
    scores = run.reward.scores(run.reward.features(latents, run.eval_prompts, audio), run.eval_prompts)
    listening = listening_summary(listen(audio, run.codec.sample_rate, run.eval_prompts))
    return SimpleNamespace(scores=scores, value=scores.of(torch.arange(len(latents))), audio=audio,
                           listening=listening)


def bookkeeping(run, entry, base, bar):
    """F10: every dragon.eval_every rounds the held-out evaluation against the base model (win
    rate per prompt, ties 1/2, with its 95% bootstrap interval) and WAV samples; checkpoints every
    dragon.ckpt_every rounds; the log line; the progress bar."""
    dc, rnd = run.cfg["dragon"], entry["round"]
    if base is not None and (rnd % dc["eval_every"] == 0 or rnd == dc["rounds"]):
        ft = held_out(run, run.model)
        entry.update(eval_reward=ft.value, eval_reward_base=base.value, eval_listening=ft.listening,
                     eval_listening_base=base.listening)
        if ft.scores.per_example is not None:
            rate, lo, hi = win_rate(ft.scores.per_example.numpy(), base.scores.per_example.numpy())
            entry.update(eval_win_rate=rate, eval_win_ci=[lo, hi])
        if run.rank == 0:
            write_samples(ft.audio[: dc["n_wav"]], run.cfg, run.run_dir, rnd)
    append_log(run, entry)                   # the log line first, then the checkpoint: a kill -9 between the
    if rnd % dc["ckpt_every"] == 0 or rnd == dc["rounds"]:   # two leaves a logged round that the resume redoes
        save_state(run, rnd)                 # and whose line it drops (resume_log)
    bar.update(1)
    bar.set_postfix(r=f"{entry['reward']:.3f}", acc=f"{entry['implicit_acc']:.2f}",
                    **({"eval": f"{entry['eval_reward']:.3f}"} if "eval_reward" in entry else {}))


def append_log(run, entry):
    if run.rank == 0:
        with open(run.log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
    run.logged = entry["round"]


def resume_log(path, rnd):
    """Keep the log lines of rounds 1..rnd, the ones the checkpoint holds (rewritten atomically):
    rounds after it are redone by the resumed run and logged again; a line cut by a kill -9 goes too."""
    if not os.path.isfile(path):
        return
    entries = []
    for line in open(path):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:         # only the last line can be cut, and it is after the checkpoint
            continue
    kept = [e for e in entries if e["round"] <= rnd]
    if [e["round"] for e in kept] != list(range(1, rnd + 1)):
        raise RuntimeError(f"{path} does not hold rounds 1..{rnd} of the checkpoint once each; delete the run "
                           f"folder to start over")
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in kept)
    os.replace(path + ".tmp", path)


def save_state(run, rnd):
    if run.rank == 0:
        save_atomic({"model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "round": rnd,
                     "model_config": run.cfg["model"]}, run.state_path)


def finish(run):
    """The fine-tuned model, the reward curve, and the last evaluation's summary."""
    dc = run.cfg["dragon"]
    path = os.path.join(run.run_dir, "dragon.pt")
    if run.rank == 0:
        save_model(path, run.model, rounds=dc["rounds"], reward=run.reward.name)
        plot_log(run.log_path, os.path.join(run.run_dir, "reward_curve.png"), run.reward.name)
        last = [json.loads(line) for line in open(run.log_path)][-1]
        if "eval_reward" in last:
            log(run.rank, f"done: held-out {run.reward.name} {last['eval_reward_base']:.4f} (base) -> "
                          f"{last['eval_reward']:.4f}"
                          + (f", win rate {last['eval_win_rate']:.1%}" if "eval_win_rate" in last else "")
                          + f"; listening {fmt(last['eval_listening'])} (base: {fmt(last['eval_listening_base'])})")
        log(run.rank, f"done: checkpoint {path}")
    if run.world > 1:
        dist.barrier()
    return path


def fmt(listening):
    return ", ".join(f"{k} {v:.3f}" for k, v in listening.items())


def write_samples(audio, cfg, run_dir, rnd):
    for i, a in enumerate(audio):
        write_wav(os.path.join(run_dir, "samples", f"round{rnd:04d}_{i:02d}.wav"), a, cfg["data"]["sample_rate"])


def plot_log(log_path, png_path, name):
    """Left: the reward of the demonstrations per round and of held-out samples at each evaluation.
    Right: the held-out win rate against the base model (same prompts, same noise), with its 95%
    bootstrap interval over prompts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    entries = [json.loads(line) for line in open(log_path)]
    ev = [e for e in entries if "eval_reward" in e]
    fig, (ax, ax_win) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax.plot([e["round"] for e in entries], [e["reward"] for e in entries], alpha=0.4, label="demonstrations")
    ref = [e for e in entries if e.get("generator") == "ref"]   # rounds f_ref generated (F2, probability p_ref)
    if ref:
        ax.plot([e["round"] for e in ref], [e["reward"] for e in ref], "x", color="tab:blue", label="… by f_ref")
    if ev:
        ax.plot([0] + [e["round"] for e in ev], [ev[0]["eval_reward_base"]] + [e["eval_reward"] for e in ev], "o-",
                label="held-out prompts")
    ax.set_xlabel("DRAGON round")
    ax.set_ylabel(name)
    ax.legend()
    wins = [e for e in ev if "eval_win_rate" in e]
    rate = [100 * e["eval_win_rate"] for e in wins]
    bounds = [[100 * b for b in e.get("eval_win_ci", [e["eval_win_rate"]] * 2)] for e in wins]
    ci = [[r - lo for r, (lo, _) in zip(rate, bounds)], [hi - r for r, (_, hi) in zip(rate, bounds)]]
    ax_win.plot([0] + [e["round"] for e in wins], [50] + rate, "-", color="tab:green")
    ax_win.errorbar([e["round"] for e in wins], rate, yerr=ci, fmt="o", color="tab:green", capsize=3,
                    label="95% interval over prompts")
    ax_win.legend(loc="lower right")
    ax_win.axhline(50, color="gray", ls="--", lw=1)
    ax_win.set_ylim(0, 100)
    ax_win.set_xlabel("DRAGON round")
    ax_win.set_ylabel("held-out win rate vs base (%)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    train(parse_args(sys.argv[1:]))
