import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import launch
from launch import autocast, load_config, parse_args, rank0_first, rank_shard, setup_distributed
from launch import use_bf16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")


def test_config_overrides_and_errors():
    cfg = load_config(CONFIG, ["pretrain.lr=0.01", "sampler.cfgpp_range=[0.1, 0.9]",
                               "pretrain.steps=5", "sampler.cfg_scale=2"])
    assert cfg["pretrain"]["lr"] == 0.01 and cfg["sampler"]["cfgpp_range"] == [0.1, 0.9]
    assert cfg["sampler"]["cfg_scale"] == 2.0 and isinstance(cfg["sampler"]["cfg_scale"], float)
    with pytest.raises(KeyError, match=r"unknown config key 'pretrain.lrr'; allowed here: "
                                       r"\[.*'lr'"):
        load_config(CONFIG, ["pretrain.lrr=1"])
    with pytest.raises(KeyError, match="unknown config key 'nosection'"):
        load_config(CONFIG, ["nosection.x=1"])
    with pytest.raises(TypeError, match="config key 'pretrain.steps' must be int .* got str "
                                        "'many'"):
        load_config(CONFIG, ["pretrain.steps=many"])
    with pytest.raises(TypeError, match="'pretrain.resume' must be bool"):
        load_config(CONFIG, ["pretrain.resume=1"])
    with pytest.raises(KeyError, match="'model' is a section"):
        load_config(CONFIG, ["model=3"])
    with pytest.raises(ValueError, match="must look like section.key=value"):
        load_config(CONFIG, ["pretrain.lr"])
    with pytest.raises(ValueError, match="model.latent_channels=16 must equal codec.n_mels=32"):
        load_config(CONFIG, ["model.latent_channels=16"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("nope.yaml")


def test_dragon_values_are_checked_at_load_and_name_the_key():
    with pytest.raises(ValueError, match=r"dragon.loss='ipo': allowed values are \['dpo', 'kto'\]"):
        load_config(CONFIG, ["dragon.loss=ipo"])
    with pytest.raises(ValueError, match=r"dragon.sets='pairs': allowed values are \['paired', "):
        load_config(CONFIG, ["dragon.sets=pairs"])
    with pytest.raises(ValueError, match=r"dragon.lr_schedule='cosine': allowed values are"):
        load_config(CONFIG, ["dragon.lr_schedule=cosine"])
    with pytest.raises(ValueError, match=r"dragon.p_ref must be in \[0, 1\], got 2.0"):
        load_config(CONFIG, ["dragon.p_ref=2"])
    for key in ("beta", "kto_beta", "lr"):
        with pytest.raises(ValueError, match=f"dragon.{key} must be positive, got 0.0"):
            load_config(CONFIG, [f"dragon.{key}=0"])
    with pytest.raises(ValueError, match="dragon.noise_draws must be a whole number >= 1, got 0"):
        load_config(CONFIG, ["dragon.noise_draws=0"])
    load_config(CONFIG, ["dragon.p_ref=1", "dragon.loss=kto", "dragon.sets=set_vs_set"])


def test_every_config_key_has_a_comment():
    for line in open(CONFIG):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in line or stripped.startswith("-"), ("config.yaml line without a comment: "
                                                             f"{line!r}")


def test_usage_and_bf16_switch():
    with pytest.raises(SystemExit, match="usage"):
        parse_args([])
    with pytest.raises(SystemExit, match="usage"):
        parse_args(["pretrain.lr=0.1"])
    # the config's bf16 means CUDA only
    assert not use_bf16({"bf16": True}, torch.device("cpu"))
    # the resolved flag runs on the CPU too
    with autocast(torch.device("cpu"), True):
        y = torch.nn.Linear(4, 4)(torch.ones(2, 4))
    assert y.dtype == torch.bfloat16


def test_data_files_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.test_captions: file not found: .*nope.tsv"):
        load_config(CONFIG, ["data.source=folder", f"data.test_captions={tmp_path}/nope.tsv"])
    (tmp_path / "t.tsv").write_text("a.wav\tx\n")
    with pytest.raises(ValueError, match="data.valid_captions=.* is only read with "
                                         "data.source=folder"):
        load_config(CONFIG, [f"data.valid_captions={tmp_path}/t.tsv"])


def test_rank_shards_cover_the_batch_and_may_be_empty():
    for n, w in [(80, 2), (81, 2), (5, 3), (40, 8), (1, 2), (3, 8)]:
        parts = [list(range(n))[rank_shard(n, r, w)] for r in range(w)]
        assert sum(parts, []) == list(range(n)) and max(map(len, parts)) - min(map(len, parts)) <= 1


def _slow_rank0_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed.distributed_c10d as c10d
    # a short fuse, as NCCL's 10-min watchdog at scale
    c10d.default_pg_timeout = datetime.timedelta(seconds=2)
    _, _, device = setup_distributed({"device": "cpu"})
    got = rank0_first(world, rank, lambda: time.sleep(5 if rank == 0 else 0) or f"rank {rank}")
    dist.barrier()                                             # the default group is still healthy
    torch.save({"got": got, "device": str(device)}, f"{out}{rank}.pt")
    launch.finish_distributed()


def test_ranks_wait_for_a_rank0_fit_longer_than_the_collective_timeout(tmp_path):
    # Rank 0 "fits a reward model" for 5 s while the default group's timeout is 2 s: the others
    # wait on rank0_first's long-timeout group and then run the function themselves.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_slow_rank0_worker, args=(2, port, str(tmp_path / "r")), nprocs=2, join=True)
    assert [torch.load(tmp_path / f"r{r}.pt")["got"] for r in range(2)] == ["rank 0", "rank 1"]


def test_scripts_that_run_as_one_process_refuse_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="eval.py runs as one process"):
        setup_distributed({"device": "cpu"}, single="eval.py")


def test_auto_device_is_named_and_a_gpu_torch_cannot_use_is_reported(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(launch.os.path, "exists", lambda p: p == "/dev/nvidia0")
    _, _, device = setup_distributed({"device": "auto"})
    out = capsys.readouterr().out
    assert (device.type == "cpu" and "device: cpu" in out
            and "cannot use it: install the CUDA build" in out)
    with pytest.raises(RuntimeError, match="device=cuda but torch .* sees no CUDA device.*cannot "
                                           "use it"):
        setup_distributed({"device": "cuda"})
