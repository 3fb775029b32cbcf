"""The PyTorch reference against the official implementation's outputs (float32, CPU)."""
import torch

from conftest import token_mismatch
from var_rt.runtime import run_scale_loop
from var_rt.validation import Sampling

ATOL = 1e-4
# The decoded image: torch's float32 CPU GroupNorm sums a group's statistics in an order that depends on the
# thread count, and at 512 px (one 512x512 channel per group) one thread puts the image 2.2e-4 from the official
# output (two threads 8e-5, float64 8e-6; measured 2026-12-04). Still 1/35 of one 8-bit level (2/255).
IMAGE_ATOL = 5e-4


@torch.no_grad()
def test_teacher_forcing_logits(fx):
    c = fx.cases
    logits = fx.var.forward_teacher(c["labels"], c["teacher_forcing_input"])
    assert logits.shape == c["teacher_forcing_logits"].shape
    assert (logits - c["teacher_forcing_logits"]).abs().max() < ATOL


@torch.no_grad()
def test_teacher_forcing_input_from_idx(fx):
    c = fx.cases
    got = fx.vae.quantize.idx_to_var_input(c["gt_idx"])
    assert (got - c["teacher_forcing_input"]).abs().max() < ATOL


@torch.no_grad()
def test_fhat_and_decoded_image(fx):
    c = fx.cases
    f_hat = fx.vae.quantize.idx_to_fhat(c["gt_idx"])
    assert (f_hat - c["fhat_from_idx"]).abs().max() < ATOL
    img = fx.vae.decode_fhat(f_hat)
    assert (img - c["image_from_idx"]).abs().max() < IMAGE_ATOL


@torch.no_grad()
def test_encoder_token_maps(fx256):
    c = fx256.cases
    idx = fx256.vae.encode_idx(c["encoder_input_image"])
    bad, total = token_mismatch(idx, c["encoder_idx"])
    assert bad <= total * 0.003, f"{bad}/{total} encoder tokens differ"


@torch.no_grad()
def test_greedy_generation(fx):
    c = fx.cases
    labels = c["labels"]
    out = run_scale_loop(fx.var, fx.vae, labels, torch.arange(len(labels)),
                         Sampling(cfg=float(c["greedy_cfg"]), top_k=1, top_p=0.0))
    bad, total = token_mismatch(out.tokens, c["greedy_tokens"])
    assert bad <= total * 0.003, f"{bad}/{total} greedy tokens differ"
    assert (out.images - c["greedy_image"]).abs().max() < ATOL


def test_qkv_bias_follows_the_parameters():
    """SelfAttention keeps cat(q_bias, 0, v_bias) between calls; a changed bias (in place, loaded, cast or
    moved) gives the new concatenation, never the old one."""
    from var_rt.models.var import SelfAttention
    a = SelfAttention(8, 2, True)
    want = lambda: torch.cat((a.q_bias, a.zero_k_bias, a.v_bias))  # noqa: E731
    assert torch.equal(a.qkv_bias(), want())
    with torch.no_grad():
        a.q_bias.add_(1.0)
    assert torch.equal(a.qkv_bias(), want())
    a.load_state_dict({**a.state_dict(), "v_bias": torch.full((8,), 3.0)})
    assert torch.equal(a.qkv_bias(), want())
    a.half()
    assert a.qkv_bias().dtype == torch.float16 and torch.equal(a.qkv_bias(), want())
