"""Benchmark: the cost of one DRAGON round's generation and of scoring it with every reward.

    python bench.py config.yaml [section.key=value ...]

Generates 80 clips (the paper's total batch) from held-out prompts with the base model and the
configured sampler, then scores them with each reward of rewards.py and prints seconds per reward
next to the generation time. Rewards' models (offline CLAP, aesthetics head) and reference
statistics are fitted / cached on first use; that one-off cost is printed separately.
"""
import copy
import os
import sys
import time

import torch

from data import TextEncoder, make_codec, prompt_set
from model import load_model
from pretrain import generate_latents, parse_args, pretrain, setup_distributed
from rewards import build_reward

REWARDS = [
    dict(kind="aesthetics"),
    dict(kind="clap_score"),
    dict(kind="fad_per_song", encoder="latent", reference="audio:alim"),
    dict(kind="fad_per_song", encoder="clap", reference="audio:alim"),
    dict(kind="fad_per_song", encoder="clap", reference="text:alim"),
    dict(kind="fad_dataset", encoder="clap", reference="audio:alim"),
    dict(kind="vendi", encoder="clap"),
]


def main(cfg, n=80):
    _, _, device = setup_distributed(cfg)
    base = os.path.join(cfg["out_dir"], "base.pt")
    if not os.path.isfile(base):
        print(f"no base model at {base}: pre-training it first")
        pretrain(cfg)
    model = load_model(base, map_location=device)[0].eval()
    codec = make_codec(cfg)
    text_encoder = TextEncoder(cfg["text_encoder"]["name"], cfg["text_encoder"]["max_tokens"])
    prompts = (prompt_set(cfg["data"], "heldout") * 2)[:n]
    T = codec.latent_length(int(cfg["data"]["sample_rate"] * cfg["data"]["clip_seconds"]))
    t0 = time.time()
    latents = generate_latents(model, prompts, list(range(n)), T, text_encoder, cfg["sampler"], device)
    t_gen = time.time() - t0
    t0 = time.time()
    codec.decode(latents)
    t_dec = time.time() - t0
    print(f"generate {n} clips ({cfg['sampler']['steps']} steps): {t_gen:.1f}s; decode to audio: {t_dec:.1f}s")
    print(f"| reward | type | setup (one-off) s | score {n} clips s | value |")
    print("| --- | --- | --- | --- | --- |")
    for spec in REWARDS:
        c = copy.deepcopy(cfg)
        c["reward"].update(spec)
        t0 = time.time()
        reward = build_reward(c, codec, text_encoder)
        t_setup = time.time() - t0
        t0 = time.time()
        features = reward.features(latents, prompts)
        value = reward.set_score(features) if reward.is_set else reward.score(features, prompts).mean().item()
        print(f"| {reward.name} | {reward.type} | {t_setup:.1f} | {time.time() - t0:.2f} | {value:.4f} |", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(parse_args(sys.argv[1:]))
