"""Faults at each stage of generate() and Run.save(): the pipeline is left as it was (processors, hooks,
progress bar), the next plain call equals stock, and no half-written run is left behind."""

import os
import signal

import numpy as np
import pytest
import torch

from anyms_core import AnyMS, Run, Subject
from anyms_core.testing import random_reference_image


def subjects():
    return [Subject(random_reference_image(0), [0, 0, 0.6, 0.6], name="a"),
            Subject(random_reference_image(1), [0.4, 0.4, 1, 1], name="b")]


def plain_call(pipe):
    return np.asarray(pipe("a photo", ip_adapter_image=[[random_reference_image(0)]], num_inference_steps=2, height=64,
                           width=64, generator=torch.Generator().manual_seed(0)).images[0])


def snapshot(pipe):
    unet = pipe.unet
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())
    return (dict(unet.attn_processors), hooks, dict(getattr(pipe, "_progress_bar_config", {})),
            "step" in vars(pipe.scheduler))  # generate() wraps scheduler.step for the x0 previews


class Boom(Exception):
    pass


def raise_in_callback(exception):
    def callback(info):
        if info["step"] == 1:
            raise exception
    return {"callback": callback}


def raise_on_step_end(exception):
    def on_step_end(pipe, step, timestep, kwargs):
        if step == 1:
            raise exception
        return {}
    return {"callback_on_step_end": on_step_end}


def sigint_in_callback():
    def callback(info):
        if info["step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)
    return {"callback": callback}


@pytest.mark.parametrize("stage", ["encode_image", "callback", "step_end", "interrupt", "sigint", "decode"])
def test_a_fault_at_any_stage_leaves_the_pipeline_as_it_was(tiny_sd15, monkeypatch, request, stage):
    before = snapshot(tiny_sd15)
    stock = plain_call(tiny_sd15)
    kwargs = {}
    expected = KeyboardInterrupt if stage in ("interrupt", "sigint") else Boom
    if stage == "encode_image":
        monkeypatch.setattr(tiny_sd15, "encode_image", lambda *a, **k: (_ for _ in ()).throw(Boom()))
    elif stage == "decode":
        monkeypatch.setattr(tiny_sd15.vae, "decode", lambda *a, **k: (_ for _ in ()).throw(Boom()))
    elif stage == "callback":
        kwargs = raise_in_callback(Boom())
    elif stage == "step_end":
        kwargs = raise_on_step_end(Boom())
    elif stage == "interrupt":
        kwargs = raise_on_step_end(KeyboardInterrupt())
    else:
        # a real Ctrl-C: under nohup (or some CI runners) SIGINT starts out ignored, so install Python's handler
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
        kwargs = sigint_in_callback()
    with pytest.raises(expected):
        AnyMS(tiny_sd15).generate("a photo", subjects(), num_inference_steps=3, height=64, width=64, **kwargs)
    monkeypatch.undo()
    after = snapshot(tiny_sd15)
    assert after[0] == before[0] and after[1:] == before[1:]
    assert np.array_equal(plain_call(tiny_sd15), stock)


@pytest.fixture(scope="module")
def run():
    from anyms_core.testing import tiny_sd15_pipeline

    return AnyMS(tiny_sd15_pipeline()).generate("a photo", subjects(), num_inference_steps=2, height=64, width=64)


def test_overwrite_that_fails_at_the_rename_keeps_the_old_run(run, tmp_path, monkeypatch):
    run.save(tmp_path / "run")
    old = (tmp_path / "run" / "run.json").read_text()
    files_before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    real_replace = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new run taking the old one's place
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="rename failed"):
        run.save(tmp_path / "run", overwrite=True)
    monkeypatch.undo()
    assert (tmp_path / "run" / "run.json").read_text() == old and Run.load(tmp_path / "run").config == run.config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == files_before


def test_an_interrupted_save_leaves_nothing(run, tmp_path, monkeypatch):
    def interrupted(self, directory):
        (directory / "run.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(Run, "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run.save(tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exit_order", ["nested", "interleaved"])
def test_step_observers_of_overlapping_generates_never_stay_active(tiny_sd15, exit_order):
    from anyms_core.sampler import _StepObserver

    scheduler = tiny_sd15.scheduler
    stock = plain_call(tiny_sd15)
    first, second = _StepObserver(tiny_sd15, True, None), _StepObserver(tiny_sd15, True, None)
    a, b = first.installed(), second.installed()
    a.__enter__()
    b.__enter__()
    (b if exit_order == "nested" else a).__exit__(None, None, None)
    (a if exit_order == "nested" else b).__exit__(None, None, None)
    if exit_order == "nested":
        assert "step" not in vars(scheduler)
    # an interleaved exit may leave the first wrapper behind: it passes through and observes nothing
    assert np.array_equal(plain_call(tiny_sd15), stock)
    assert first.previews == [] and second.previews == [] and first.times == [] and second.times == []
    vars(scheduler).pop("step", None)
