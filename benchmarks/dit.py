"""DiT-XL/2 baseline through ``diffusers`` (random weights; optional extra 'bench').

DiT-XL/2 at 256 px: DiTTransformer2DModel (28 layers, hidden 1152 = 16 heads x 72, patch 2,
32 x 32 x 4 latent, learned sigma: 8 output channels, 1000 classes + null) and the SD VAE decoder
(AutoencoderKL, block_out_channels 128/256/512/512, 2 layers per block, 4 latent channels), FP16,
DDIM scheduler, guidance 1.5 (the pipeline doubles the batch), run through ``DiTPipeline`` with
``output_type='pt'`` (images stay on the device, like the VAR paths).
"""
from __future__ import annotations

from typing import Optional, Tuple


def available() -> Tuple[bool, str]:
    try:
        import diffusers  # noqa: F401
        from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"diffusers not importable ({type(e).__name__}: {e}); pip install '.[bench]'"
    return True, f"diffusers {diffusers.__version__}"


def dit_xl2_config(tiny: bool = False) -> dict:
    if tiny:  # for CPU tests of the benchmark's logic only
        return dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                    sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
                    norm_elementwise_affine=False)
    return dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
                norm_elementwise_affine=False)


def sd_vae_config(tiny: bool = False) -> dict:
    blocks = (32, 32) if tiny else (128, 256, 512, 512)
    return dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1 if tiny else 2,
                block_out_channels=blocks, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                up_block_types=("UpDecoderBlock2D",) * len(blocks), norm_num_groups=32,
                sample_size=64 if tiny else 256, scaling_factor=0.18215)


def build_pipeline(device, dtype, tiny: bool = False, seed: int = 0):
    """A DiTPipeline with random weights on ``device`` in ``dtype`` (DDIM scheduler)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(**dit_xl2_config(tiny))
    vae = AutoencoderKL(**sd_vae_config(tiny))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False, set_alpha_to_one=False)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, labels, steps: int, guidance: float = 1.5, seed: int = 0, device=None) -> "torch.Tensor":
    import torch
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = pipe(class_labels=list(labels), guidance_scale=guidance, num_inference_steps=steps, generator=g,
               output_type="pt")
    return out.images


def param_count(pipe) -> Optional[int]:
    try:
        return sum(p.numel() for p in pipe.transformer.parameters())
    except Exception:
        return None
