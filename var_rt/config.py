"""Model configuration: presets of the official release and the fixtures' JSON format.

A checkpoint's shape (depth, width, heads) and its token schedule (``patch_nums``)
belong together: the schedule is never guessed from a file name, it comes from a
preset or from a JSON config.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Tuple

from var_rt import validation
from var_rt.errors import ConfigError, InputError

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """Arguments of the official multi-scale VQVAE (``vae_ch160v4096z32``)."""

    vocab_size: int = 4096      # V: codebook rows
    z_channels: int = 32        # Cvae: channels of f_hat and of each codebook vector
    ch: int = 160               # base width of encoder and decoder
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)  # 16x downsampling
    num_res_blocks: int = 2
    share_quant_resi: int = 4   # phi convolutions: 0 one per scale, 1 one for all, n>1 n shared ones
    quant_resi: float = 0.5     # phi(h) = (1-r) h + r conv(h); |r| ~ 0 means no phi at all
    default_qresi_counts: int = 0  # with share_quant_resi 0: number of phis (0 = one per scale)
    patch_nums: Tuple[int, ...] = PATCH_NUMS_256


@dataclasses.dataclass(frozen=True)
class VARConfig:
    """Arguments of the official VAR transformer."""

    num_classes: int = 1000
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A VAR transformer together with the VQVAE it was trained on."""

    name: str
    var: VARConfig
    vae: VQVAEConfig
    vae_checkpoint: str | None = None   # path from a JSON config, relative to it

    @property
    def patch_nums(self) -> Tuple[int, ...]:
        return self.vae.patch_nums

    @property
    def num_scales(self) -> int:
        return len(self.vae.patch_nums)

    @property
    def num_tokens(self) -> int:
        """L: tokens over all scales (680 at 256 px, 2240 at 512 px)."""
        return sum(pn * pn for pn in self.vae.patch_nums)

    @property
    def image_size(self) -> int:
        return self.vae.patch_nums[-1] * 2 ** (len(self.vae.ch_mult) - 1)

    @property
    def head_dim(self) -> int:
        return self.var.embed_dim // self.var.num_heads

    def scale_ranges(self) -> list[tuple[int, int]]:
        """(begin, end) token offsets of each scale in the flattened sequence."""
        out, cur = [], 0
        for pn in self.vae.patch_nums:
            out.append((cur, cur + pn * pn))
            cur += pn * pn
        return out

    def to_dict(self) -> dict:
        return {"name": self.name, "var": dataclasses.asdict(self.var),
                "vae": dataclasses.asdict(self.vae)}


def _preset(depth: int, patch_nums=PATCH_NUMS_256, shared_aln=False) -> ModelConfig:
    # Official rule: width = 64 * depth, heads = depth (head dim 64).
    return ModelConfig(
        name=f"d{depth}",
        var=VARConfig(depth=depth, embed_dim=64 * depth, num_heads=depth, shared_aln=shared_aln),
        vae=VQVAEConfig(patch_nums=tuple(patch_nums)),
    )


PRESETS: dict[str, ModelConfig] = {
    "d16": _preset(16),
    "d20": _preset(20),
    "d24": _preset(24),
    "d30": _preset(30),
    "d36": _preset(36, PATCH_NUMS_512, shared_aln=True),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)} "
                          f"or pass a JSON config with --config") from None


# Official constructor arguments that only matter for training (or are fixed): accepted and ignored
# when they hold the value inference assumes.
_IGNORED = {
    "vae": {"dropout": None, "beta": None, "test_mode": None, "using_znorm": False, "quant_conv_ks": 3},
    "var": {"drop_rate": None, "attn_drop_rate": None, "drop_path_rate": None, "cond_drop_rate": None,
            "flash_if_available": None, "fused_if_available": None, "patch_nums": None},
}


# Smallest allowed value of each integer field (1 where not listed) and of the positive float fields.
_INT_MINIMUM = {"share_quant_resi": 0, "default_qresi_counts": 0}
_POSITIVE_FLOATS = ("mlp_ratio", "norm_eps")
_REQUIRED_VAR = ("depth", "embed_dim", "num_heads")
_GROUPS = 32  # the VQVAE's GroupNorm: every channel count must be a multiple of it


def _check_value(cls, name: str, value, label: str):
    """One config value against its field's type (from the dataclass default) and range; label names it."""
    default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
    try:
        if isinstance(default, bool):
            return validation.flag(value, label)
        if isinstance(default, int):
            return validation.integer(value, label, minimum=_INT_MINIMUM.get(name, 1))
        if isinstance(default, float):
            v = validation.number(value, label)
            if name in _POSITIVE_FLOATS and v <= 0:
                raise InputError(f"{label} must be > 0, got {v:g}")
            return v
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)) or not value:
                raise InputError(f"{label} must be a non-empty list of integers, got {validation.show(value)}")
            return tuple(validation.integer(v, f"{label}[{i}]", minimum=1) for i, v in enumerate(value))
    except InputError as e:  # the same checks as requests, reported as a config error
        raise ConfigError(str(e)) from None
    return value


def _take(section, cls, where: str, renames: dict | None = None, ignored: dict | None = None):
    renames, ignored = renames or {}, ignored or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a JSON object of settings, got {validation.show(section)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in section.items():
        if key in ignored:
            if ignored[key] is not None and value != ignored[key]:
                raise ConfigError(f"{where}: {key}={value!r} is not supported (only {ignored[key]!r})")
            continue
        name = renames.get(key, key)
        if name not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {sorted(fields | set(renames))}")
        kwargs[name] = _check_value(cls, name, value, f"{where}.{key}")
    return cls(**kwargs)


def load_config(path: str | Path) -> ModelConfig:
    """Read a model config in the fixtures' JSON format (``{"vae": {...}, "var": {...}}``).

    Every value is checked for its type and range, and the values for consistency, with messages that
    name the field; the checkpoint is checked against the config when it is loaded (var_rt.checkpoint).
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(path)!r} is a folder: give the JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({e.strerror})") from None
    if not isinstance(raw, dict) or "var" not in raw or "vae" not in raw:
        raise ConfigError(f"config file {str(path)!r} must be a JSON object with 'var' and 'vae' sections")
    vae = _take(raw["vae"], VQVAEConfig, f"{path}: vae", {"v_patch_nums": "patch_nums"}, _IGNORED["vae"])
    var = _take(raw["var"], VARConfig, f"{path}: var", None, _IGNORED["var"])
    # The transformer's size has no default worth taking silently (the dataclass's are d16's): with
    # --random-weights nothing else would say the config meant another model.
    missing = [f"var.{k}" for k in _REQUIRED_VAR if k not in raw["var"]]
    if missing:
        raise ConfigError(f"{path}: {', '.join(missing)} missing: a config gives the transformer's size "
                          f"({', '.join(f'var.{k}' for k in _REQUIRED_VAR)}; e.g. d16: 16, 1024, 16)")
    var_pn = raw["var"].get("patch_nums")
    if var_pn is not None and (not isinstance(var_pn, list) or tuple(var_pn) != vae.patch_nums):
        raise ConfigError(f"{path}: var.patch_nums {var_pn} differs from vae.v_patch_nums {list(vae.patch_nums)}")
    vae_ckpt = raw.get("vae_checkpoint")
    if vae_ckpt is not None:
        if not isinstance(vae_ckpt, str) or not vae_ckpt:
            raise ConfigError(f"{path}: vae_checkpoint must be a file name (relative to the config), "
                              f"got {validation.show(vae_ckpt)}")
        vae_ckpt = str((path.parent / vae_ckpt).resolve())
    cfg = ModelConfig(name=path.stem if path.stem != "config" else path.parent.name,
                      var=var, vae=vae, vae_checkpoint=vae_ckpt)
    validate_config(cfg, f"{path}: ")
    return cfg


def check_weight_source(random_weights: bool, var_ckpt, vae_ckpt) -> None:
    """A model's weights come from its checkpoints or are random, not both (the CLI, export.build and
    VARPipeline.load all refuse the mix with this message)."""
    if random_weights and (var_ckpt or vae_ckpt):
        raise ConfigError("--random-weights cannot be combined with --var-ckpt/--vae-ckpt")


def validate_config(cfg: ModelConfig, where: str = "") -> None:
    """Consistency of a config's values (each value's own type and range is checked when it is read)."""
    v, q = cfg.var, cfg.vae
    if v.embed_dim % v.num_heads:
        raise ConfigError(f"{where}var.embed_dim {v.embed_dim} is not divisible by var.num_heads {v.num_heads}")
    if round(v.embed_dim * v.mlp_ratio) < 1:
        raise ConfigError(f"{where}var.mlp_ratio {v.mlp_ratio:g} leaves no hidden units (embed_dim * mlp_ratio < 1)")
    if sorted(cfg.patch_nums) != list(cfg.patch_nums) or cfg.patch_nums[0] < 1:
        raise ConfigError(f"{where}vae.v_patch_nums must grow from at least 1, got {list(cfg.patch_nums)}")
    if len(cfg.patch_nums) < 2:
        raise ConfigError(f"{where}vae.v_patch_nums needs at least two scales, got {list(cfg.patch_nums)}")
    odd = [q.ch * m for m in (1,) + tuple(q.ch_mult) if (q.ch * m) % _GROUPS]
    if odd:
        raise ConfigError(f"{where}vae.ch {q.ch} with vae.ch_mult {list(q.ch_mult)} gives {odd[0]} channels: the "
                          f"VQVAE's group norms need multiples of {_GROUPS}")


def parameter_counts(cfg: ModelConfig) -> Tuple[int, int]:
    """(VAR, VQVAE) parameter counts of a config, computed from its sizes without building anything.

    Used to bound a config's sizes before any module is built (a ``depth`` of 10^12 would otherwise build
    blocks until memory runs out): against what a checkpoint holds, or against the machine's memory with
    random weights. Exact for the modules in var_rt/models (tests/test_config_checkpoint.py checks it).
    """
    v, q = cfg.var, cfg.vae
    C, V, Cv = v.embed_dim, q.vocab_size, q.z_channels
    linear = lambda i, o: i * o + o  # noqa: E731
    hidden = round(C * v.mlp_ratio)
    block = (3 * C * C + 2 * C + (v.num_heads if v.attn_l2_norm else 0) + linear(C, C)
             + linear(C, hidden) + linear(hidden, C) + (6 * C if v.shared_aln else linear(C, 6 * C)))
    var = (v.depth * block + linear(Cv, C) + (v.num_classes + 1) * C + cfg.patch_nums[0] ** 2 * C
           + cfg.num_tokens * C + cfg.num_scales * C + (linear(C, 6 * C) if v.shared_aln else 0)
           + linear(C, 2 * C) + linear(C, V))

    conv = lambda i, o, k=3: i * o * k * k + o  # noqa: E731
    norm = lambda c: 2 * c  # noqa: E731
    res = lambda i, o: norm(i) + conv(i, o) + norm(o) + conv(o, o) + (conv(i, o, 1) if i != o else 0)  # noqa: E731
    attn = lambda c: norm(c) + conv(c, 3 * c, 1) + conv(c, c, 1)  # noqa: E731
    mid = lambda c: 2 * res(c, c) + attn(c)  # noqa: E731
    mult, n, last = q.ch_mult, q.num_res_blocks, len(q.ch_mult) - 1
    enc, cin = conv(3, q.ch), q.ch
    for lvl, m in enumerate(mult):
        if n:
            enc += res(cin, q.ch * m) + (n - 1) * res(q.ch * m, q.ch * m)
            cin = q.ch * m
        enc += n * attn(cin) if lvl == last else conv(cin, cin)
    enc += mid(cin) + norm(cin) + conv(cin, Cv)
    cin = q.ch * mult[-1]
    dec = conv(Cv, cin) + mid(cin)
    for lvl in reversed(range(len(mult))):
        out = q.ch * mult[lvl]
        dec += res(cin, out) + n * res(out, out)
        cin = out
        dec += (n + 1) * attn(cin) if lvl == last else 0
        dec += conv(cin, cin) if lvl != 0 else 0
    dec += norm(cin) + conv(cin, 3)
    phis = {0: q.default_qresi_counts or cfg.num_scales, 1: 1}.get(q.share_quant_resi, q.share_quant_resi)
    quant = V * Cv + (phis * conv(Cv, Cv) if abs(q.quant_resi) > 1e-6 else 0)
    return var, enc + dec + quant + 2 * conv(Cv, Cv)
