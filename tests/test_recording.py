import math

import numpy as np
import pytest
import torch

from anyms_core import AnyMS, RecordConfig, Run, Subject, decoupled
from anyms_core.layout import GridLayout
from anyms_core.processor import AnyMSAttnProcessor
from anyms_core.recording import AttentionMaps
from anyms_core.testing import random_reference_image as reference_image

BOXES = [[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 1.0, 1.0]]


def subjects():
    return [Subject(reference_image(i), box, name=name) for i, (box, name) in enumerate(zip(BOXES, ["cat", "dog"]))]


@pytest.fixture(scope="module")
def recorded_run(tiny_sdxl):
    return AnyMS(tiny_sdxl).generate("a photo of a dog", subjects(), num_inference_steps=3, height=64, width=96,
                                     record={"kinds": ["affinity", "joint_share", "contribution"], "words": ["dog"], "policy": "layer"})


def test_shapes_and_names(recorded_run):
    maps = recorded_run.attention
    assert maps.steps == [0, 1, 2]
    assert maps.subjects == ["cat", "dog"] and maps.words == ["dog"]
    assert maps.maps("affinity").shape == (2, 32, 48)  # largest attention grid of the tiny UNet
    assert maps.maps("affinity", per_step=True).shape == (3, 2, 32, 48)
    assert maps.maps("text").shape == (1, 32, 48)
    assert maps.maps("affinity", resolution=16).shape == (2, 16, 24)
    assert maps.maps("contribution", items=["dog"], size=(64, 96)).shape == (1, 64, 96)
    assert all(".attn2" in key for key in maps.keys)
    only_up = maps.maps("affinity", layers="up_blocks", steps=[1])
    assert only_up.shape == (2, 32, 48)


def test_joint_share_sums_to_one_over_subjects_and_affinity_averages_one_over_space(recorded_run):
    for key in recorded_run.attention.keys:
        total = recorded_run.attention.entries[("joint_share", 0, key)].float().sum(0)
        torch.testing.assert_close(total, torch.ones_like(total), atol=2e-3, rtol=0)
        affinity = recorded_run.attention.entries[("affinity", 0, key)].float()  # [S, h, w]
        mean = affinity.mean(dim=(1, 2))
        torch.testing.assert_close(mean, torch.ones_like(mean), atol=2e-3, rtol=0)


def test_contribution_is_zero_outside_owned_cells(recorded_run):
    maps = recorded_run.attention
    for key in maps.keys:
        height, width = maps.grids[key]
        owner = GridLayout.build(BOXES, [0, 1], height, width).owner.view(height, width)
        contribution = maps.entries[("contribution", 1, key)].float()
        for subject in range(2):
            assert (contribution[subject][owner != subject] == 0).all()
            assert (contribution[subject][owner == subject] > 0).all()


def test_affinity_and_joint_share_match_an_explicit_reference_computation(tiny_sdxl):
    """Recompute one layer's maps by hand from the layer's weights (guards against precedence slips)."""
    name = next(n for n in tiny_sdxl.unet.attn_processors if n.endswith("attn2.processor")).removesuffix(".processor")
    attn = tiny_sdxl.unet.get_submodule(name)
    captured = {}
    handle = attn.register_forward_pre_hook(lambda m, args, kwargs: captured.update(kwargs=kwargs, args=args), with_kwargs=True)
    record = {"kinds": ["affinity", "joint_share"], "policy": "layer", "layers": [name]}
    try:
        with decoupled(tiny_sdxl, subjects(), record=record) as session:
            tiny_sdxl("a photo", ip_adapter_image=session.ip_adapter_image, num_inference_steps=1, height=64, width=64,
                      generator=torch.Generator().manual_seed(0), output_type="np")
    finally:
        handle.remove()
    hidden = captured["args"][0] if captured["args"] else captured["kwargs"]["hidden_states"]
    text, (images,) = captured["kwargs"]["encoder_hidden_states"]
    processor = attn.processor
    cond = hidden.shape[0] // 2
    with torch.no_grad():
        query = attn.to_q(hidden[cond])  # [N, C]
        keys = processor.to_k_ip[0](images[cond]).reshape(-1, query.shape[-1])  # [S*T, C]
        heads = attn.heads
        q = query.view(-1, heads, query.shape[-1] // heads).transpose(0, 1)
        k = keys.view(-1, heads, query.shape[-1] // heads).transpose(0, 1)
        logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # [heads, N, S*T]
        tokens = images.shape[2]
        share = torch.softmax(logits, dim=-1).view(heads, -1, 2, tokens).sum(-1).mean(0).T  # over keys: [S, N]
        where = torch.softmax(logits, dim=1).view(heads, -1, 2, tokens).mean(-1).mean(0).T * q.shape[1]  # over space
    torch.testing.assert_close(session.attention.entries[("joint_share", 0, name)].float().flatten(1), share, atol=1e-3, rtol=0)
    torch.testing.assert_close(session.attention.entries[("affinity", 0, name)].float().flatten(1), where, atol=2e-3, rtol=1e-3)
    # a constant added to one subject's logits changes the joint share but not the affinity
    shifted = logits.clone()
    shifted[..., :tokens] += 3.0
    moved = torch.softmax(shifted, dim=-1).view(heads, -1, 2, tokens).sum(-1).mean(0).T
    kept = torch.softmax(shifted, dim=1).view(heads, -1, 2, tokens).mean(-1).mean(0).T * q.shape[1]
    assert not torch.allclose(moved, share, atol=1e-2) and torch.allclose(kept, where, atol=1e-5)


def test_budget_keeps_or_drops_whole_steps_and_maps_says_which(tiny_sdxl):
    full = AnyMS(tiny_sdxl).generate("a photo", subjects(), num_inference_steps=4, height=64, width=64,
                                     record=RecordConfig(policy="layer")).attention
    per_step = full.nbytes // 4
    budget = int(2.5 * per_step)  # room for two whole steps and half of a third
    with pytest.warns(UserWarning, match=r"dropped steps \[2, 3\] whole"):
        run = AnyMS(tiny_sdxl).generate("a photo", subjects(), num_inference_steps=4, height=64, width=64,
                                        record=RecordConfig(policy="layer", budget_bytes=budget))
    maps = run.attention
    assert maps.nbytes == 2 * per_step <= budget
    assert sum(t.numel() * t.element_size() for t in maps.entries.values()) == maps.nbytes
    assert maps.steps == [0, 1] and maps.dropped_steps == [2, 3]
    assert len(maps.dropped) == len(maps.entries)  # two steps dropped whole, two kept whole
    for step in maps.steps:  # every kept step has every layer of every kind
        assert {(k, key) for k, s, key in maps.entries if s == step} == {(k, key) for k, s, key in full.entries if s == step}
    averaged = maps.maps("affinity")
    assert maps.averaged_steps == [0, 1]
    assert np.array_equal(averaged, full.maps("affinity", steps=[0, 1]))
    with pytest.raises(ValueError, match="dropped by the budget"):
        maps.maps("affinity", steps=[3])
    with pytest.raises(ValueError, match="selects no step"):
        maps.maps("affinity", steps=[])
    assert all(t.dtype == torch.float16 and t.device.type == "cpu" for t in maps.entries.values())


def test_policies_aggregate(tiny_sdxl):
    sizes = {}
    for policy in ("layer", "resolution", "mean"):
        run = AnyMS(tiny_sdxl).generate("a photo", subjects(), num_inference_steps=2, height=64, width=64,
                                        record={"policy": policy, "kinds": ["affinity"]})
        sizes[policy] = (len(run.attention.keys), run.attention.nbytes)
        np.testing.assert_allclose(run.attention.maps("affinity").mean(axis=(1, 2)), 1.0, rtol=0.02)
    assert sizes["mean"][0] == 1 and sizes["resolution"][0] == 2 and sizes["layer"][0] > 2
    assert sizes["mean"][1] < sizes["resolution"][1] < sizes["layer"][1]


def test_record_off_installs_no_recorder(tiny_sdxl):
    with decoupled(tiny_sdxl, subjects()) as session:
        assert all(p.state.recorder is None for p in tiny_sdxl.unet.attn_processors.values() if isinstance(p, AnyMSAttnProcessor))
    assert session.attention is None


def test_bad_record_configs():
    with pytest.raises(ValueError, match="Unknown attention kind"):
        RecordConfig(kinds=("attention",))
    with pytest.raises(ValueError, match="needs `words`"):
        RecordConfig(kinds=("text",))
    with pytest.raises(ValueError, match="policy"):
        RecordConfig(policy="all")
    with pytest.raises(ValueError, match="record="):
        RecordConfig.from_arg(3.5)


def test_query_errors(recorded_run):
    maps = recorded_run.attention
    with pytest.raises(ValueError, match="were not recorded"):
        maps.maps("affinity", steps=[7])
    with pytest.raises(ValueError, match="not among"):
        maps.maps("affinity", items=["horse"])
    with pytest.raises(ValueError, match="No recorded maps match"):
        maps.maps("affinity", resolution=5)


def test_text_word_must_be_in_prompt(tiny_sdxl):
    with pytest.raises(ValueError, match="not in the prompt"):
        AnyMS(tiny_sdxl).generate("a photo", subjects(), num_inference_steps=1, height=64, width=64, record={"words": ["horse"]})


def test_run_save_load_round_trip(recorded_run, tmp_path):
    recorded_run.save(tmp_path / "run")
    loaded = Run.load(tmp_path / "run")
    assert loaded.config == recorded_run.config
    assert np.array_equal(np.asarray(loaded.image), np.asarray(recorded_run.image))
    assert all(np.array_equal(a, b) for a, b in zip(loaded.previews, recorded_run.previews))
    for kind in ("affinity", "contribution", "text"):
        assert np.array_equal(loaded.attention.maps(kind, per_step=True), recorded_run.attention.maps(kind, per_step=True))
    assert [list(s.box) for s in loaded.subjects()] == BOXES  # Subject.box is a tuple (Subject is frozen)
    with pytest.raises(ValueError, match="not a saved run"):
        Run.load(tmp_path)


def test_previews_and_timings(recorded_run):
    assert len(recorded_run.previews) == 3
    assert recorded_run.previews[0].dtype == np.uint8 and recorded_run.previews[0].shape[2] == 3
    assert len(recorded_run.timings["per_step"]) == 3 and recorded_run.timings["total"] > 0


def test_step_callback_gets_plain_dicts(tiny_sdxl):
    seen = []
    run = AnyMS(tiny_sdxl).generate("a photo", subjects(), num_inference_steps=3, height=64, width=64, record=None,
                                    callback=seen.append)
    assert [s["step"] for s in seen] == [0, 1, 2] and all(s["num_steps"] == 3 for s in seen)
    assert all(np.array_equal(s["preview"], p) for s, p in zip(seen, run.previews))
    assert seen[-1]["elapsed"] >= seen[0]["elapsed"] > 0
