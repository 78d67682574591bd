"""DRAGON fine-tuning: the loop of the paper's Appendix F, step by step.

    python train.py config.yaml [section.key=value ...]
    torchrun --standalone --nproc_per_node=N train.py config.yaml     (NCCL on GPUs, gloo on CPUs)

f_ref is the pre-trained base model (frozen, never updated); f_theta starts as its copy. Each
round of `train` is the ten steps, one commented line or a few each: F1 sample prompts -> F2
choose the generator -> F3 generate demonstrations -> F4 decode / encode as the reward needs ->
F5 score -> F6 build D+ and D- -> F7 the DPO / KTO loss -> F8 backward -> F9 clip and Adam ->
F10 log. Under torchrun every rank draws the same global batch; it generates and encodes its
shard of the demonstrations, all ranks gather them, score them and build D+ / D- identically
(set rewards need the whole set), and each computes the loss on its share of D+ / D-; DDP
averages the gradients, so N processes take the step one process takes.
"""
import copy
import json
import os
import sys
import time

import torch
from tqdm import tqdm

from data import cycled, prompt_set, write_wav
from encoders import clip_latent_length, make_codec, make_text_encoder
from dragon import A_theta, build_sets, dpo_loss, kto_loss, kto_reference_point, pair_up
from dragon import Sets, per_example_errors
from eval import held_out, plot_reward_curve, win_rate
from launch import autocast, finish_distributed, gather, log, parse_args, rank0_first, rank_shard
from launch import TRAIN_EVAL_SEED, seeded_generator, setup_distributed, use_bf16, wait_for_rank0
from model import drop_condition, load_checkpoint, load_model, sample_sigma, save_atomic, save_model
from pretrain import base_model
from rewards import build_reward
from sampler import generate_latents

N_WAV = 4    # WAV samples written at each held-out check


def train(cfg):
    """Fine-tune the base model with DRAGON; returns the path of out_dir/<run_name>/dragon.pt."""
    rank, world, device = setup_distributed(cfg)
    dc, P = cfg["dragon"], cfg["dragon"]["prompts_per_round"]
    run_dir = os.path.join(cfg["out_dir"], dc["run_name"])
    # pre-trained first when missing (pretrain.py)
    base_path = base_model(cfg)
    codec, text_encoder = make_codec(cfg, device), make_text_encoder(cfg, device)
    # rank 0 fits, the others load
    reward = rank0_first(world, rank, lambda: build_reward(cfg, codec, rank))
    check_dragon_config(cfg, reward)
    # frozen, never updated
    f_ref = load_model(base_path, map_location=device)[0].eval().requires_grad_(False)
    f_theta = copy.deepcopy(f_ref).train().requires_grad_(True)
    opt = torch.optim.Adam(f_theta.parameters(), lr=dc["lr"])
    start = resume(run_dir, f_theta, opt, dc["resume"], rank)
    f_theta_ddp = torch.nn.parallel.DistributedDataParallel(f_theta) if world > 1 else f_theta
    T, bf16 = clip_latent_length(codec, cfg["data"]), use_bf16(dc, device)
    # paper: inference sampler
    demo_sampler = dict(cfg["sampler"], steps=dc["demo_steps"] or cfg["sampler"]["steps"])
    train_prompts = prompt_set(cfg["data"], "train")
    pairs = torch.stack([torch.arange(P), torch.arange(P) + P], 1)   # prompt i and i + P: a pair
    # repeats get new seeds
    eval_prompts = cycled(prompt_set(cfg["data"], "heldout"), dc["n_eval"])
    eval_seeds = [TRAIN_EVAL_SEED + i for i in range(dc["n_eval"])]

    # the held-out check of F10 (eval.held_out)
    def evaluate(model):
        return held_out(model, eval_prompts, eval_seeds, cfg, codec, text_encoder, reward, device,
                        rank, world)
    # the baseline: f_ref, same prompts and noise
    base = evaluate(f_ref) if dc["n_eval"] else None
    log(rank, f"DRAGON on {reward.name} ({reward.type}), {dc['loss'].upper()}, sets={dc['sets']}: "
              + (f"base model held-out reward {base['value']:.4f}; "
                 f"listening {fmt(base['listening'])}" if base else
                 "no held-out evaluation (dragon.n_eval=0)"))
    bar = tqdm(total=dc["rounds"], initial=start, desc=f"DRAGON {reward.name}", disable=rank != 0,
               dynamic_ncols=True)
    # rounds whose update is applied / whose log line is written
    completed = logged = start
    try:
        for rnd in range(start, dc["rounds"]):
            # every random draw of the round, on every rank
            g = seeded_generator(cfg["seed"], rnd)
            for group in opt.param_groups:
                group["lr"] = lr_at(rnd, dc)
            t0 = time.time()
            # F1: sample prompts, each with two seeds (prompt i and i + P are a pair)
            prompts, seeds = sample_prompts(train_prompts, P, g)
            # F2: f_ref generates the round with probability p_ref, else f_theta
            use_ref = torch.rand(1, generator=g).item() < dc["p_ref"]
            # F3: demonstrations from the inference sampler (no grad, batched CFG); each rank its
            # shard, then gathered
            generator = f_ref if use_ref else f_theta.eval()
            latents = generate_latents(generator, prompts, seeds, T, text_encoder, demo_sampler,
                                       device, bf16=bf16, rank=rank, world=world)
            f_theta.train()
            t1 = time.time()
            # F4: decode / encode as the reward needs (audio -> CLAP windows, or latent frames)
            s = rank_shard(len(latents), rank, world)
            features = gather(reward.features(latents[s], prompts[s]), world)
            # F5: score: per clip for instance rewards, r(S) of any subset for set rewards
            scores = reward.scores(features, prompts)
            # F6: build D+ and D-
            sets = build_sets(dc["sets"], pairs, scores.per_example, scores.of, g)
            t2 = time.time()
            # F7: the loss. sigma, noise and condition dropout for the global batch (a pair's
            # members share them), this rank's share of D+ / D-; e_theta, e_ref; A_theta (Eq. 7);
            # DPO (Eq. 6) or KTO (Eq. 8)
            x0, c, m, sigma, noise, is_pos, n_terms = loss_inputs(latents, *text_encoder(prompts),
                                                                  sets, cfg, g, rank, world)
            x0, c, m, sigma, noise = (t.to(device) for t in (x0, c, m, sigma, noise))
            # float32 by default: A_theta is a small difference
            with autocast(device, dc["loss_bf16"]):
                e_theta, e_ref = per_example_errors(f_theta_ddp, f_ref, x0, c, m, sigma, noise)
            A = A_theta(e_theta.float(), e_ref.float())
            loss, terms, logits, z = dragon_loss(A, is_pos.to(device), dc, n_terms, world)
            # F8: backward (DDP averages the gradients of the ranks)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # F9: clip the gradient norm at 45, then an Adam step
            grad_norm = torch.nn.utils.clip_grad_norm_(f_theta.parameters(), dc["grad_clip"]).item()
            opt.step()
            completed = rnd + 1
            # F10: log the round (the global batch's numbers); every eval_every rounds the
            # held-out check
            entry = {"round": rnd + 1, "generator": "ref" if use_ref else "theta",
                     "reward": scores.of(torch.arange(2 * P)), "reward_pos": scores.of(sets.pos),
                     "reward_neg": scores.of(sets.neg), "n_pos": len(sets.pos),
                     "n_neg": len(sets.neg), "grad_norm": grad_norm,
                     **loss_metrics(A, e_theta, e_ref, is_pos, terms, logits, z, n_terms,
                                    dc["loss"], world),
                     "t_generate": t1 - t0, "t_score": t2 - t1, "t_update": time.time() - t2}
            if base and (completed % dc["eval_every"] == 0 or completed == dc["rounds"]):
                tuned = evaluate(f_theta)
                entry.update(compare(tuned, base))
                if rank == 0:
                    write_samples(tuned["audio"][:N_WAV], cfg, run_dir, completed)
            # the log line, then the checkpoint: a kill -9 between them leaves a round the resume
            # redoes (resume_log)
            logged = append_log(run_dir, entry, rank)
            if completed % dc["ckpt_every"] == 0 or completed == dc["rounds"]:
                save_state(run_dir, f_theta, opt, completed, cfg, rank)
            bar.update(1)
            shown = {"eval": f"{entry['eval_reward']:.3f}"} if "eval_reward" in entry else {}
            bar.set_postfix(r=f"{entry['reward']:.3f}", acc=f"{entry['implicit_acc']:.2f}", **shown)
    except KeyboardInterrupt:
        # stopped in the held-out check: log the round without it
        if completed > logged:
            append_log(run_dir, dict(entry, eval_interrupted=True), rank)
        save_state(run_dir, f_theta, opt, completed, cfg, rank)
        log(rank, f"interrupted: saved round {completed} to {run_dir}/dragon_state.pt; run the "
                  f"same command to resume")
        return None
    bar.close()
    return finish(run_dir, f_theta, reward, cfg, rank, world)


# =============================================================================================
# Appendix F steps 1 and 7
# =============================================================================================

def sample_prompts(train_prompts, P, g):
    """F1: P training prompts, each twice (prompt i and i + P are a pair), and a noise seed per
    clip."""
    picks = torch.randint(len(train_prompts), (P,), generator=g).tolist()
    seeds = torch.randint(2 ** 31, (2 * P,), generator=g).tolist()
    return [train_prompts[i] for i in picks] * 2, seeds


def loss_inputs(latents, text, mask, sets, cfg, g, rank, world):
    """F7's draws: sigma from the training log-normal, noise and 10% condition dropout, drawn for
    the global batch from the round's generator (dragon.noise_draws per pair, for DPO and KTO
    alike, or per unpaired example), then this rank's share: (x0, text, mask, sigma, noise,
    is_positive, number of loss terms in the global batch). Unpaired sets are paired at random for
    DPO."""
    dc, pc = cfg["dragon"], cfg["pretrain"]
    if dc["loss"] == "dpo":
        sets = pair_up(sets, g)
    # each pair (or example) at noise_draws independent (sigma, noise): a many-sample estimate
    # of the expectation over sigma and n in Eqs. (6) / (8) instead of a one-sample one
    sets = Sets(sets.pos.repeat(dc["noise_draws"]), sets.neg.repeat(dc["noise_draws"]),
                sets.paired)
    K = len(sets.pos) if sets.paired else len(sets.pos) + len(sets.neg)
    sigma = sample_sigma(K, pc["P_mean"], pc["P_std"], g)
    noise = torch.randn((K, *latents.shape[1:]), generator=g)
    keep = drop_condition(torch.ones(K, 1, dtype=torch.bool), dc["cond_dropout"], g)[:, 0]
    s = rank_shard(K, rank, world)
    # x+ then x- of this rank's pairs: same sigma, noise
    if sets.paired:
        idx, k = torch.cat([sets.pos[s], sets.neg[s]]), torch.arange(K)[s].repeat(2)
        is_pos = torch.arange(len(idx)) < len(idx) // 2
    else:
        idx, k = torch.cat([sets.pos, sets.neg])[s], torch.arange(K)[s]
        is_pos = (torch.arange(K) < len(sets.pos))[s]
    n_terms = K if dc["loss"] == "dpo" else 2 * K if sets.paired else K
    return latents[idx], text[idx], mask[idx] & keep[k, None], sigma[k], noise[k], is_pos, n_terms


def dragon_loss(A, is_pos, dc, n_terms, world):
    """Eq. (6) (one term per pair: this rank's x+ come first, then its x-) or Eq. (8) (one term per
    example, z over the global batch); the loss is the mean over the global batch's terms, times
    world because DDP divides the summed gradients by world. Returns (loss, terms, logits, z)."""
    z = None
    if dc["loss"] == "dpo":
        n = len(A) // 2
        terms, logits = dpo_loss(A[:n], A[n:], dc["beta"])
    else:
        z = kto_reference_point(gather(A.detach(), world))
        terms, logits = kto_loss(A, is_pos, dc["kto_beta"], z)
    loss = terms.sum() * world / n_terms
    if not torch.isfinite(loss):
        raise FloatingPointError(f"DRAGON loss is {loss.item()}; the last good checkpoint is kept")
    return loss, terms, logits, z


def loss_metrics(A, e_theta, e_ref, is_pos, terms, logits, z, n_terms, loss_kind, world):
    """What F10 logs about the update, on the global batch (gathered from the ranks): the loss,
    implicit accuracy (f_theta prefers D+ over D- relative to f_ref), the share of saturated terms
    (|sigmoid argument| > 5: weight ~0 or ~1), mean A_theta and errors on D+ and D-, KTO's z."""
    gathered = (gather(t.detach(), world) for t in (A, e_theta, e_ref, is_pos, terms, logits))
    A, e_theta, e_ref, is_pos, terms, logits = gathered
    def mean(x, m):
        return x[m].mean().item() if m.any() else float("nan")
    pos, neg = is_pos, ~is_pos
    if loss_kind == "kto":
        correct = logits > 0
    else:
        correct = (A[pos] < A[neg]).float() + 0.5 * (A[pos] == A[neg]).float()
    return {"loss": terms.sum().item() / n_terms, "implicit_acc": correct.float().mean().item(),
            "saturated": (logits.abs() > 5).float().mean().item(),
            "A_pos": mean(A, pos), "A_neg": mean(A, neg),
            "e_theta_pos": mean(e_theta, pos), "e_ref_pos": mean(e_ref, pos),
            "e_theta_neg": mean(e_theta, neg), "e_ref_neg": mean(e_ref, neg),
            **({"z": z.item()} if z is not None else {})}


def lr_at(rnd, dc):
    """The learning rate of round rnd: constant (paper), or falling linearly to 0 at the end."""
    return dc["lr"] * (1 - rnd / dc["rounds"] if dc["lr_schedule"] == "linear" else 1.0)


def check_dragon_config(cfg, reward):
    """dragon.sets against the reward's type (set or instance); the values that need no reward
    are checked when the config is loaded (launch.check_dragon_values)."""
    dc = cfg["dragon"]
    if reward.is_set and dc["sets"] in ("paired", "unpaired"):
        raise ValueError(f"dragon.sets={dc['sets']!r} needs a per-example reward, but "
                         f"{reward.name} scores sets: use greedy, loo or set_vs_set")
    if not reward.is_set and dc["sets"] in ("greedy", "loo", "set_vs_set"):
        raise ValueError(f"dragon.sets={dc['sets']!r} is for set rewards; {reward.name} is "
                         f"{reward.type}: use paired or unpaired")


# =============================================================================================
# F10's bookkeeping: held-out comparison, log lines, checkpoints and resume
# =============================================================================================

def compare(ft, base):
    """Log fields of a held-out check (eval.held_out) against the base model's: both rewards, the
    per-prompt win rate with its 95% interval (instance rewards), what the listener hears."""
    out = {"eval_reward": ft["value"], "eval_reward_base": base["value"],
           "eval_listening": ft["listening"], "eval_listening_base": base["listening"]}
    if ft["scores"].per_example is not None:
        rate, lo, hi = win_rate(ft["scores"].per_example.numpy(),
                                base["scores"].per_example.numpy())
        out.update(eval_win_rate=rate, eval_win_ci=[lo, hi])
    return out


def append_log(run_dir, entry, rank):
    """One line of log.jsonl (rank 0 writes); returns the round it logged."""
    if rank == 0:
        with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")
    return entry["round"]


def resume(run_dir, model, opt, enabled, rank):
    """The round to start from: that of run_dir/dragon_state.pt (its weights and Adam state loaded,
    log.jsonl cut back to its rounds) when resuming, else 0 (and a fresh log)."""
    state_path = os.path.join(run_dir, "dragon_state.pt")
    log_path = os.path.join(run_dir, "log.jsonl")
    os.makedirs(run_dir, exist_ok=True)
    if enabled and os.path.isfile(state_path):
        state = load_checkpoint(state_path)       # on the CPU: Adam's step counters must stay there
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if rank == 0:
            resume_log(log_path, state["round"])
        log(rank, f"resumed {state_path} at round {state['round']}")
        return state["round"]
    if rank == 0 and os.path.isfile(log_path):
        os.remove(log_path)
    return 0


def resume_log(path, rnd):
    """Keep the log lines of rounds 1..rnd, the ones the checkpoint holds (rewritten atomically):
    rounds after it are redone by the resumed run and logged again; a line cut by a kill -9 goes
    too."""
    if not os.path.isfile(path):
        return
    entries = []
    for line in open(path):
        try:
            entries.append(json.loads(line))
        # only the last line can be cut, and it is after the checkpoint
        except json.JSONDecodeError:
            continue
    kept = [e for e in entries if e["round"] <= rnd]
    if [e["round"] for e in kept] != list(range(1, rnd + 1)):
        raise RuntimeError(f"{path} does not hold rounds 1..{rnd} of the checkpoint once each; "
                           f"delete the run folder to start over")
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in kept)
    os.replace(path + ".tmp", path)


def save_state(run_dir, model, opt, rnd, cfg, rank):
    if rank == 0:
        save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "round": rnd,
                     "model_config": cfg["model"]}, os.path.join(run_dir, "dragon_state.pt"))


def finish(run_dir, model, reward, cfg, rank, world):
    """The fine-tuned model, the reward curve, and the last held-out check's summary."""
    path = os.path.join(run_dir, "dragon.pt")
    if rank == 0:
        save_model(path, model, rounds=cfg["dragon"]["rounds"], reward=reward.name)
        log_path = os.path.join(run_dir, "log.jsonl")
        plot_reward_curve(log_path, os.path.join(run_dir, "reward_curve.png"), reward.name)
        last = [json.loads(line) for line in open(log_path)][-1]
        if "eval_reward" in last:
            rate = f", win rate {last['eval_win_rate']:.1%}" if "eval_win_rate" in last else ""
            log(rank, f"done: held-out {reward.name} {last['eval_reward_base']:.4f} (base) -> "
                      f"{last['eval_reward']:.4f}{rate}; listening {fmt(last['eval_listening'])} "
                      f"(base: {fmt(last['eval_listening_base'])})")
        log(rank, f"done: checkpoint {path}")
    wait_for_rank0(world)
    return path


def fmt(listening):
    return ", ".join(f"{k} {v:.3f}" for k, v in listening.items())


def write_samples(audio, cfg, run_dir, rnd):
    for i, a in enumerate(audio):
        path = os.path.join(run_dir, "samples", f"round{rnd:04d}_{i:02d}.wav")
        write_wav(path, a, cfg["data"]["sample_rate"])


if __name__ == "__main__":
    train(parse_args(sys.argv[1:]))
    finish_distributed()
