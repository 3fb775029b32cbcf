"""Presets, the JSON config format, and checkpoint tolerance of known buffers."""
import json
import math

import pytest
import torch

from conftest import get_fixture
from var_rt.checkpoint import load_var_checkpoint
from var_rt.config import PRESETS, get_preset, load_config
from var_rt.errors import CheckpointError, ConfigError
from var_rt.models.var import VAR
from var_rt.models.vqvae import VQVAE


@pytest.mark.parametrize("name,params_m,tokens", [("d16", 310, 680), ("d20", 600, 680), ("d24", 1000, 680),
                                                  ("d30", 2000, 680), ("d36", 2300, 2240)])
def test_presets_match_release(name, params_m, tokens):
    cfg = get_preset(name)
    with torch.device("meta"):
        var = VAR(cfg)
    n = sum(p.numel() for p in var.parameters()) / 1e6
    assert abs(n - params_m) / params_m < 0.12, n
    assert cfg.num_tokens == tokens and cfg.head_dim == 64
    assert cfg.image_size == (512 if name == "d36" else 256)


def test_vae_preset_size():
    with torch.device("meta"):
        vae = VQVAE(get_preset("d16").vae)
    n = sum(p.numel() for p in vae.parameters()) / 1e6
    assert 100 < n < 120  # the released VQVAE has about 109M parameters


def test_fixture_json_loads(fx):
    raw = json.loads(fx.config_path.read_text())
    assert fx.cfg.var.depth == raw["var"]["depth"]
    assert list(fx.cfg.patch_nums) == raw["vae"]["v_patch_nums"]


def test_official_training_args_accepted(tmp_path):
    raw = json.loads(get_fixture("var_tiny_256").config_path.read_text())
    raw["var"].update(drop_path_rate=0.1, cond_drop_rate=0.1, patch_nums=raw["vae"]["v_patch_nums"])
    raw["vae"].update(beta=0.25, using_znorm=False, quant_conv_ks=3)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(raw))
    assert load_config(p).var.depth == 2
    raw["vae"]["using_znorm"] = True
    p.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="using_znorm"):
        load_config(p)


@pytest.mark.parametrize("share,keys", [(0, "quantize.quant_resi.9.weight"), (1, "quantize.quant_resi.qresi.weight"),
                                        (4, "quantize.quant_resi.qresi_ls.3.weight")])
def test_phi_layouts(share, keys):
    import dataclasses
    cfg = dataclasses.replace(get_preset("d16").vae, share_quant_resi=share, ch=32)
    with torch.device("meta"):
        sd = VQVAE(cfg).state_dict()
    assert keys in sd


def test_known_buffers_tolerated(tmp_path):
    fx = get_fixture("var_tiny_256")
    sd = torch.load(fx.var_ckpt, weights_only=True)
    assert "attn_bias_for_masking" in sd
    for drop in (["attn_bias_for_masking", "lvl_1L"], [k for k in sd if k.endswith("zero_k_bias")]):
        p = tmp_path / "v.pth"
        torch.save({k: v for k, v in sd.items() if k not in drop}, p)
        load_var_checkpoint(VAR(fx.cfg), p)


def test_old_checkpoint_without_scale_mul(tmp_path):
    fx = get_fixture("var_tiny_256")
    sd = torch.load(fx.var_ckpt, weights_only=True)
    p = tmp_path / "old.pth"
    torch.save({k: v for k, v in sd.items() if "scale_mul" not in k}, p)
    var = VAR(fx.cfg)
    with pytest.warns(UserWarning, match="scale_mul_1H11"):
        load_var_checkpoint(var, p)
    assert torch.allclose(var.blocks[0].attn.scale_mul_1H11, torch.tensor(math.log(4.0)))


def test_unknown_key_reported(tmp_path):
    fx = get_fixture("var_tiny_256")
    sd = torch.load(fx.var_ckpt, weights_only=True)
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    p = tmp_path / "x.pth"
    torch.save(sd, p)
    with pytest.raises(CheckpointError, match="blocks.0.extra.weight"):
        load_var_checkpoint(VAR(fx.cfg), p)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="d16"):
        get_preset("d17")
    assert set(PRESETS) == {"d16", "d20", "d24", "d30", "d36"}
