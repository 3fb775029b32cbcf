"""No process-wide switches: what one engine chooses (compilation, decoder layout) stays its own."""
import pytest
import torch

from var_rt.engines.torch_engine import TorchEngine
from var_rt.models import var as var_mod
from var_rt.pipeline import VARPipeline


def test_no_process_wide_fusion_switch():
    """What an engine runs is the engine's choice: the model module has no fusion switch to leave on."""
    assert not hasattr(var_mod, "_Fusion") and not hasattr(var_mod, "enable_fusion")
    assert not hasattr(var_mod, "_COMPILED")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled engines exist on CUDA only")
def test_compiled_engine_leaves_the_shared_modules_alone(fx256):
    pipe = VARPipeline.load(config=fx256.config_path, var_ckpt=fx256.var_ckpt, vae_ckpt=fx256.vae_ckpt,
                            device="cuda", dtype="float32", progress=False)
    before = [p.is_contiguous() for p in pipe.vae.decoder.parameters()]
    compiled = TorchEngine(pipe.var, pipe.vae, compile=True)
    ref = TorchEngine(pipe.var, pipe.vae)
    assert compiled.compiled and compiled.block_kernels and not ref.compiled and not ref.block_kernels
    assert [p.is_contiguous() for p in pipe.vae.decoder.parameters()] == before  # still the default layout
    # the compiled engine decodes with its own channels-last copy of the decoder, not the shared modules
    own = compiled._decode._orig_mod.vae
    assert own is not pipe.vae and own.decoder is not pipe.vae.decoder and pipe.vae.decoder is ref.vae.decoder
    assert own.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
