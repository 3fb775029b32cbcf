"""var_rt.ops: the PyTorch implementations against the VQVAE reference, opcheck, and the CUDA kernels.

CUDA tests run when a GPU is present and the extension is built (csrc/README.md); they skip
with the reason otherwise.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from var_rt import ops
from var_rt.config import VQVAEConfig
from var_rt.models.vqvae import VectorQuantizer

SCHEDULES = {
    16: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    32: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
}
CASES = [(P, si) for P, pns in SCHEDULES.items() for si in range(len(pns))]

HAS_CUDA = torch.cuda.is_available()
needs_kernels = pytest.mark.skipif(
    not (HAS_CUDA and ops.extension_loaded()),
    reason="no CUDA device" if not HAS_CUDA else
    f"CUDA extension not built (csrc/build.sh){': ' + ops.extension_error() if ops.extension_error() else ''}",
)
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


def make_quantizer(P: int, Cv: int = 16, share: int = 4, quant_resi: float = 0.5, seed: int = 0) -> VectorQuantizer:
    cfg = dataclasses.replace(VQVAEConfig(), vocab_size=64, z_channels=Cv, share_quant_resi=share,
                              quant_resi=quant_resi, patch_nums=SCHEDULES[P])
    torch.manual_seed(seed)
    q = VectorQuantizer(cfg).eval()
    with torch.no_grad():  # conv weights of a realistic size (default init is fine too; keep both terms visible)
        for m in q.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, 0.1)
                m.bias.normal_(0, 0.1)
    return q


def reference_transition(q: VectorQuantizer, si: int, f_hat, h_BlC):
    """The model's own arithmetic (TransitionGraph): scale_residual, then area downsampling."""
    pns = q.patch_nums
    B, l, Cv = h_BlC.shape
    pn = pns[si]
    f_new = f_hat + q.scale_residual(si, h_BlC.float().transpose(1, 2).reshape(B, Cv, pn, pn))
    if si == len(pns) - 1:
        return f_new, None
    nxt = pns[si + 1]
    return f_new, F.interpolate(f_new, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2)


def random_inputs(q: VectorQuantizer, si: int, B: int, device="cpu", h_dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    P, pn, Cv = q.patch_nums[-1], q.patch_nums[si], q.embedding.weight.shape[1]
    f_hat = torch.randn(B, Cv, P, P, generator=g).to(device)
    h = torch.randn(B, pn * pn, Cv, generator=g).to(device, h_dtype)
    return f_hat, h


def next_side(q, si):
    return q.patch_nums[si + 1] if si + 1 < len(q.patch_nums) else 0


# ---------------------------------------------------------------------------------------------
# PyTorch implementations (CPU)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("P,si", CASES)
def test_transition_fallback_matches_model(P, si):
    q = make_quantizer(P)
    f_hat, h = random_inputs(q, si, B=2, seed=si)
    ref_f, ref_n = reference_transition(q, si, f_hat, h)
    w, b, r = ops.transition_params(q, si)
    pn_next = next_side(q, si)
    nxt = torch.full((2, pn_next ** 2, f_hat.shape[1]), float("nan")) if pn_next else None
    ops.scale_transition(f_hat, h, w, b, r, pn_next, nxt)
    torch.testing.assert_close(f_hat, ref_f, rtol=1e-5, atol=1e-5)
    if pn_next:
        torch.testing.assert_close(nxt, ref_n, rtol=1e-5, atol=1e-5)


def test_transition_identity_phi():
    q = make_quantizer(16, quant_resi=0.0)
    assert isinstance(q.phi(0), torch.nn.Identity)
    w, b, r = ops.transition_params(q, 3)
    assert r == 0.0 and not w.any() and not b.any()
    f_hat, h = random_inputs(q, 3, B=1)
    ref_f, ref_n = reference_transition(q, 3, f_hat, h)
    nxt = torch.empty(1, 25, 16)
    ops.scale_transition(f_hat, h, w, b, r, 5, nxt)
    torch.testing.assert_close(f_hat, ref_f)
    torch.testing.assert_close(nxt, ref_n)


def test_transition_params_selects_phi():
    q = make_quantizer(16, share=4)
    for si in range(10):
        w, b, r = ops.transition_params(q, si)
        assert w.dtype == torch.float32 and w.is_contiguous() and r == pytest.approx(0.5)
        assert torch.equal(w, q.phi(si).weight)


def test_transition_fp16_tokens_out():
    q = make_quantizer(16)
    f_hat, h = random_inputs(q, 4, B=3, h_dtype=torch.float16)
    ref_f, ref_n = reference_transition(q, 4, f_hat, h)
    nxt = torch.empty(3, 36, 16, dtype=torch.float16)
    ops.scale_transition(f_hat, h, *ops.transition_params(q, 4), 6, nxt)
    torch.testing.assert_close(f_hat, ref_f)
    torch.testing.assert_close(nxt, ref_n.half())


def test_transition_rejects_bad_shapes():
    q = make_quantizer(16)
    f_hat, h = random_inputs(q, 2, B=1)
    w, b, r = ops.transition_params(q, 2)
    with pytest.raises(RuntimeError):
        ops.scale_transition(f_hat, h[:, :5], w, b, r, 4, torch.empty(1, 16, 16))  # 5 tokens: not a square
    with pytest.raises(RuntimeError):
        ops.scale_transition(f_hat, h, w, b, r, 4, torch.empty(1, 15, 16))
    with pytest.raises(ValueError):
        ops.scale_transition(f_hat, h, w, b, r, 4, None)


def kv_shapes(L=30, l=9):
    return (2, 4, 3, L, 8), (2, 4, 3, l, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_kv_write_fallback(dtype):
    cs, ns = kv_shapes()
    ck, cv = torch.randn(cs).to(dtype), torch.randn(cs).to(dtype)
    kn, vn = torch.randn(ns).to(dtype), torch.randn(ns).to(dtype)
    ek, ev = ck.clone(), cv.clone()
    ek[:, :, :, 5:14], ev[:, :, :, 5:14] = kn, vn
    ops.kv_write(ck, cv, kn, vn, 5)
    assert torch.equal(ck, ek) and torch.equal(cv, ev)
    with pytest.raises(RuntimeError):
        ops.kv_write(ck, cv, kn, vn, 25)  # runs past the end


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b", [0, 1, 21])
def test_kv_append_fallback(dtype, b):
    past = torch.randn(2, 4, 3, b, 8).to(dtype)
    present = torch.randn(2, 4, 3, 9, 8).to(dtype)
    dst = torch.full((2, 4, 3, b + 9, 8), float("nan"), dtype=dtype)
    ops.kv_append(dst, past, present)
    assert torch.equal(dst, torch.cat((past, present), dim=3))


# ---------------------------------------------------------------------------------------------
# opcheck: schema (declared mutations), fake tensors, AOT dispatch
# ---------------------------------------------------------------------------------------------

def _opcheck_args(device):
    q = make_quantizer(16)
    f_hat, h = random_inputs(q, 4, B=2, device=device)
    w, b, r = (t.to(device) if torch.is_tensor(t) else t for t in ops.transition_params(q, 4))
    last_f, last_h = random_inputs(q, 9, B=2, device=device)
    cs, ns = kv_shapes()
    kv = [torch.randn(s, device=device, dtype=torch.float16) for s in (cs, cs, ns, ns)]
    past, present = torch.randn(*ns[:3], 6, 8, device=device), torch.randn(ns, device=device)
    return [
        (torch.ops.var_rt.scale_transition, (f_hat, h, w, b, r, 6, torch.empty(2, 36, 16, device=device))),
        (torch.ops.var_rt.scale_transition, (last_f, last_h, w, b, r, 0, torch.empty(0, device=device))),
        (torch.ops.var_rt.kv_write, (*kv, 7)),
        (torch.ops.var_rt.kv_append, (torch.empty(*ns[:3], 15, 8, device=device), past, present)),
    ]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_opcheck(device):
    for op, args in _opcheck_args(device):
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# CUDA kernels against the reference
# ---------------------------------------------------------------------------------------------

def _poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan"))


@needs_kernels
@pytest.mark.parametrize("P,si", CASES)
@pytest.mark.parametrize("Cv,B", [(16, 3), (32, 2)])
def test_transition_cuda_float32(P, si, Cv, B):
    q = make_quantizer(P, Cv=Cv, seed=si)
    pn_next = next_side(q, si)
    w, b, r = (t.cuda() if torch.is_tensor(t) else t for t in ops.transition_params(q, si))
    for trial in range(2):  # fresh inputs, poisoned outputs, each time
        f_hat, h = random_inputs(q, si, B, device="cuda", seed=100 * si + trial)
        ref_f, ref_n = ops.scale_transition_reference(f_hat.double(), h.double(), w, b, r, pn_next)
        nxt = _poison(torch.empty(B, pn_next ** 2, Cv, device="cuda")) if pn_next else None
        ops.scale_transition(f_hat, h, w, b, r, pn_next, nxt)
        torch.cuda.synchronize()
        torch.testing.assert_close(f_hat.double(), ref_f, rtol=1e-5, atol=1e-5)
        if pn_next:
            torch.testing.assert_close(nxt.double(), ref_n, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("si", [0, 4, 8, 9])
@pytest.mark.parametrize("h_dtype,out_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float32)])
def test_transition_cuda_half(si, h_dtype, out_dtype):
    q = make_quantizer(32, Cv=32)
    pn_next = next_side(q, si)
    w, b, r = (t.cuda() if torch.is_tensor(t) else t for t in ops.transition_params(q, si))
    f_hat, h = random_inputs(q, si, 4, device="cuda", h_dtype=h_dtype, seed=si)
    ref_f, ref_n = ops.scale_transition_reference(f_hat.double(), h.double(), w, b, r, pn_next)
    nxt = _poison(torch.empty(4, pn_next ** 2, 32, device="cuda", dtype=out_dtype)) if pn_next else None
    ops.scale_transition(f_hat, h, w, b, r, pn_next, nxt)
    torch.testing.assert_close(f_hat.double(), ref_f, rtol=1e-5, atol=1e-5)  # h is exact in float32
    if pn_next:
        tol = 1e-2 if out_dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(nxt.double(), ref_n, rtol=tol, atol=tol)


@needs_kernels
@pytest.mark.parametrize("Cv,P,pn,pn_next", [(64, 32, 24, 32), (20, 24, 7, 11), (1, 8, 3, 5), (48, 16, 16, 0)])
def test_transition_cuda_odd_shapes(Cv, P, pn, pn_next):
    g = torch.Generator().manual_seed(Cv)
    f_hat = torch.randn(3, Cv, P, P, generator=g).cuda()
    h = torch.randn(3, pn * pn, Cv, generator=g).cuda()
    w, b = (torch.randn(Cv, Cv, 3, 3, generator=g) * 0.1).cuda(), torch.randn(Cv, generator=g).cuda()
    ref_f, ref_n = ops.scale_transition_reference(f_hat.double(), h.double(), w, b, 0.3, pn_next)
    nxt = _poison(torch.empty(3, pn_next ** 2, Cv, device="cuda")) if pn_next else None
    ops.scale_transition(f_hat, h, w, b, 0.3, pn_next, nxt)
    torch.testing.assert_close(f_hat.double(), ref_f, rtol=1e-5, atol=1e-5)
    if pn_next:
        torch.testing.assert_close(nxt.double(), ref_n, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_transition_cuda_current_stream():
    """The kernel runs on PyTorch's current stream. Captured into a CUDA graph (torch.cuda.graph captures on
    its own stream in global mode, where a launch on the legacy default stream is an error and one on any
    other stream runs at once): nothing runs at capture, the replay gives the reference. (A check that keeps
    the default stream busy and reads the results on another stream did not fail with the kernel launched on
    stream 0: H200, 2026-12-04.)"""
    q = make_quantizer(16)
    w, b, r = (t.cuda() if torch.is_tensor(t) else t for t in ops.transition_params(q, 5))
    f_hat, h = random_inputs(q, 5, 8, device="cuda")
    ref_f, ref_n = ops.scale_transition_reference(f_hat.double(), h.double(), w, b, r, 8)
    nxt = _poison(torch.empty(8, 64, 16, device="cuda"))
    f0 = f_hat.clone()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ops.scale_transition(f_hat, h, w, b, r, 8, nxt)
    torch.cuda.synchronize()
    assert torch.equal(f_hat, f0) and nxt.isnan().all(), "the kernel ran at capture: not on the capturing stream"
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(nxt.double(), ref_n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_hat.double(), ref_f, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("c", [64, 8, 3])  # 3 halves: rows of 6 bytes, the narrow-vector path
def test_kv_write_cuda(dtype, c):
    cs, ns = (2, 4, 3, 680, c), (2, 4, 3, 169, c)
    for begin in (0, 511):
        ck, cv = _poison(torch.empty(cs, device="cuda", dtype=dtype)), torch.randn(cs, device="cuda").to(dtype)
        kn, vn = torch.randn(ns, device="cuda").to(dtype), torch.randn(ns, device="cuda").to(dtype)
        ek, ev = ck.clone(), cv.clone()
        ek[:, :, :, begin:begin + 169], ev[:, :, :, begin:begin + 169] = kn, vn
        ops.kv_write(ck, cv, kn, vn, begin)
        assert torch.equal(ck.nan_to_num(7.0), ek.nan_to_num(7.0)) and torch.equal(cv, ev)


@needs_kernels
def test_kv_write_cuda_strided_source():
    # keys as attention produces them: (depth, R, l, H, c) permuted to (depth, R, H, l, c)
    k_raw = torch.randn(2, 4, 25, 3, 64, device="cuda", dtype=torch.float16)
    v_raw = torch.randn(2, 4, 25, 3, 64, device="cuda", dtype=torch.float16)
    kn, vn = k_raw.transpose(2, 3), v_raw.transpose(2, 3)
    ck = torch.zeros(2, 4, 3, 100, 64, device="cuda", dtype=torch.float16)
    cv = torch.zeros_like(ck)
    ops.kv_write(ck, cv, kn, vn, 30)
    assert torch.equal(ck[:, :, :, 30:55], kn) and torch.equal(cv[:, :, :, 30:55], vn)
    assert not ck[:, :, :, :30].any() and not ck[:, :, :, 55:].any()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,l", [(0, 1), (1, 4), (30, 25), (424, 256)])
def test_kv_append_cuda(dtype, b, l):
    past = torch.randn(3, 4, 2, b, 64, device="cuda").to(dtype)
    present = torch.randn(3, 4, 2, l, 64, device="cuda").to(dtype)
    dst = _poison(torch.empty(3, 4, 2, b + l, 64, device="cuda", dtype=dtype))
    ops.kv_append(dst, past, present)
    assert torch.equal(dst, torch.cat((past, present), dim=3))


# ---------------------------------------------------------------------------------------------
# The compute-dtype policy of the fused transition (FP16/BF16 phi weights)
# ---------------------------------------------------------------------------------------------

def _policy_quantizer(P: int, dtype: torch.dtype, Cv: int = 32, seed: int = 0, quant_resi: float = 0.5) -> VectorQuantizer:
    from var_rt import precision
    return precision.apply(make_quantizer(P, Cv=Cv, seed=seed, quant_resi=quant_resi), dtype)


def test_transition_params_keep_the_compute_dtype():
    """phi's weights reach the op in the compute dtype: the op rounds the conv's input to it."""
    q = _policy_quantizer(16, torch.float16)
    w, b, r = ops.transition_params(q, 3)
    assert w.dtype == b.dtype == torch.float16 and 0 < r < 1


@pytest.mark.parametrize("si", [2, 9])
def test_transition_reference_rounds_as_pytorch_fp16_conv(si):
    """With FP16 weights the reference computes phi as PyTorch's FP16 convolution does on CUDA: FP16 operands,
    the conv's sums rounded to FP16, + bias rounded, * r rounded; the blend and f_hat in the wide dtype.
    Leaving out any one of the roundings is a different function (r = 0.3: * 0.5 would be exact)."""
    q = _policy_quantizer(16, torch.float16, seed=si, quant_resi=0.3)
    f_hat, h = random_inputs(q, si, 2, seed=si)
    w, b, r = ops.transition_params(q, si)
    got_f, _ = ops.scale_transition_reference(f_hat.double(), h.double(), w, b, r, next_side(q, si))
    from var_rt.models.vqvae import upsample_codes
    B, l, Cv = h.shape
    pn = q.patch_nums[si]
    u = upsample_codes(h.double().transpose(1, 2).reshape(B, Cv, pn, pn), 16)
    conv = F.conv2d(u.half().double(), w.double(), None, padding=1)
    half = lambda x: x.half().double()  # noqa: E731
    want = f_hat.double() + (u * (1 - r) + half(half(half(conv) + b.double().view(1, -1, 1, 1)) * r))
    torch.testing.assert_close(got_f, want, rtol=1e-12, atol=1e-12)
    for wrong in (f_hat.double() + u * (1 - r) + (conv + b.double().view(1, -1, 1, 1)) * r,  # no output rounding
                  f_hat.double() + u * (1 - r) + half(half(conv + b.double().view(1, -1, 1, 1)) * r)):  # one fewer
        assert (got_f - wrong).abs().max() > 1e-6  # the rounding is really there


@needs_kernels
@pytest.mark.parametrize("P,si", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_transition_cuda_compute_dtype_policy(P, si, dtype):
    """FP16/BF16 weights: the kernel matches the float64 reference of the same operands closely, and the
    PyTorch transition of the precision policy (FP16 conv output) within the compute dtype's tolerance."""
    q = _policy_quantizer(P, dtype, seed=si).cuda()
    pn_next = next_side(q, si)
    w, b, r = ops.transition_params(q, si)
    for trial in range(2):
        f_hat, h = random_inputs(q, si, 3, device="cuda", seed=100 * si + trial)
        ref_f, ref_n = ops.scale_transition_reference(f_hat.double(), h.double(), w, b, r, pn_next)
        pol_f, pol_n = reference_transition(q, si, f_hat, h)
        nxt = _poison(torch.empty(3, pn_next ** 2, 32, device="cuda", dtype=dtype)) if pn_next else None
        ops.scale_transition(f_hat, h, w, b, r, pn_next, nxt)
        torch.cuda.synchronize()
        # The reference sums in float64, the kernel in float32: where the two land on either side of a
        # rounding boundary of the compute dtype, a conv input or the conv's rounded result differs by one
        # ulp (seen on the H200: 0.10-0.27 % of the elements at FP16); the rest agrees to float32 precision.
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        off = ((f_hat.double() - ref_f).abs() > 2e-5 * ref_f.abs() + 1e-5).double().mean().item()
        assert off < 5e-3, f"{off:.2e} of f_hat differs from the float64 reference by more than rounding"
        torch.testing.assert_close(f_hat.double(), ref_f, rtol=tol, atol=tol)
        torch.testing.assert_close(f_hat, pol_f, rtol=tol, atol=tol)
        if pn_next:
            torch.testing.assert_close(nxt.float(), pol_n, rtol=tol, atol=tol)
        # The kernel rounds the conv's result as PyTorch's conv in the compute dtype does: apart from the
        # rare element whose float32 sum (in another order) lands across a rounding boundary, f_hat is
        # the policy path's to float32 precision (without the roundings about half of them are not).
        same = ((f_hat - pol_f).abs() <= 1e-5 * (1 + pol_f.abs())).float().mean().item()
        assert same > 0.995, f"only {same:.4f} of f_hat matches PyTorch's {dtype} transition"
