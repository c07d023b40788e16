"""shape_reliance: 1.0 exactly when the model cannot see the shape it is told; loud errors otherwise.
frame_relative_shape: its mask agreement, and its in-box and framed predictions differ only through the box."""

import numpy as np
import pytest
import torch

from anyms_core.toy import train
from anyms_core.toy.diagnostics import frame_relative_shape, mask_agreement, shape_reliance


@pytest.fixture(scope="module")
def fresh_pipe():
    torch.set_num_threads(1)
    pipe = train.build_pipeline(0, torch.device("cpu"), with_adapter=True)
    pipe.unet.eval()
    return pipe


def test_a_model_blind_to_the_condition_scores_exactly_one(fresh_pipe, monkeypatch):
    # every prompt encodes to the same embedding: right and wrong shape words are indistinguishable
    encode = fresh_pipe.text_encoder.forward
    monkeypatch.setattr(fresh_pipe.text_encoder, "forward",
                        lambda ids, *a, **k: encode(torch.zeros_like(ids), *a, **k))
    ratios = shape_reliance(fresh_pipe, "text", n=4, timesteps=(500, 900))
    assert ratios == {500: 1.0, 900: 1.0}


def test_a_model_that_sees_the_condition_scores_other_than_one(fresh_pipe):
    for source in ("text", "image"):
        ratios = shape_reliance(fresh_pipe, source, n=4, timesteps=(900,), framed=False)
        assert ratios[900] > 0 and ratios[900] != 1.0  # random weights: some dependence, either way


def test_boxed_reads_the_reference_only_through_anyms_inside_the_box(fresh_pipe, monkeypatch):
    from anyms_core.processor import AnyMSAttnProcessor

    original = dict(fresh_pipe.unet.attn_processors)
    boxed = shape_reliance(fresh_pipe, "boxed", n=3, timesteps=(900,))
    anywhere = shape_reliance(fresh_pipe, "image", n=3, timesteps=(900,), framed=False)  # the same scenes
    assert boxed[900] != 1.0 and boxed[900] != anywhere[900]  # masked to the box: not the stock adapter
    assert dict(fresh_pipe.unet.attn_processors) == original  # every session closed
    assert not any(isinstance(p, AnyMSAttnProcessor) for p in fresh_pipe.unet.attn_processors.values())
    # an image encoder blind to its input: right and wrong references give the same tokens
    encode = fresh_pipe.image_encoder.forward
    monkeypatch.setattr(fresh_pipe.image_encoder, "forward", lambda pixels, *a, **k: encode(torch.zeros_like(pixels), *a, **k))
    assert shape_reliance(fresh_pipe, "boxed", n=3, timesteps=(900,)) == {900: 1.0}


def test_bad_requests_fail_loudly(fresh_pipe):
    with pytest.raises(ValueError, match="source"):
        shape_reliance(fresh_pipe, "audio", n=2)
    base = train.build_pipeline(0, torch.device("cpu"), with_adapter=False)
    with pytest.raises(ValueError, match="framed"):
        shape_reliance(fresh_pipe, "boxed", n=2, framed=True)
    for source in ("image", "boxed"):
        with pytest.raises(ValueError, match="IP-Adapter"):
            shape_reliance(base, source, n=2)
    assert set(shape_reliance(base, "text", n=2, timesteps=(700,))) == {700}


def test_the_command_line_parses_and_refuses_bad_counts():
    from anyms_core.toy import diagnostics

    assert diagnostics.parse_args(["some/weights", "--cases", "8"]).cases == 8
    with pytest.raises(SystemExit):
        diagnostics.parse_args(["--cases", "0"])


def test_mask_agreement_compares_inside_the_box_only():
    box = np.zeros((16, 16), dtype=bool)
    box[4:12, 4:12] = True
    inscribed = np.zeros_like(box)
    inscribed[8:12, 4:12] = True  # the lower half of the box
    framed = np.ones_like(box)  # the piece of a large sprite: the whole box, and beyond it
    assert mask_agreement(framed, framed, inscribed, box) == {"inscribed": 0.5, "framed_crop": 1.0, "whole_box": 1.0}
    assert mask_agreement(inscribed, framed, inscribed, box) == {"inscribed": 1.0, "framed_crop": 0.5, "whole_box": 0.5}
    empty = np.zeros_like(box)
    outside = ~box
    assert mask_agreement(outside, empty, inscribed, box) == {"inscribed": 0.0, "framed_crop": 1.0, "whole_box": 0.0}


def _always_some_mask(image, color):  # random weights draw no sprite colour: threshold brightness instead
    array = np.asarray(image, dtype=np.float32).mean(-1)
    return array > np.median(array)


def test_frame_relative_shape_differs_only_through_the_box(fresh_pipe, monkeypatch):
    from anyms_core.processor import AnyMSAttnProcessor
    from anyms_core.toy import metrics

    monkeypatch.setattr(metrics, "color_mask", _always_some_mask)
    original = dict(fresh_pipe.unet.attn_processors)
    scale = next(p.scale[0] for p in original.values() if hasattr(p, "scale"))
    assert scale != 0
    with_branch = frame_relative_shape(fresh_pipe, n=3, size=32)
    assert with_branch["all"]["cases"] == 3 and sum(r["cases"] for k, r in with_branch.items() if k != "all") == 3
    assert with_branch["all"]["framed_crop"] < 1.0  # the box changes the prediction
    assert dict(fresh_pipe.unet.attn_processors) == original  # every session closed
    assert not any(isinstance(p, AnyMSAttnProcessor) for p in fresh_pipe.unet.attn_processors.values())
    fresh_pipe.set_ip_adapter_scale(0.0)  # no image branch: the box cannot matter, and the same noise is used
    try:
        assert frame_relative_shape(fresh_pipe, n=3, size=32)["all"]["framed_crop"] == 1.0
    finally:
        fresh_pipe.set_ip_adapter_scale(scale)
    base = train.build_pipeline(0, torch.device("cpu"), with_adapter=False)
    with pytest.raises(ValueError, match="IP-Adapter"):
        frame_relative_shape(base, n=1)
