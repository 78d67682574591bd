"""EDM pre-training of the base text-to-music model (the f_ref that DRAGON starts from).

    python pretrain.py config.yaml [section.key=value ...]
    torchrun --standalone --nproc_per_node=N pretrain.py config.yaml

The paper pre-trains for 5 days on 32 A100s; the default config trains a small base model on a
2-core CPU: the EDM loss (model.loss_per_example) with log-normal sigma and 10% condition
dropout, Adam with warm-up, an EMA of the weights as the base model, resumable atomic
checkpoints, WAV samples from held-out prompts, and a listening check (check_base).

Under torchrun each step draws one global batch (the same on every rank, from the seed and the
step) and each rank trains on its share, so N processes take the step one process takes. The
training split is encoded once, by rank 0, into out_dir/corpus/ and memory-mapped by every rank.
"""
import copy
import json
import math
import os
import resource
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from launch import autocast, finish_distributed, gather, log, parse_args, rank_shard
from launch import rank0_first, seeded_generator, setup_distributed, use_bf16, wait_for_rank0
from data import corpus_chunks, cycled, list_fingerprint, load_corpus, prompt_set, write_wav
from encoders import clip_latent_length, make_codec, make_text_encoder
from listen import listen, listening_summary
from model import DiT, DiTConfig, count_parameters, drop_condition, load_checkpoint
from model import loss_per_example, sample_sigma, save_atomic, save_model, update_ema
from sampler import generate_latents

# =============================================================================================
# Data: latents and text states of the training split
# =============================================================================================

N_WAV = 8    # WAV samples of held-out prompts written at the end


def encode_in_batches(codec, audio, batch=256):
    return torch.cat([codec.encode(audio[i:i + batch]) for i in range(0, len(audio), batch)])


def encoded_corpus(cfg, codec, text_encoder, rank=0, world=1):
    """Latents [N, C, T], text states [N, L, D] and masks [N, L] of the training split, as numpy
    memory maps: encoded once, a chunk at a time, by rank 0 into out_dir/corpus/ (raw .bin files
    and meta.json, as nanoGPT's train.bin) and opened by every rank, which reads only the rows it
    samples (the ranks of one machine share the pages). Encoded again when the data, codec or
    text encoder settings, or a folder corpus's files, change."""
    folder = os.path.join(cfg["out_dir"], "corpus")
    key = {k: cfg[k] for k in ("data", "codec", "text_encoder")}
    if cfg["data"]["source"] == "folder":
        key["files"] = list_fingerprint(cfg["data"]["train_captions"])
    meta_path = os.path.join(folder, "meta.json")

    def cached():
        same = json.loads(json.dumps(key))        # the key as it reads back from JSON
        return os.path.isfile(meta_path) and json.load(open(meta_path))["key"] == same

    def as_bytes(t, dtype):
        return t.numpy().astype(dtype).tobytes()

    def write():
        if cached():
            return
        os.makedirs(folder, exist_ok=True)
        n, L, total, total_sq = 0, text_encoder.max_tokens, 0.0, 0.0
        fz, ft, fm = (open(os.path.join(folder, f"{name}.bin"), "wb")
                      for name in ("latents", "text", "mask"))
        with fz, ft, fm:
            for chunk in corpus_chunks(cfg["data"], "train", 1024):
                z = encode_in_batches(codec, chunk.audio)
                text, mask = text_encoder(chunk.captions, keep=False)
                fz.write(as_bytes(z, np.float32))
                ft.write(as_bytes(F.pad(text, (0, 0, 0, L - text.shape[1])), np.float32))
                fm.write(as_bytes(F.pad(mask, (0, L - mask.shape[1])), np.bool_))
                n, total = n + len(z), total + z.double().sum().item()
                total_sq += z.double().pow(2).sum().item()
        count = n * z[0].numel()
        meta = {"key": key, "n": n, "latent": list(z.shape[1:]), "text": [L, text.shape[2]],
                "mean": total / count, "std": (total_sq / count - (total / count) ** 2) ** 0.5}
        # written last: a cut write is redone
        with open(meta_path + ".tmp", "w") as f:
            json.dump(meta, f)
        os.replace(meta_path + ".tmp", meta_path)
    rank0_first(world, rank, write)
    meta = json.load(open(meta_path))
    n, (C, T), (L, D) = meta["n"], meta["latent"], meta["text"]
    layout = (("latents", np.float32, (n, C, T)), ("text", np.float32, (n, L, D)),
              ("mask", np.bool_, (n, L)))
    opened = [np.memmap(os.path.join(folder, f"{name}.bin"), dtype, "r", shape=shape)
              for name, dtype, shape in layout]
    return (*opened, meta)


def rows(array, idx):
    """The rows idx (a tensor) of a memory-mapped array, as a tensor in memory."""
    return torch.from_numpy(np.ascontiguousarray(array[idx.numpy()]))


def latent_scale_advice(cfg, meta):
    """A warning when the corpus's latents are far from EDM's sigma_data (the preconditioning
    assumes it): the measured mean and std and the codec settings that would fix them."""
    sd, mean, std, c = cfg["model"]["sigma_data"], meta["mean"], meta["std"], cfg["codec"]
    if abs(std / sd - 1) <= 0.25:
        return None
    if c["kind"] == "mel":
        fix = (f"codec.log_mean={c['log_mean'] + mean * c['log_scale']:.3g} "
               f"codec.log_scale={c['log_scale'] * std / sd:.3g}")
    else:
        fix = f"codec.latent_scale={c['latent_scale'] * sd / std:.3g}"
    return (f"the training latents have mean {mean:.3f} and std {std:.3f}, but EDM's "
            f"preconditioning assumes std model.sigma_data={sd}: pre-train again with {fix} "
            f"(measured on this corpus) and a new out_dir")


# =============================================================================================
# Pre-training
# =============================================================================================

def lr_at(step, cfg):
    return cfg["lr"] * min(1.0, (step + 1) / max(1, cfg["warmup"]))


def pretrain(cfg):
    """Train the base model; returns the path of the EMA checkpoint out_dir/base.pt."""
    rank, world, device = setup_distributed(cfg)
    pc, out = cfg["pretrain"], cfg["out_dir"]
    state_path, base_path = os.path.join(out, "pretrain_state.pt"), os.path.join(out, "base.pt")
    torch.manual_seed(cfg["seed"])
    codec = make_codec(cfg, device)
    text_encoder = make_text_encoder(cfg, device)
    mc = cfg["model"]
    if codec.latent_channels != mc["latent_channels"] or text_encoder.dim != mc["text_dim"]:
        raise ValueError(f"model.latent_channels={mc['latent_channels']} / model.text_dim="
                         f"{mc['text_dim']} must match the codec ({codec.latent_channels}) and the "
                         f"text encoder ({text_encoder.dim})")
    t0 = time.time()
    latents, text, mask, meta = encoded_corpus(cfg, codec, text_encoder, rank, world)
    log(rank, f"data: {len(latents)} clips -> latents {tuple(latents.shape[1:])}, mean "
              f"{meta['mean']:.3f}, std {meta['std']:.3f}, text states {tuple(text.shape[1:])} "
              f"({time.time() - t0:.0f}s)")
    advice = latent_scale_advice(cfg, meta)
    if advice and rank == 0:
        warnings.warn(advice)

    model = DiT(DiTConfig(**cfg["model"])).to(device)
    model.grad_checkpointing = pc["grad_checkpointing"]
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=pc["lr"])
    step = 0
    if pc["resume"] and os.path.isfile(state_path):
        # on the CPU: Adam's step counters must stay there
        state = load_checkpoint(state_path)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        log(rank, f"resumed from {state_path} at step {step}")
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    log(rank, f"model: {count_parameters(model) / 1e6:.2f}M parameters, {world} process(es) on "
              f"{device}")

    B, s = pc["batch_size"], rank_shard(pc["batch_size"], rank, world)
    if B % world:
        raise ValueError(f"pretrain.batch_size={B} must be divisible by the {world} processes")
    bar = tqdm(total=pc["steps"], initial=step, desc="pretrain", disable=rank != 0,
               dynamic_ncols=True)
    while step < pc["steps"]:
        # the global batch, the same on every rank; each takes its shard
        g = seeded_generator(cfg["seed"], step)
        idx = torch.randint(len(latents), (B,), generator=g)
        m = drop_condition(rows(mask, idx), pc["cond_dropout"], g)[s].to(device)   # 10% dropout
        sigma = sample_sigma(B, pc["P_mean"], pc["P_std"], g)[s].to(device)   # ln sigma: normal
        noise = torch.randn((B, *latents.shape[1:]), generator=g)[s].to(device)
        x0, c = rows(latents, idx[s]).to(device), rows(text, idx[s]).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, pc)
        with autocast(device, use_bf16(pc, device)):
            # EDM loss (DDP: mean over ranks)
            loss = loss_per_example(train_model, x0, c, m, sigma, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        update_ema(ema, model, pc["ema_decay"])
        step += 1
        bar.update(1)
        save = step % pc["ckpt_every"] == 0 or step == pc["steps"]
        # read the loss now and then: each read waits for the GPU
        if step % 10 == 0 or save:
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"pretrain: loss is {value} at step {step}; the last good "
                                         f"checkpoint is {state_path}")
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr_at(step - 1, pc):.1e}")
        if rank == 0 and save:
            save_atomic({"model": model.state_dict(), "ema": ema.state_dict(),
                         "optimizer": opt.state_dict(), "step": step,
                         "model_config": cfg["model"]}, state_path)
    bar.close()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20     # Linux: KiB
    peak = gather(torch.tensor([peak_gb]), world)
    log(rank, "peak memory per process: " + ", ".join(f"{p:.2f} GB" for p in peak.tolist()))
    if rank == 0:
        save_model(base_path, ema, step=step, text_encoder=cfg["text_encoder"]["name"],
                   codec=cfg["codec"]["kind"], sample_rate=cfg["data"]["sample_rate"])
        log(rank, f"saved the base model (EMA) to {base_path}")
        if pc["n_check"]:
            check_base(cfg, ema, codec, text_encoder, device)
    wait_for_rank0(world)
    return base_path


def base_model(cfg):
    """The path of out_dir/base.pt, pre-training the base model first when there is none."""
    path = os.path.join(cfg["out_dir"], "base.pt")
    if not os.path.isfile(path):
        log(int(os.environ.get("RANK", 0)),
            f"no base model at {path}: pre-training it first (pretrain.py)")
        pretrain(cfg)
    return path


def check_base(cfg, model, codec, text_encoder, device):
    """WAV samples from held-out prompts, and what a listener would notice in n_check generations
    from held-out prompts next to the codec round trip of real clips (listen.listen): loudness,
    samples at full scale, hiss, dropouts and, on the synthetic corpus, how often the measured
    pitch register matches the one the prompt names (chance: 1/3). Written to out_dir/check.json."""
    pc, sr = cfg["pretrain"], cfg["data"]["sample_rate"]
    heldout = prompt_set(cfg["data"], "heldout")
    n = pc["n_check"]
    prompts = cycled(heldout, n)                                  # new seeds for the repeats
    T = clip_latent_length(codec, cfg["data"])
    t0 = time.time()
    latents = generate_latents(model, prompts, list(range(len(prompts))), T, text_encoder,
                               cfg["sampler"], device, bf16=use_bf16(cfg["pretrain"], device))
    audio = codec.decode(latents)
    for i in range(min(N_WAV, len(prompts))):
        path = os.path.join(cfg["out_dir"], "samples", f"pretrain_{i:02d}.wav")
        write_wav(path, audio[i], sr)
        tqdm.write(f"  {path}: {prompts[i]}")
    synthetic = cfg["data"]["source"] == "synthetic"
    split = "test" if synthetic or cfg["data"]["test_captions"] else "train"
    real = load_corpus(cfg["data"], split).audio
    # spread over the split's files
    real = real[torch.linspace(0, len(real) - 1, min(n, len(real))).long()]
    round_trip = codec.decode(codec.encode(real))
    report = {name: {"clips": len(a), **listening_summary(listen(a, sr, p)),
                     "rms_quartiles": rms_quartiles(a)}
              for name, a, p in (("generated", audio, prompts if synthetic else None),
                                 ("codec_round_trip", round_trip, None))}
    for name, r in report.items():
        tqdm.write(f"{name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in r.items()))
    if synthetic:
        tqdm.write(f"register check: {report['generated']['register_match']:.1%} of held-out "
                   f"generations match the prompt's register (chance 33.3%) "
                   f"[{time.time() - t0:.0f}s]")
    with open(os.path.join(cfg["out_dir"], "check.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def rms_quartiles(audio):
    """25th, 50th and 75th percentile of the clips' RMS."""
    rms = audio.pow(2).mean(1).sqrt()
    return [round(float(q), 4) for q in rms.quantile(torch.tensor([0.25, 0.5, 0.75]))]


if __name__ == "__main__":
    pretrain(parse_args(sys.argv[1:]))
    finish_distributed()
