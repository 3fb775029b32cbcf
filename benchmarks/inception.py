"""Random weights for torch-fidelity's InceptionV3, saved as a state-dict file like the real one: for the FID
tests and for timing feature extraction where the real weights cannot be downloaded (the speed does not
depend on the weights). He-initialised convolutions, so features neither vanish nor explode."""
from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import torch


def random_inception_weights(path: Path, seed: int = 0) -> Path:
    from var_rt import quality
    cls = quality._inception_class()
    module = sys.modules[cls.__module__]
    torch.manual_seed(seed)
    # Built without weights: torch-fidelity would otherwise download or read its own file.
    with mock.patch.object(module, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(cls, "load_state_dict", lambda self, sd: None):
        net = cls("random", ["2048"])
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path
