import os

import pytest
import torch

from launch import autocast, load_config, parse_args, use_bf16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")


def test_config_overrides_and_errors():
    cfg = load_config(CONFIG, ["pretrain.lr=0.01", "sampler.cfgpp_range=[0.1, 0.9]", "pretrain.steps=5",
                               "sampler.sigma_max=70"])
    assert cfg["pretrain"]["lr"] == 0.01 and cfg["sampler"]["cfgpp_range"] == [0.1, 0.9]
    assert cfg["sampler"]["sigma_max"] == 70.0 and isinstance(cfg["sampler"]["sigma_max"], float)
    with pytest.raises(KeyError, match=r"unknown config key 'pretrain.lrr'; allowed here: \[.*'lr'"):
        load_config(CONFIG, ["pretrain.lrr=1"])
    with pytest.raises(KeyError, match="unknown config key 'nosection'"):
        load_config(CONFIG, ["nosection.x=1"])
    with pytest.raises(TypeError, match="config key 'pretrain.steps' must be int .* got str 'many'"):
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


def test_every_config_key_has_a_comment():
    for line in open(CONFIG):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in line or stripped.startswith("-"), f"config.yaml line without a comment: {line!r}"


def test_usage_and_bf16_switch():
    with pytest.raises(SystemExit, match="usage"):
        parse_args([])
    with pytest.raises(SystemExit, match="usage"):
        parse_args(["pretrain.lr=0.1"])
    assert not use_bf16({"bf16": True}, torch.device("cpu"))       # the config's bf16 means CUDA only
    with autocast(torch.device("cpu"), True):                       # the resolved flag runs on the CPU too
        y = torch.nn.Linear(4, 4)(torch.ones(2, 4))
    assert y.dtype == torch.bfloat16


def test_data_files_are_checked_and_stereo_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.test_captions: file not found: .*nope.tsv"):
        load_config(CONFIG, ["data.source=folder", f"data.test_captions={tmp_path}/nope.tsv"])
    (tmp_path / "t.tsv").write_text("a.wav\tx\n")
    with pytest.raises(ValueError, match="data.valid_captions=.* is only read with data.source=folder"):
        load_config(CONFIG, [f"data.valid_captions={tmp_path}/t.tsv"])
    with pytest.raises(ValueError, match="data.mono=false is not supported"):
        load_config(CONFIG, ["data.mono=false"])
