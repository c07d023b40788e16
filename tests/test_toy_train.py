"""The trainer runs both stages on CPU into a temp dir, resumes from its checkpoint, and exports loadable weights."""

import json
import time

import pytest
import torch

from anyms_core.toy import train, world
from anyms_core.toy.pipeline import fold, load_toy_pipeline


def test_batches_are_well_formed():
    g = torch.Generator().manual_seed(0)
    images, prompts, coverage = train.stage1_batch(16, 64, g, "cpu", counts=(0.25, 0.45, 0.30))
    assert images.shape == (16, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    assert coverage.shape == (16, 64, 64) and coverage.min() >= 0 and coverage.max() <= 1
    empty = [i for i, p in enumerate(prompts) if p and not set(p.split()) & set(world.SHAPES)]
    assert empty and all(coverage[i].max() == 0 for i in empty)  # no named sprite, no sprite drawn
    vocabulary = set(world.VOCABULARY_WORDS)
    assert all(set(p.split()) <= vocabulary for p in prompts)  # the base learns sprites by name
    assert any(any(shape in p for shape in world.SHAPES) for p in prompts)
    table = train.prompt_table()
    images, prompts, refs, keep = train.stage2_batch(8, 64, g, "cpu")
    assert images.shape == (8, 3, 64, 64) and refs.shape == (8, 3, 32, 32) and keep.dtype == torch.bool
    # stage-2 prompts never name a sprite: identity must come from the reference
    names = set(world.SHAPES) | set(world.COLOR_NAMES)
    assert all(not (set(table[i].split()) & names) for i in prompts.tolist())


def test_stage1_framing_puts_one_sprite_scenes_in_the_whole_frame():
    g = torch.Generator().manual_seed(1)
    images, prompts, coverage = train.stage1_batch(64, 64, g, "cpu", frame_fraction=1.0)
    one = [i for i, p in enumerate(prompts) if p and len(set(p.split()) & set(world.SHAPES)) == 1 and " and " not in p]
    assert one
    for i in one:  # the inscribed square's side is >= 84% of the image (margins <= 8% each)
        rows = (coverage[i] > 0.5).any(dim=1).nonzero()
        cols = (coverage[i] > 0.5).any(dim=0).nonzero()
        assert max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) >= 0.84 * 64 - 2


def test_sprite_weight_raises_the_loss_on_sprite_cells_only():
    torch.manual_seed(0)
    pipe = train.build_pipeline(0, torch.device("cpu"), with_adapter=False)
    images, prompts, coverage = train.stage1_batch(4, 64, torch.Generator().manual_seed(2), "cpu")
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0]
        alphas = train.training_alphas_cumprod(pipe.scheduler)
        losses = [train.v_loss(pipe.unet, images, embeds, alphas, torch.Generator().manual_seed(3),
                               sprite_coverage=cov, sprite_weight=w)
                  for cov, w in ((None, 0.0), (coverage, 0.0), (torch.zeros_like(coverage), 5.0), (coverage, 5.0))]
    assert losses[0] == losses[1] == losses[2]  # no weight, or no sprite: the plain loss
    assert losses[3] > losses[0]


def test_sprite_sides_follow_the_requested_range():
    g = torch.Generator().manual_seed(4)
    _, prompts, coverage = train.stage1_batch(64, 64, g, "cpu", frame_fraction=0.0, counts=(0.0, 1.0, 0.0), sides=(0.2, 0.3))
    for cov in coverage:  # box side 0.2-0.3 at aspect 0.6-1.6; the sprite spans its centred square: within 0.2 * sqrt(0.6) .. 0.3 * sqrt(1.6)
        rows, cols = (cov > 0.5).any(dim=1).nonzero(), (cov > 0.5).any(dim=0).nonzero()
        for extent in (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1):
            assert 0.2 * 0.6 ** 0.5 * 64 - 1 <= extent <= 0.3 * 1.6 ** 0.5 * 64 + 1
    with pytest.raises(SystemExit):
        train.parse_args(["--out", "x", "--stage2-sides", "0.5", "0.2"])


def test_high_noise_share_draws_timesteps_from_the_noisy_end():
    draws = {}

    class Recorder(torch.nn.Module):
        def forward(self, x_t, t, **kwargs):
            draws.setdefault(share, []).append(t)
            return (torch.zeros_like(x_t),)

    images = torch.zeros(256, 3, 16, 16)
    alphas = torch.linspace(0.999, 0.0, 1000)
    for share in (0.0, 1.0, 0.5):
        train.v_loss(Recorder(), images, None, alphas, torch.Generator().manual_seed(0), high_noise_share=share)
    assert draws[1.0][0].min() >= train.HIGH_NOISE_FROM and draws[0.0][0].min() < train.HIGH_NOISE_FROM
    assert 0.6 < (draws[0.5][0] >= train.HIGH_NOISE_FROM).float().mean() < 0.9  # half, plus the uniform draws' 40%
    with pytest.raises(SystemExit):
        train.parse_args(["--out", "x", "--high-noise-share", "1.5"])


def test_scale_jitter_draws_log_uniform_scales_within_bounds():
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([train.training_scale((0.5, 4.0), generator, "cpu") for _ in range(2000)])
    assert draws.min() >= 0.5 and draws.max() <= 4.0
    # log-uniform: the geometric midpoint (sqrt(0.5 * 4) = 1.41) splits the draws in half, the arithmetic one does not
    assert 0.45 < (draws < 2 ** 0.5).float().mean() < 0.55
    assert (draws < 2.25).float().mean() > 0.7
    assert train.training_scale((1.5, 1.5), generator, "cpu") == pytest.approx(1.5)
    with pytest.raises(SystemExit):
        train.parse_args(["--out", "x", "--scale-jitter", "2", "1"])


def test_scale_jitter_sets_the_adapter_scale_in_stage_two_and_checks_at_one(tmp_path, monkeypatch):
    scales = []
    real = train.ToyWorldPipeline.set_ip_adapter_scale

    def spy(self, scale):
        scales.append(scale)
        return real(self, scale)

    monkeypatch.setattr(train.ToyWorldPipeline, "set_ip_adapter_scale", spy)
    train.main(["--out", str(tmp_path / "run"), "--stage1-steps", "1", "--stage2-steps", "3", "--batch-size", "2",
                "--size", "32", "--check-images", "0", "--align-steps", "0", "--scale-jitter", "2", "3"])
    jittered = [s for s in scales if s != 1.0]
    assert len(jittered) == 3 and all(2 <= s <= 3 for s in jittered)
    assert scales[-1] == 1.0  # the final checkpoint and export are at the training scale


def test_trains_resumes_and_exports(tmp_path):
    out = tmp_path / "run"
    common = ["--out", str(out), "--stage1-steps", "3", "--stage2-steps", "3", "--batch-size", "4", "--size", "32",
              "--check-images", "0", "--log-every", "1", "--align-steps", "0"]
    first = train.main(common + ["--session-steps", "4"])
    assert first.get("stopped_early") and (out / "checkpoint.pt").exists()
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["stage"] == 2 and state["step"] == {1: 3, 2: 1}
    result = train.main(common + ["--resume"])
    assert result["steps"] == {1: 3, 2: 3}
    log = (out / "loss_log.csv").read_text().splitlines()
    assert log[0] == "stage,step,seconds,loss,lr" and len(log) == 1 + 6
    assert json.loads((out / "train_summary.json").read_text())["steps"] == {"1": 3, "2": 3}
    pipe = load_toy_pipeline(out / "weights")
    image = pipe(world.DEFAULT_PROMPTS["snow"], ip_adapter_image=[[world.sprite_reference("red circle")]],
                 num_inference_steps=2).images[0]
    assert image.size == (64, 64)


def test_resuming_a_finished_run_says_so_and_trains_no_more(tmp_path, capsys):
    common = ["--out", str(tmp_path / "run"), "--stage1-steps", "1", "--stage2-steps", "1", "--batch-size", "2",
              "--size", "32", "--check-images", "0", "--align-steps", "0"]
    train.main(common)
    capsys.readouterr()
    assert train.main(common + ["--resume"])["steps"] == {1: 1, 2: 1}
    assert "this run had finished" in capsys.readouterr().err


def test_init_from_continues_a_trained_model(tmp_path):
    """--init-from starts both stages from a weights folder: with no steps, the export equals its source."""
    source = tmp_path / "source"
    common = ["--batch-size", "2", "--size", "32", "--check-images", "0", "--log-every", "1", "--align-steps", "0"]
    train.main(["--out", str(source), "--stage1-steps", "1", "--stage2-steps", "1"] + common)
    copy = tmp_path / "copy"
    train.main(["--out", str(copy), "--init-from", str(source / "weights"), "--stage1-steps", "0",
                "--stage2-steps", "0"] + common)
    a, b = load_toy_pipeline(source / "weights"), load_toy_pipeline(copy / "weights")
    for module in ("unet", "text_encoder", "image_encoder"):
        left, right = getattr(a, module).state_dict(), getattr(b, module).state_dict()
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left), module
    fresh = tmp_path / "fresh"  # and without it, the same seed gives other (random) weights
    train.main(["--out", str(fresh), "--stage1-steps", "0", "--stage2-steps", "0"] + common)
    c = load_toy_pipeline(fresh / "weights")
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)


def test_aligning_the_image_encoder_fits_name_tokens_and_keeps_zero_biases():
    torch.manual_seed(0)
    pipe = train.build_pipeline(0, torch.device("cpu"), with_adapter=True)
    g = torch.Generator().manual_seed(4)
    refs, shapes, colors = train.reference_batch(8, g, "cpu")
    assert refs.shape == (8, 3, 32, 32) and refs.min() >= -1 and refs.max() <= 1
    assert shapes.shape == colors.shape == (8,)
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    first = train.align_image_encoder(pipe, 1, 64, torch.Generator().manual_seed(5), "cpu")
    last = train.align_image_encoder(pipe, 60, 64, torch.Generator().manual_seed(6), "cpu")
    assert last < 0.5 * first
    # a zero image embedding (diffusers' negative) must still give zero tokens: no image branch
    assert not projection.image_embeds.bias.any() and not projection.norm.bias.any()


def test_align_steps_run_before_stage_two(tmp_path):
    out = tmp_path / "run"
    result = train.main(["--out", str(out), "--stage1-steps", "1", "--stage2-steps", "1", "--align-steps", "2",
                         "--batch-size", "2", "--size", "32", "--check-images", "0"])
    assert result["steps"] == {1: 1, 2: 1}
    assert isinstance(result["align_loss"], float) and result["align_loss"] > 0
    plain = train.main(["--out", str(tmp_path / "plain"), "--stage1-steps", "0", "--stage2-steps", "0",
                        "--batch-size", "2", "--size", "32", "--check-images", "0", "--align-steps", "0"])
    assert plain["align_loss"] is None


def test_edge_weight_adds_the_loss_on_pixel_differences():
    class Constant(torch.nn.Module):  # predicts a fixed clean image, whatever the input
        def __init__(self, prediction):
            super().__init__()
            self.prediction = prediction

        def forward(self, x_t, t, **kwargs):
            return (self.prediction,)

    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    alphas = torch.linspace(0.999, 0.0, 1000)
    error = torch.kron(torch.rand(2, 3, 4, 4, generator=g), torch.ones(4, 4))  # constant over each fold block
    model = Constant(train.fold(images + error))
    plain, edged = (train.v_loss(model, images, None, alphas, torch.Generator().manual_seed(1), edge_weight=w)
                    for w in (0.0, 2.0))
    t = torch.randint(0, 1000, (2,), generator=torch.Generator().manual_seed(1))  # v_loss's own draw
    snr = alphas[t] / (1 - alphas[t]).clamp_min(1e-8)
    weight = (1 + snr.clamp(max=4.0)).view(2, 1, 1, 1)
    assert torch.allclose(plain, (error**2 * weight).mean())
    edges = (error.diff(dim=-1) ** 2 * weight).mean() + (error.diff(dim=-2) ** 2 * weight).mean()
    assert edges > 0 and torch.allclose(edged, plain + 2.0 * edges)
    with pytest.raises(SystemExit):
        train.parse_args(["--out", "x", "--edge-weight", "-1"])


def test_quick_check_reports_shape_use_framed_and_where_anyms_needs_it():
    torch.set_num_threads(1)
    pipes = {}
    for stage in (1, 2):  # as in training: stage 1 has no adapter loaded
        pipes[stage] = train.build_pipeline(0, torch.device("cpu"), with_adapter=stage == 2)
        pipes[stage].unet.eval()
        pipes[stage].set_progress_bar_config(disable=True)
    base, images = train.quick_check(pipes[1], 1, n=1, seed=0)
    assert set(base) == {"background", "shape_reliance", "shape_reliance_anywhere"} and len(images) == 1
    adapter, _ = train.quick_check(pipes[2], 2, n=1, seed=0)
    assert {"subject_found", "shape_ok", "shape_reliance", "shape_reliance_in_box"} <= set(adapter)
    assert all(0 <= adapter[k] <= 1 for k in ("first_step_inscribed", "first_step_framed_crop"))
    # random weights see their condition a little, either way; the two measurements are different scenes
    assert all(r > 0 and r != 1.0 for r in (base["shape_reliance_anywhere"], adapter["shape_reliance_in_box"]))
    assert adapter["shape_reliance"] != adapter["shape_reliance_in_box"]


def test_alignment_stops_when_its_time_is_spent(capsys):
    pipe = train.build_pipeline(0, torch.device("cpu"), with_adapter=True)
    start = time.perf_counter()
    loss = train.align_image_encoder(pipe, 100_000, 8, torch.Generator().manual_seed(5), "cpu", max_seconds=0.5)
    assert time.perf_counter() - start < 30 and loss > 0  # 100,000 steps would take hours
    assert "stopped after" in capsys.readouterr().err
