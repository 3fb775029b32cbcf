"""var_rt.validation: one check of request values for VARPipeline.generate and the HTTP parse_request
(the CLI's use of it is tested through the command line in test_cli_generate.py)."""
import math
import re

import numpy as np
import pytest
import torch

from conftest import get_fixture
from var_rt.errors import InputError
from var_rt.pipeline import VARPipeline
from var_rt.serve import parse_request

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def pipe():
    fx = get_fixture("var_tiny_256")  # 10 classes, 10 scales
    return VARPipeline(fx.cfg, fx.var, fx.vae, torch.device("cpu"), torch.float32, progress=False)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(num_images=2.5), "num-images must be an integer, got 2.5"),
    (dict(num_images=0), "num-images must be >= 1, got 0"),
    (dict(class_labels=[1], num_images=0), "num-images must be >= 1, got 0"),  # was: one image
    (dict(seed=1.5), "seed must be an integer or a list of integers, got 1.5"),
    (dict(seed="7"), "seed must be an integer or a list of integers, got '7'"),  # was: seed 7
    (dict(seed=True), "seed must be an integer"),
    (dict(seed=-1), "seed must be in [0, 2^63), got -1"),
    (dict(seed=[1, 2]), "2 seeds for 1 images"),
    (dict(batch_size=1.5), "batch-size must be an integer, got 1.5"),
    (dict(batch_size=0), "batch-size must be >= 1, got 0"),
    (dict(cfg="1.5"), "cfg must be a finite number (guidance strength), got '1.5'"),
    (dict(cfg=NAN), "cfg must be a finite number"),
    (dict(cfg=-INF), "cfg must be a finite number"),
    (dict(cfg_schedule=[1.0] * 9 + [NAN]), "cfg-schedule: nan is not a finite number"),
    (dict(cfg_schedule=[1.0] * 9 + ["1"]), "cfg-schedule: '1' is not a finite number"),
    (dict(cfg_schedule=[1.0] * 3), "one value per scale (10), got 3"),
    (dict(cfg_schedule="cosine"), "cfg-schedule 'cosine' is unknown"),
    (dict(top_k=2.7), "top-k must be an integer (0 turns it off), got 2.7"),  # was: accepted
    (dict(top_k=-1), "top-k must be >= 0 (0 turns it off), got -1"),
    (dict(top_p=NAN), "top-p must be a finite number"),
    (dict(top_p=1.5), "top-p must be in [0, 1] (0 turns it off), got 1.5"),
    (dict(more_smooth="false"), "more-smooth must be true or false"),
    (dict(class_labels=[3.0]), "class id 3.0 is not an integer"),  # was: "out of range"
    (dict(class_labels=["3"]), "class id '3' is not an integer"),
    (dict(class_labels=[True]), "class id True is not an integer"),
    (dict(class_labels="3"), "class labels must be a list of class ids"),
    (dict(class_labels=[11]), "class id 11 is out of range for this model: use 0..9"),
    (dict(class_labels=[]), "class labels must not be empty"),
    (dict(class_labels=[1, 2], num_images=3), "2 class labels for 3 images"),
])
def test_generate_refuses_bad_values(pipe, kwargs, needle):
    with pytest.raises(InputError, match=re.escape(needle)):
        pipe.generate(**kwargs)


def test_numpy_values_are_accepted_as_plain_ones(pipe):
    """numpy integers and arrays (labels, seeds) are integers; a tuple schedule is a schedule."""
    plain = pipe.generate(class_labels=[3, 4], seed=[5, 6], top_k=1, cfg_schedule=[1.0] * 10)
    res = pipe.generate(class_labels=np.array([3, 4]), seed=np.array([5, 6]), top_k=np.int32(1),
                        cfg=np.float32(1.5), cfg_schedule=tuple([1.0] * 10), num_images=np.int64(2))
    assert res.labels == [3, 4] and res.seeds == [5, 6]
    assert all(type(v) is int for v in res.labels + res.seeds)
    assert torch.equal(plain.images, res.images)


@pytest.mark.parametrize("body, needle", [
    (dict(class_label=1, cfg_schedule=[1.0] * 9 + [NAN]), "cfg-schedule: nan is not a finite number"),  # was: 200
    (dict(class_label=1, cfg_schedule=[1.0] * 9 + [INF]), "cfg-schedule: inf is not a finite number"),
    (dict(class_label=1, cfg=NAN), "cfg must be a finite number"),
    (dict(class_label=1, cfg="1.5"), "cfg must be a finite number"),
    (dict(class_label=1, top_k=2.7), "top-k must be an integer"),
    (dict(class_label=1, top_p=NAN), "top-p must be a finite number"),
    (dict(class_label=1, seed=1.5), "seed must be an integer, got 1.5"),
    (dict(class_label=1, seed="7"), "seed must be an integer, got '7'"),
    (dict(class_labels=[1, 2], seeds=[1, 2.5]), "seeds must be an integer or a list of integers"),
    (dict(class_label=3.0), "class id 3.0 is not an integer"),  # was: "out of range"
    (dict(class_label="3"), "class id '3' is not an integer"),
    (dict(class_label=True), "class id True is not an integer"),
    (dict(class_label=1, more_smooth=1), "more-smooth must be true or false"),
])
def test_http_request_refuses_bad_values(pipe, body, needle):
    with pytest.raises(InputError, match=re.escape(needle)):
        parse_request(body, pipe, 16)


def test_http_and_python_share_the_checks(pipe):
    """The same bad value gets the same message from parse_request and from VARPipeline.generate."""
    for field, value in (("cfg", NAN), ("top_k", 2.7), ("top_p", -0.5), ("cfg_schedule", [1.0] * 4)):
        with pytest.raises(InputError) as http:
            parse_request({"class_label": 1, field: value}, pipe, 16)
        with pytest.raises(InputError) as py:
            pipe.generate(class_labels=[1], **{field: value})
        assert str(http.value) == str(py.value)
    req = parse_request({"class_label": 1, "cfg_schedule": [1] * 10, "top_k": 5, "seed": 3}, pipe, 16)
    assert req["settings"] == (1.5, tuple([1.0] * 10), 5, 0.96, False) and req["seeds"] == [3]
    assert math.isfinite(req["settings"][0])


@pytest.mark.parametrize("body", [
    {"class_label": 1, "x" * 60_000: 1},          # the whole name was echoed (a 60 KB message)
    {"class_label": 1, "a\nb\u202e": 1},           # a newline inside the one error line
    {"class_label": 1, "format": "x" * 60_000},
    {"class_label": 10 ** 4000},
])
def test_http_messages_echo_short_values_on_one_line(pipe, body):
    with pytest.raises(InputError) as e:
        parse_request(body, pipe, 16)
    assert len(str(e.value)) < 400 and "\n" not in str(e.value)


@pytest.mark.parametrize("batch_size, needle", [
    (0, "batch-size must be in [1, 4096]"),          # was: "class labels must not be empty"
    (2.5, "batch-size must be an integer"),          # was: TypeError
    (10 ** 12, "batch-size must be in [1, 4096]"),   # was: MemoryError
])
def test_warmup_refuses_bad_batch_sizes(pipe, batch_size, needle):
    with pytest.raises(InputError, match=re.escape(needle)):
        pipe.warmup(batch_size=batch_size)
