"""Presets, the JSON config format, and checkpoint tolerance of known buffers."""
import json
import math
import re

import pytest
import torch

from conftest import get_fixture
from var_rt.checkpoint import load_vae_checkpoint, load_var_checkpoint
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


# ---- issue 13: bad config values and non-finite weights ------------------------------------------------

@pytest.mark.parametrize("section, key, value, needle", [
    ("var", "depth", "x", "var.depth must be an integer, got 'x'"),
    ("var", "depth", -1, "var.depth must be >= 1, got -1"),
    ("var", "depth", 2.0, "var.depth must be an integer, got 2.0"),
    ("var", "num_heads", 0, "var.num_heads must be >= 1, got 0"),
    ("var", "num_heads", 3, "var.embed_dim 128 is not divisible by var.num_heads 3"),
    ("var", "mlp_ratio", "big", "var.mlp_ratio must be a finite number, got 'big'"),
    ("var", "norm_eps", 0, "var.norm_eps must be > 0"),
    ("var", "shared_aln", 1, "var.shared_aln must be true or false, got 1"),
    ("vae", "vocab_size", None, "vae.vocab_size must be an integer, got None"),
    ("vae", "ch", 40, "vae.ch 40 with vae.ch_mult [1, 1, 2, 2, 4] gives 40 channels"),
    ("vae", "ch_mult", [], "vae.ch_mult must be a non-empty list of integers"),
    ("vae", "v_patch_nums", [1, 2, "3"], "vae.v_patch_nums[2] must be an integer, got '3'"),
    ("vae", "v_patch_nums", [1, 3, 2], "vae.v_patch_nums must grow from at least 1"),
    ("vae", "quant_resi", float("nan"), "vae.quant_resi must be a finite number"),
])
def test_bad_config_values_name_the_field(tmp_path, section, key, value, needle):
    raw = json.loads(get_fixture("var_tiny_256").config_path.read_text())
    raw[section][key] = value
    p = tmp_path / "c.json"
    p.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(p)


def test_checkpoint_mismatch_names_config_fields(tmp_path):
    import dataclasses
    fx = get_fixture("var_tiny_256")
    cfg = dataclasses.replace(fx.cfg, var=dataclasses.replace(fx.cfg.var, depth=3, num_classes=5))
    with pytest.raises(CheckpointError, match="var.depth is 3 in the config but 2 in the file; "
                                              "var.num_classes is 5 in the config but 10 in the file"):
        load_var_checkpoint(VAR(cfg), fx.var_ckpt)
    vae_cfg = dataclasses.replace(fx.cfg.vae, ch_mult=(1, 1, 2, 2))
    with pytest.raises(CheckpointError, match=re.escape("vae.ch_mult is [1, 1, 2, 2] in the config but "
                                                        "[1, 1, 2, 2, 4] in the file")):
        load_vae_checkpoint(VQVAE(vae_cfg), fx.vae_ckpt)


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_non_finite_weights_refused(tmp_path, value):
    fx = get_fixture("var_tiny_256")
    sd = torch.load(fx.var_ckpt, weights_only=True)
    sd["blocks.1.ffn.fc2.weight"][3, 4] = value
    p = tmp_path / "v.pth"
    torch.save(sd, p)
    with pytest.raises(CheckpointError, match=r"NaN or infinite values \(in blocks.1.ffn.fc2.weight\)"):
        load_var_checkpoint(VAR(fx.cfg), p)


def test_one_model_build_for_the_pipeline_and_the_serve_precheck():
    """pipeline.build_models makes VARPipeline.load's models and, on the meta device, serve's pre-check: the same
    modules (no weights allocated for the check), and one refusal of random weights mixed with checkpoints."""
    from var_rt.pipeline import VARPipeline, build_models
    from var_rt.serve import check_model_files
    fx = get_fixture("var_tiny_256")
    var, vae = build_models(fx.cfg, str(fx.var_ckpt), str(fx.vae_ckpt))
    meta_var, meta_vae = build_models(fx.cfg, str(fx.var_ckpt), str(fx.vae_ckpt), meta=True)
    assert not any(p.is_meta for m in (var, vae) for p in m.parameters())
    assert all(p.is_meta for m in (meta_var, meta_vae) for p in m.parameters())
    assert var.state_dict().keys() == meta_var.state_dict().keys()
    assert vae.state_dict().keys() == meta_vae.state_dict().keys()
    mixed = dict(config=str(fx.config_path), vae_ckpt=str(fx.vae_ckpt), random_weights=True, device="cpu")
    refused = "--random-weights cannot be combined with --var-ckpt/--vae-ckpt"
    with pytest.raises(ConfigError, match=refused):
        VARPipeline.load(**mixed)
    with pytest.raises(ConfigError, match=refused):
        check_model_files(mixed)
