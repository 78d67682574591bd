import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import kill_9_when, run_script, text_batch, tiny_dit
from dragon import A_theta, Sets, per_example_errors
from model import load_checkpoint
from launch import autocast, finish_distributed, load_config
from pretrain import pretrain
from train import dragon_loss, loss_inputs, loss_metrics, resume_log, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = ["device=cpu", "data.n_train=64", "data.n_test=8", "data.clip_seconds=0.5",
         "codec.griffin_lim_iters=2", "model.width=32", "model.depth=1", "model.heads=2",
         "pretrain.batch_size=16", "pretrain.lr=0.003", "pretrain.warmup=1",
         "pretrain.ema_decay=0.8", "pretrain.steps=60", "pretrain.n_check=0", "sampler.steps=4",
         "reward.kind=fad_per_song", "reward.encoder=latent", "reward.reference=audio:sd",
         "reward.n_reference=32", "dragon.prompts_per_round=6", "dragon.demo_steps=3",
         "dragon.n_eval=8", "dragon.eval_every=2", "dragon.ckpt_every=1", "dragon.lr=0.002",
         "dragon.noise_draws=1"]


def cfg_for(out, *extra):
    return load_config(os.path.join(ROOT, "config.yaml"), MICRO + [f"out_dir={out}", *extra])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dragon")
    pretrain(cfg_for(out))
    return out


UPDATE_CFG = {"dragon": {"loss": "dpo", "cond_dropout": 0.1, "loss_bf16": False, "beta": 5000.0,
                         "kto_beta": 250.0, "grad_clip": 45.0, "noise_draws": 1},
              "pretrain": {"P_mean": -0.4, "P_std": 1.0}}


def update(model, train_model, ref, opt, latents, text, mask, sets, cfg, g, rank, world):
    """F7-F9 as train.py's loop writes them, on the given demonstrations; returns what F10 logs."""
    dc = cfg["dragon"]
    x0, c, m, sigma, noise, is_pos, n_terms = loss_inputs(latents, text, mask, sets, cfg, g,
                                                          rank, world)
    with autocast(torch.device("cpu"), dc["loss_bf16"]):
        e_theta, e_ref = per_example_errors(train_model, ref, x0, c, m, sigma, noise)
    A = A_theta(e_theta.float(), e_ref.float())
    loss, terms, logits, z = dragon_loss(A, is_pos, dc, n_terms, world)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), dc["grad_clip"]).item()
    opt.step()
    return {"grad_norm": grad_norm, **loss_metrics(A, e_theta, e_ref, is_pos, terms, logits, z,
                                                   n_terms, dc["loss"], world)}


def update_inputs():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(10, 4, 8, generator=g) * 0.5
    text, mask = text_batch(10)
    sets = Sets(torch.tensor([0, 1, 2, 3, 4]), torch.tensor([5, 6, 7, 8, 9]), paired=True)
    return latents, text, mask, sets


def run_updates(rank, world, losses=("dpo", "kto"), pairs=5, paired=True):
    """DRAGON updates (by default DPO, then KTO) of a tiny model on `pairs` pairs; returns f_theta's
    and f_ref's weights and the metrics each update logged."""
    ref = tiny_dit(seed=1).requires_grad_(False)
    model = copy.deepcopy(ref).train().requires_grad_(True)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    latents, text, mask, sets = update_inputs()
    sets = Sets(sets.pos[:pairs], sets.neg[:pairs], paired)
    metrics = []
    for i, loss in enumerate(losses):
        cfg = copy.deepcopy(UPDATE_CFG)
        cfg["dragon"]["loss"] = loss
        metrics.append(update(model, train_model, ref, opt, latents, text, mask, sets, cfg,
                              torch.Generator().manual_seed(10 + i), rank, world))
    return model.state_dict(), ref.state_dict(), metrics


CASES = {"dpo-kto": {}, "one pair (rank 1 has none)": {"pairs": 1},
         "unpaired kto": {"losses": ("kto",), "paired": False}}


def _ddp_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {name: run_updates(rank, world, **kw) for name, kw in CASES.items()}
    if rank == 0:
        torch.save({name: (state, metrics) for name, (state, _, metrics) in results.items()},
                   out_file)
    finish_distributed()                 # what train.py runs at the end


def test_f_ref_is_unchanged_and_f_theta_moves():
    before = {k: v.clone() for k, v in tiny_dit(seed=1).state_dict().items()}
    theta, ref, _ = run_updates(0, 1)
    assert all(torch.equal(before[k], ref[k]) for k in before)
    assert any(not torch.equal(before[k], theta[k]) for k in before)


@pytest.mark.parametrize("loss,paired", [("dpo", True), ("kto", True), ("kto", False)])
def test_pair_members_share_sigma_and_noise(loss, paired):
    # Sets docstring: paired D+ / D- members share sigma and noise in the loss (DPO and KTO);
    # unpaired KTO examples each draw their own.
    latents, text, mask, sets = update_inputs()
    cfg = copy.deepcopy(UPDATE_CFG)
    cfg["dragon"]["loss"] = loss
    x0, _, _, sigma, noise, is_pos, n_terms = loss_inputs(latents, text, mask,
                                                          Sets(sets.pos, sets.neg, paired), cfg,
                                                          torch.Generator().manual_seed(0), 0, 1)
    assert (torch.equal(x0, latents[torch.cat([sets.pos, sets.neg])])
            and is_pos.tolist() == [True] * 5 + [False] * 5)
    assert (torch.equal(sigma[:5], sigma[5:]) == paired
            and torch.equal(noise[:5], noise[5:]) == paired)
    assert len(set(sigma[:5].tolist())) == 5 and n_terms == (5 if loss == "dpo" else 10)


@pytest.mark.parametrize("loss,paired", [("dpo", True), ("kto", False)])
def test_noise_draws_repeat_each_pair_at_new_sigma_and_noise(loss, paired):
    # dragon.noise_draws=K: every pair (unpaired: every example) enters the loss K times, each
    # time at its own sigma and noise; a pair's members still share theirs
    latents, text, mask, sets = update_inputs()
    cfg = copy.deepcopy(UPDATE_CFG)
    cfg["dragon"].update(loss=loss, noise_draws=3)
    x0, _, _, sigma, noise, is_pos, n_terms = loss_inputs(latents, text, mask,
                                                          Sets(sets.pos, sets.neg, paired), cfg,
                                                          torch.Generator().manual_seed(0), 0, 1)
    order = torch.cat([sets.pos.repeat(3), sets.neg.repeat(3)])
    assert torch.equal(x0, latents[order]) and is_pos.tolist() == [True] * 15 + [False] * 15
    assert len(set(sigma.tolist())) == (15 if paired else 30) and n_terms == (15 if paired else 30)
    assert torch.equal(sigma[:15], sigma[15:]) == paired
    for k in range(5):        # the three draws of pair k differ in sigma and noise
        draws = [k, k + 5, k + 10]
        assert len(set(sigma[draws].tolist())) == 3
        assert not torch.equal(noise[draws[0]], noise[draws[1]])


def test_two_process_gloo_ddp_gives_the_same_update_and_logs_the_global_metrics(tmp_path):
    # DDP over 2 gloo processes: the same weights as one process, and the same logged metrics
    # (the global batch's, not rank 0's share), also when a rank has no pair or the sets are
    # unpaired.
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp.pt")),
             nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for name, kw in CASES.items():
        single, _, metrics = run_updates(0, 1, **kw)
        for k in single:
            torch.testing.assert_close(ddp[name][0][k], single[k], rtol=1e-4, atol=1e-6)
        for one, two in zip(metrics, ddp[name][1]):
            assert one.keys() == two.keys() and not any(math.isnan(v) for v in two.values()), name
            for key in one:
                assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), (name, key)


def test_torchrun_two_processes_from_scratch_equal_one_process(tmp_path):
    # What a user runs: `torchrun --nproc_per_node=2 train.py config.yaml` from an empty out_dir
    # (pre-training, reward statistics fitted by rank 0 and loaded by rank 1, DRAGON), against
    # `python train.py config.yaml`. Same base model, same DRAGON model, the same global metrics in
    # every log line; with dragon.n_eval=1 rank 1 has nothing to generate. "Same" up to float
    # order: the all-reduce sums the gradient in another order, and Adam's first steps move every
    # weight by about +-lr whatever its gradient's size, so a weight whose gradient is float noise
    # (seed=2: 4 of 46,688; seed=4: 1) may step the other way: DRAGON weights at most 2 lr per step
    # apart, all but 0.1% within 1e-4. A wrong shard or a rank-0-only metric moves them all.
    from conftest import CLI_ENV
    rounds, lr = 2, 0.002
    args = [*MICRO, f"dragon.rounds={rounds}", f"dragon.lr={lr}", "dragon.n_eval=1",
            "dragon.eval_every=1", "seed=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    for out, launcher in ((one, [sys.executable]),
                          (two, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node=2"])):
        p = subprocess.run([*launcher, "train.py", "config.yaml", *args, f"out_dir={out}"],
                           cwd=ROOT, env=CLI_ENV, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
    def weight_gaps(name):
        a, b = load_checkpoint(one / name)["model"], load_checkpoint(two / name)["model"]
        return torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert weight_gaps("base.pt").max() < 1e-4          # seeds 0-4: within 3.6e-5
    dw = weight_gaps("dragon/dragon.pt")
    assert (dw > 1e-4).float().mean() < 1e-3 and dw.max() <= 2 * lr * rounds
    logs = [[json.loads(line) for line in open(out / "dragon" / "log.jsonl")] for out in (one, two)]
    assert [e["round"] for e in logs[1]] == [1, 2]
    for a, b in zip(*logs):
        for key in ("reward", "reward_pos", "reward_neg", "n_pos", "loss", "implicit_acc",
                    "saturated", "A_pos", "A_neg", "e_theta_pos", "e_ref_neg", "grad_norm",
                    "eval_reward", "eval_reward_base"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), key


def ctrl_c_at_update(monkeypatch, n):
    """Make the n-th DRAGON update raise KeyboardInterrupt (Ctrl-C); returns the undo."""
    import train as train_module
    real, calls = train_module.per_example_errors, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(train_module, "per_example_errors", interrupted)
    return lambda: monkeypatch.setattr(train_module, "per_example_errors", real)


def test_interrupt_and_resume_equals_an_uninterrupted_run(base_dir, monkeypatch):
    straight = cfg_for(base_dir, "dragon.rounds=4", "dragon.run_name=straight")
    train(straight)
    # Ctrl-C during round 3: rounds 1-2 are kept
    undo = ctrl_c_at_update(monkeypatch, 3)
    assert train(cfg_for(base_dir, "dragon.rounds=4", "dragon.run_name=resumed")) is None
    undo()
    train(cfg_for(base_dir, "dragon.rounds=4", "dragon.run_name=resumed"))
    a = load_checkpoint(base_dir / "straight" / "dragon_state.pt")
    b = load_checkpoint(base_dir / "resumed" / "dragon_state.pt")
    assert a["round"] == b["round"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    log = [json.loads(line) for line in open(base_dir / "resumed" / "log.jsonl")]
    assert [e["round"] for e in log] == [1, 2, 3, 4]
    assert (base_dir / "straight" / "reward_curve.png").is_file()


def test_kill_9_and_resume_through_the_command_line(base_dir):
    """python train.py killed with SIGKILL twice (right after a round's log line is written, before
    its checkpoint; and a moment into a later round), then run again: the weights equal those of an
    uninterrupted run and log.jsonl holds every round once."""
    args = [*MICRO, f"out_dir={base_dir}", "dragon.rounds=8", "dragon.ckpt_every=2"]
    run_script("train.py", [*args, "dragon.run_name=cli_straight"])
    killed = [*args, "dragon.run_name=cli_killed"]
    log_path = base_dir / "cli_killed" / "log.jsonl"

    def logged(n):
        return lambda: log_path.is_file() and len(log_path.read_text().splitlines()) >= n
    kill_9_when("train.py", killed, logged(1), delay=0.0)      # round 1 logged, no checkpoint yet
    kill_9_when("train.py", killed, logged(3), delay=0.05)     # in round 4, the checkpoint holds 2
    run_script("train.py", killed)
    a = load_checkpoint(base_dir / "cli_straight" / "dragon.pt")
    b = load_checkpoint(base_dir / "cli_killed" / "dragon.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    straight = [json.loads(line) for line in open(base_dir / "cli_straight" / "log.jsonl")]
    resumed = [json.loads(line) for line in open(log_path)]
    assert [e["round"] for e in resumed] == list(range(1, 9))
    assert [e["reward"] for e in resumed] == [e["reward"] for e in straight]
    assert [e.get("eval_win_rate") for e in resumed] == [e.get("eval_win_rate") for e in straight]


def test_ctrl_c_in_the_held_out_evaluation_logs_the_round_once(base_dir, monkeypatch):
    import train as train_module
    real, calls = train_module.held_out, []

    def interrupted(*args):
        calls.append(1)
        # the base model's, then round 2's evaluation
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(train_module, "held_out", interrupted)
    assert train(cfg_for(base_dir, "dragon.rounds=3", "dragon.run_name=ctrlc_eval")) is None
    monkeypatch.setattr(train_module, "held_out", real)
    assert load_checkpoint(base_dir / "ctrlc_eval" / "dragon_state.pt")["round"] == 2
    train(cfg_for(base_dir, "dragon.rounds=3", "dragon.run_name=ctrlc_eval"))
    log = [json.loads(line) for line in open(base_dir / "ctrlc_eval" / "log.jsonl")]
    assert ([e["round"] for e in log] == [1, 2, 3] and log[1]["eval_interrupted"]
            and "eval_win_rate" in log[2])


def test_resume_log_keeps_the_checkpointed_rounds(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"round": r}) + "\n" for r in (1, 2, 3))
                    + '{"round": 4, "rew')
    # checkpoint at 2; round 3 done; 4 cut by kill -9
    resume_log(str(path), 2)
    assert [json.loads(line)["round"] for line in open(path)] == [1, 2]
    with pytest.raises(RuntimeError, match="does not hold rounds 1..3"):
        resume_log(str(path), 3)


def test_bf16_loss_path_runs_on_the_cpu(base_dir, monkeypatch):
    """dragon.loss_bf16=true computes e_theta and e_ref under bf16 autocast (any device); the loss
    runs, and its A_theta differs from the float32 default only by rounding."""
    import train as train_module
    seen = {}
    real = train_module.per_example_errors

    def spy(*args):
        e_theta, e_ref = real(*args)
        seen.setdefault(loss_bf16, []).append((torch.is_autocast_enabled("cpu"),
                                               (e_theta - e_ref).detach().float()))
        return e_theta, e_ref
    monkeypatch.setattr(train_module, "per_example_errors", spy)
    for loss_bf16 in (False, True):                  # round 2: f_theta != f_ref, so A_theta != 0
        train(cfg_for(base_dir, "dragon.rounds=2", "dragon.n_eval=0",
                      f"dragon.loss_bf16={str(loss_bf16).lower()}",
                      f"dragon.run_name=bf16_{loss_bf16}"))
    (on32, A32), (on16, A16) = seen[False][1], seen[True][1]
    assert not on32 and on16 and not seen[False][0][0] and seen[True][0][0]
    assert 0 < (A16 - A32).abs().max() < 0.5 * A32.abs().max()


def test_demonstrations_use_the_evaluation_sampler_and_the_bf16_switch(base_dir, monkeypatch):
    """dragon.demo_steps=0: demonstrations come from exactly the sampler settings held-out samples
    are evaluated with (the paper's inference sampler); dragon.bf16 reaches both (forced on here,
    on the CPU, where the config would resolve it to float32)."""
    import eval as eval_module
    import train as train_module
    calls = []
    real = train_module.generate_latents

    def spy(model, prompts, seeds, T, text_encoder, sampler_cfg, device, batch=80, bf16=False,
            rank=0, world=1):
        calls.append((len(prompts), dict(sampler_cfg), bf16))
        return real(model, prompts, seeds, T, text_encoder, sampler_cfg, device, batch, bf16,
                    rank, world)
    for module in (train_module, eval_module):                   # demonstrations, held-out checks
        monkeypatch.setattr(module, "generate_latents", spy)
        monkeypatch.setattr(module, "use_bf16", lambda section, device: bool(section["bf16"]))
    cfg = cfg_for(base_dir, "dragon.rounds=2", "dragon.eval_every=2", "dragon.demo_steps=0",
                  "dragon.run_name=demo")
    train(cfg)
    demos = [c for c in calls if c[0] == 2 * cfg["dragon"]["prompts_per_round"]]
    evals = [c for c in calls if c[0] == cfg["dragon"]["n_eval"]]
    assert len(demos) == 2 and len(evals) == 2                   # base + round 2
    assert all(c[1] == cfg["sampler"] and c[2] is True for c in demos + evals)
    few = cfg_for(base_dir, "dragon.rounds=1", "dragon.demo_steps=3", "dragon.run_name=demo3",
                  "dragon.bf16=false")
    calls.clear()
    train(few)
    assert [c[1]["steps"] for c in calls if c[0] == 12] == [3] and not any(c[2] for c in calls)


def test_micro_dragon_raises_the_reward_on_held_out_prompts(base_dir):
    train(cfg_for(base_dir, "dragon.rounds=12", "dragon.eval_every=12", "dragon.run_name=micro",
                  "dragon.p_ref=0.0"))
    last = [json.loads(line) for line in open(base_dir / "micro" / "log.jsonl")][-1]
    assert last["eval_reward"] > last["eval_reward_base"]
    assert last["eval_win_rate"] > 0.5


def test_sets_that_do_not_fit_the_reward_name_the_key(base_dir):
    # the values that need no reward are checked by load_config (test_launch.py)
    with pytest.raises(ValueError, match="dragon.sets='paired' needs a per-example reward"):
        train(cfg_for(base_dir, "reward.kind=vendi"))
    with pytest.raises(ValueError, match="dragon.sets='greedy' is for set rewards"):
        train(cfg_for(base_dir, "dragon.sets=greedy"))


def test_nan_reward_stops_and_keeps_the_last_good_checkpoint(base_dir, monkeypatch):
    import train as train_module
    real_build, calls = train_module.build_reward, []

    def build_flaky(*args, **kwargs):
        reward = real_build(*args, **kwargs)
        real_score = reward.score

        def flaky(features, prompts=None):
            calls.append(1)
            r = real_score(features, prompts)
            if len(calls) == 3:                   # base evaluation and round 1 fine, round 2 NaN
                r = r.clone()
                r[0] = float("nan")
            return r
        reward.score = flaky
        return reward
    monkeypatch.setattr(train_module, "build_reward", build_flaky)
    with pytest.raises(FloatingPointError, match=r"reward fad_per_song\[latent,audio:sd\] .*: "
                                                 r"examples \[0\] contain NaN"):
        train(cfg_for(base_dir, "dragon.rounds=4", "dragon.run_name=nan"))
    assert load_checkpoint(base_dir / "nan" / "dragon_state.pt")["round"] == 1


def test_ctrl_c_saves_and_the_same_command_resumes(base_dir, monkeypatch):
    undo = ctrl_c_at_update(monkeypatch, 2)
    assert train(cfg_for(base_dir, "dragon.rounds=3", "dragon.run_name=ctrlc")) is None
    assert load_checkpoint(base_dir / "ctrlc" / "dragon_state.pt")["round"] == 1
    undo()
    assert train(cfg_for(base_dir, "dragon.rounds=3", "dragon.run_name=ctrlc")).endswith(
        "dragon.pt")
