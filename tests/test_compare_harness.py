"""The comparison harness (export/compare.py) over every exported graph on ONNX Runtime CPU, FP32 and FP16."""
import pytest
import torch

from export.compare import compare_export
from var_rt.graphs import all_graphs

pytest.importorskip("onnxruntime")
from test_export import exported  # noqa: E402


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_graph_within_its_precision_tolerance(fx256, precision):
    out = exported(fx256.name, precision)

    def inputs_of(g, module):  # the encoder gets a real image (its nearest-code search needs one)
        if g != "encode":
            return None
        from export.onnx_export import sample_inputs
        ins = sample_inputs(module, 2, torch.float16 if precision == "fp16" else torch.float32, seed=1)
        ins["image"] = fx256.cases["encoder_input_image"].add(1).mul(0.5)
        return ins

    checks = compare_export(out, all_graphs(fx256.var, fx256.vae), 2, precision, inputs_of=inputs_of)
    bad = [c for c in checks if not c.ok]
    assert len(checks) >= 2 * 10 + 4 and not bad, bad


def test_harness_catches_a_wrong_graph(fx256):
    """Against a module whose weights differ slightly from the exported ones, the harness reports it."""
    import copy

    from export.compare import compare_graph
    out = exported(fx256.name, "fp32")
    vae = copy.deepcopy(fx256.vae)
    with torch.no_grad():
        vae.post_quant_conv.weight.mul_(1.01)
    module = all_graphs(fx256.var, vae)["decode"]
    checks = compare_graph(out / "onnx" / "decode.b2.onnx", module, "decode", 2, "fp32")
    assert checks and not any(c.ok for c in checks)
