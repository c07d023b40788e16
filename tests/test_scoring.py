"""anyms_core.scoring: the paper's metrics on tiny random models and stand-ins with known answers, the toy
backend, the summaries with CIs and the Fig. 4-style plot. No weights are downloaded."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from anyms_core.run import Run
from anyms_core.scoring import Scores, score_sweep
from anyms_core.scoring.detection import Detection, GroundingDinoDetector, average_precision, best_detection, box_iou
from anyms_core.scoring.identity import ClipEmbedder, DinoEmbedder, DreamSimScorer, SamSegmenter, cosine, cut_out, pixel_box
from anyms_core.scoring.paper import ModelNotAvailable, PaperBackend, load_dreamsim, load_model
from anyms_core.scoring.plot import plot_metric_pair, plot_metric_vs_subjects
from anyms_core.scoring.stats import ALL, bootstrap_ci, markdown_table, set_ci, summarize

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# Tiny models from configs (random weights) and their processors, built offline
# --------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import (BertTokenizer, BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              CLIPTokenizer, Dinov2Config, Dinov2Model, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SamConfig, SamImageProcessor, SamModel,
                              SamProcessor)

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tokenizers")
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=64, bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16))
    clip_processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                                   tokenizer=CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")))
    dino = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8))
    dino_processor = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                       image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    sam = SamModel(SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16, output_channels=16,
                           window_size=2, global_attn_indexes=[1], mlp_dim=64, num_pos_feats=8),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16)))
    sam_processor = SamProcessor(SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}))
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "red", "circle", "cat", "dog"]
    (folder / "bert.txt").write_text("\n".join(words) + "\n")
    gdino = GroundingDinoForObjectDetection(GroundingDinoConfig(
        backbone_config=dict(model_type="swin", embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2, image_size=64,
                             out_features=["stage2", "stage3", "stage4"]),
        text_config=dict(model_type="bert", vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, num_queries=10, num_feature_levels=3, encoder_n_points=2, decoder_n_points=2, max_text_len=16))
    gdino_processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}),
                                             tokenizer=BertTokenizer(str(folder / "bert.txt")))
    return {"clip": (clip, clip_processor), "dino": (dino, dino_processor), "sam": (sam, sam_processor),
            "gdino": (gdino, gdino_processor)}


def _pattern(seed: int, size: int = 16) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8))


class StandIn:
    """A detector that returns known boxes per query (and remembers what it was asked)."""

    def __init__(self, boxes: dict[str, list[tuple[list[float], float]]]):
        self.boxes, self.queries = boxes, []

    def detect(self, image, query):
        self.queries.append(query)
        return [Detection(query, box, score) for box, score in self.boxes.get(query, [])]


# --------------------------------------------------------------------------------------------
# Detection metrics: known answers
# --------------------------------------------------------------------------------------------
def test_box_iou_and_best_detection_known_values():
    assert box_iou([0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]) == 1.0
    assert box_iou([0, 0, 0.5, 0.5], [0, 0, 0.5, 0.25]) == pytest.approx(0.5)
    assert box_iou([0, 0, 0.2, 0.2], [0.5, 0.5, 1, 1]) == 0.0
    detections = [Detection("cat", [0, 0, 0.5, 0.25], 0.9), Detection("dog", [0, 0, 0.5, 0.5], 0.99),
                  Detection("cat", [0.6, 0.6, 1, 1], 0.5)]
    iou, match = best_detection([0, 0, 0.5, 0.5], "cat", detections)
    assert iou == pytest.approx(0.5) and match is detections[0]  # the dog box fits better but is another class
    assert best_detection([0, 0, 0.1, 0.1], "bird", detections) == (0.0, None)


def test_average_precision_known_values():
    truths = [[{"label": "cat", "box": [0, 0, 0.5, 0.5]}], [{"label": "cat", "box": [0.5, 0.5, 1, 1]}]]
    hit0 = {"label": "cat", "box": [0, 0, 0.5, 0.5], "score": 0.9}
    miss = {"label": "cat", "box": [0.6, 0, 1, 0.3], "score": 0.8}
    hit1 = {"label": "cat", "box": [0.5, 0.5, 1, 0.95], "score": 0.7}  # IoU 0.9
    perfect = [{"detections": [hit0], "truths": truths[0]}, {"detections": [hit1], "truths": truths[1]}]
    assert average_precision(perfect) == pytest.approx(1.0)
    # a false positive ranked between the hits: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 ->
    # 101-point AP = (51 * 1 + 50 * 2/3) / 101
    ranked = [{"detections": [hit0, miss], "truths": truths[0]}, {"detections": [hit1], "truths": truths[1]}]
    assert average_precision(ranked) == pytest.approx((51 + 50 * 2 / 3) / 101)
    # a duplicate of a matched box is a false positive; a box below IoU 0.5 never matches
    loose = {"label": "cat", "box": [0, 0, 0.5, 0.2], "score": 0.95}  # IoU 0.4
    assert average_precision([{"detections": [loose], "truths": truths[0]}]) == 0.0
    # classes are averaged: a perfect class and a missed one give 0.5
    two = [{"detections": [hit0], "truths": truths[0] + [{"label": "dog", "box": [0.5, 0.5, 1, 1]}]}]
    assert average_precision(two) == pytest.approx(0.5)
    assert math.isnan(average_precision([{"detections": [], "truths": []}]))


def test_stand_in_detector_gives_known_iou_and_ap50_through_the_backend():
    image = _pattern(0, 32)
    row = {"run_id": "r", "prompt": "a photo", "classes": ["cat", "dog"],
           "boxes": [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]}
    detector = StandIn({"cat": [([0.0, 0.0, 0.5, 0.25], 0.9)], "dog": [([0.5, 0.5, 1.0, 1.0], 0.8), ([0, 0, 0.1, 0.1], 0.3)]})
    backend = PaperBackend(("miou", "ap50"), detector=detector)
    per_image, subjects, record = backend.score_image(row, image, [image, image])
    assert detector.queries == ["cat", "dog"]
    assert [s["iou"] for s in subjects] == pytest.approx([0.5, 1.0])
    assert per_image["miou"] == pytest.approx(0.75)
    # cat: its only detection has IoU 0.5 (a match at >= 0.5); dog: the hit outranks the miss
    assert backend.set_values([record])["ap50"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Identity and text metrics on tiny random models
# --------------------------------------------------------------------------------------------
def test_identical_images_give_clip_i_and_dino_of_one_with_random_weights(tiny):
    reference = _pattern(1)
    canvas = _pattern(2, 32)
    canvas.paste(reference, (8, 8))  # the subject sits exactly in its box
    row = {"run_id": "r", "prompt": "a red circle", "classes": ["cat"], "boxes": [[0.25, 0.25, 0.75, 0.75]]}
    backend = PaperBackend(("miou", "clip_i", "dino"), detector=StandIn({"cat": [([0.25, 0.25, 0.75, 0.75], 0.9)]}),
                           clip=ClipEmbedder(*tiny["clip"]), dino=DinoEmbedder(*tiny["dino"]))
    per_image, subjects, _ = backend.score_image(row, canvas, [reference])
    assert subjects[0]["crop_from"] == "detection" and per_image["miou"] == 1.0
    assert per_image["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert per_image["dino"] == pytest.approx(1.0, abs=1e-5)


def test_self_similarity_beats_shuffled_pairs(tiny):
    """Each image against itself (cosine 1) scores above the same image against another one."""
    images = [_pattern(seed) for seed in range(4)]
    shuffled = images[1:] + images[:1]
    for embedder in (ClipEmbedder(*tiny["clip"]), DinoEmbedder(*tiny["dino"])):
        own = cosine(embedder.images(images), embedder.images(images))
        other = cosine(embedder.images(images), embedder.images(shuffled))
        assert own == pytest.approx([1.0] * 4, abs=1e-5)
        assert all(o > s for o, s in zip(own, other))


def _stand_in_dreamsim() -> DreamSimScorer:
    """The dreamsim package's interface: preprocess(PIL) -> [1, 3, H, W]; model(a, b) -> distance (1 - cosine)."""
    def preprocess(image):
        return torch.from_numpy(np.asarray(image.convert("RGB").resize((16, 16)), dtype=np.float32)).permute(2, 0, 1)[None] / 255

    def model(a, b):
        return 1 - torch.nn.functional.cosine_similarity(a.flatten(1) - 0.5, b.flatten(1) - 0.5)

    return DreamSimScorer(model, preprocess)


def test_dreamsim_is_one_minus_the_distance_and_opt_in(monkeypatch, tmp_path):
    reference = _pattern(1)
    canvas = _pattern(2, 32)
    canvas.paste(reference, (8, 8))
    row = {"run_id": "r", "prompt": "p", "classes": ["cat"], "boxes": [[0.25, 0.25, 0.75, 0.75]]}
    backend = PaperBackend(("dreamsim",), detector=StandIn({"cat": [([0.25, 0.25, 0.75, 0.75], 0.9)]}), dreamsim=_stand_in_dreamsim())
    assert backend.score_image(row, canvas, [reference])[0]["dreamsim"] == pytest.approx(1.0, abs=1e-5)
    images = [_pattern(seed) for seed in range(3)]
    own, other = (backend.dreamsim.similarity(images, pair) for pair in (images, images[1:] + images[:1]))
    assert all(o > s for o, s in zip(own, other))
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelNotAvailable, match="pip install dreamsim"):
        load_dreamsim(str(tmp_path))
    from anyms_core.scoring import expand_metrics

    assert "dreamsim" not in expand_metrics(["paper"])[1] and "dreamsim" in expand_metrics(["dreamsim"])[1]


def test_clip_t_is_the_cosine_of_the_models_own_embeddings(tiny):
    model, processor = tiny["clip"]
    image, prompt = _pattern(3, 32), "a red circle"
    backend = PaperBackend(("clip_t",), clip=ClipEmbedder(model, processor))
    value = backend.score_image({"run_id": "r", "prompt": prompt, "classes": ["x"], "boxes": [[0, 0, 1, 1]]}, image, [image])[0]["clip_t"]
    with torch.no_grad():
        inputs = processor(images=[image], text=[prompt], return_tensors="pt", padding=True)
        a = model.get_image_features(pixel_values=inputs["pixel_values"])
        b = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        a, b = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (a, b))
    assert value == pytest.approx(torch.nn.functional.cosine_similarity(a, b).item(), abs=1e-5)


def test_grounding_dino_detector_returns_normalized_boxes_for_its_query(tiny):
    model, processor = tiny["gdino"]
    detector = GroundingDinoDetector(model, processor, box_threshold=0.0, text_threshold=0.0)
    image = _pattern(4, 48)
    detections = detector.detect(image, "Red circle")
    assert detections and all(d.label == "Red circle" for d in detections)
    with torch.no_grad():
        outputs = model(**processor(images=image, text="red circle.", return_tensors="pt"))
    cx, cy, w, h = outputs.pred_boxes[0].unbind(-1)
    expected = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).clamp(0, 1)
    for detection in detections:  # the normalized boxes are the model's own (centre, size) boxes as corners
        assert min(torch.dist(torch.tensor(detection.box), row).item() for row in expected) < 1e-4
        assert 0 <= detection.box[0] < detection.box[2] <= 1 and 0 <= detection.box[1] < detection.box[3] <= 1


def test_sam_cut_out_whitens_outside_the_mask(tiny):
    image = _pattern(5, 32)
    mask = SamSegmenter(*tiny["sam"]).mask(image, [0.25, 0.25, 0.75, 0.75])
    assert mask.shape == (32, 32) and mask.dtype == bool
    chosen = np.zeros((32, 32), dtype=bool)
    chosen[8:16, 8:24] = True
    crop = np.asarray(cut_out(image, [0.25, 0.25, 0.75, 0.75], chosen))
    assert crop.shape == (16, 16, 3)
    assert (crop[8:] == 255).all() and (crop[:8] == np.asarray(image)[8:16, 8:24]).all()
    assert pixel_box([0.0, 0.0, 0.01, 0.01], 32, 32) == (0, 0, 1, 1)


def test_models_load_from_local_folders_and_missing_ones_say_how_to_download(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = tiny["dino"]
    model.save_pretrained(tmp_path / "dino")
    processor.save_pretrained(tmp_path / "dino")
    loaded = load_model("dino", str(tmp_path / "dino"))
    image = _pattern(6)
    assert torch.allclose(loaded.images([image]), DinoEmbedder(model, processor).images([image]), atol=1e-6)
    with pytest.raises(ModelNotAvailable, match=r"`hf download someone/not-a-cached-model`"):
        load_model("clip", "someone/not-a-cached-model")


# --------------------------------------------------------------------------------------------
# Summaries, tables, plots
# --------------------------------------------------------------------------------------------
def _rows():
    rows = []
    for variant, base in (("anyms", 0.8), ("none", 0.2)):
        for n in (2, 3):
            for seed in range(5):
                rows.append({"run_id": f"{variant}{n}{seed}", "variant": variant, "n_subjects": n,
                             "m": base - 0.1 * (n - 2) + 0.01 * seed})
    return rows


def test_bootstrap_ci_brackets_the_mean_and_is_deterministic():
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5, 0.5)
    values = list(np.random.default_rng(0).random(50))
    mean, low, high = bootstrap_ci(values)
    assert low < mean < high and mean == pytest.approx(np.mean(values))
    assert bootstrap_ci(values) == (mean, low, high)
    assert bootstrap_ci([1.0, float("nan"), 3.0])[0] == 2.0
    # resampling whole units: two cases whose images agree within a case but not across cases
    values, cases = [0.0] * 10 + [1.0] * 10, ["a"] * 10 + ["b"] * 10
    by_image, by_case = bootstrap_ci(values), bootstrap_ci(values, units=cases)
    assert by_image[0] == by_case[0] == 0.5
    assert by_case[2] - by_case[1] > 2 * (by_image[2] - by_image[1])  # 2 cases: the honest interval is ~[0, 1]
    assert bootstrap_ci(values, units=["a"] * 20) == (0.5, 0.5, 0.5)  # one unit: nothing to resample
    mean_of = lambda records: float(np.mean(records))
    assert set_ci(values, mean_of, units=cases) == (0.5, 0.0, 1.0)  # a quarter of the resamples hold one case only
    assert 0.25 < set_ci(values, mean_of)[1] < 0.5 < set_ci(values, mean_of)[2] < 0.75


def test_summary_groups_by_variant_and_subject_count_and_table_and_plot(monkeypatch):
    import matplotlib.pyplot as plt

    summary = summarize(_rows(), ["m"], bootstrap=200)
    keys = [(r["variant"], r["n_subjects"], r["images"]) for r in summary]
    assert keys == [("anyms", 2, 5), ("anyms", 3, 5), ("anyms", ALL, 10), ("none", 2, 5), ("none", 3, 5), ("none", ALL, 10)]
    assert summary[0]["m"] == pytest.approx(0.82) and summary[2]["m"] == pytest.approx(0.77)
    assert summarize(_rows(), ["m"], min_subjects=3)[0]["n_subjects"] == 3
    by_case = summarize([dict(r, case=r["run_id"][:-1]) for r in _rows()], ["m"], bootstrap=200, ci_unit="case")
    assert by_case[0]["m_low"] == by_case[0]["m_high"] == by_case[0]["m"]  # one case per group: no spread to resample
    table = markdown_table(summary, ["m"], n_subjects=ALL, scale=100)
    assert "| anyms | all | 10 | 77.00 [" in table and table.count("\n") == 3
    monkeypatch.setattr(plt, "show", lambda *a, **k: pytest.fail("plots never show"))
    fig, ax = plt.subplots()
    assert plot_metric_vs_subjects(summary, "m", ax=ax) is fig
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "3", "all"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["anyms", "none"]
    plt.close(fig)
    for row in summary:
        row.update(k=1 - row["m"], k_low=1 - row["m_high"], k_high=1 - row["m_low"])
    fig, ax = plt.subplots()
    assert plot_metric_pair(summary, "m", "k", ax=ax) is fig
    points = sorted((round(line.get_xdata()[0], 6), round(line.get_ydata()[0], 6), line.get_marker())
                    for line in ax.get_lines() if line.get_marker() in ("o", "s", "D"))  # not the error bars' caps
    expected = sorted((round(r["m"], 6), round(1 - r["m"], 6), {2: "o", 3: "s", ALL: "D"}[r["n_subjects"]]) for r in summary)
    assert points == expected  # one point per variant x subject count, rhombus for "all"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["anyms", "none", "2 subjects", "3 subjects", "all"]
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# score_sweep on a sweep folder (runs written directly), toy backend and stand-in paper backend
# --------------------------------------------------------------------------------------------
def _fake_sweep(folder, images: dict[str, Image.Image], subjects: list[tuple[str, list[float]]], prompt: str):
    from anyms_core.toy import sprite_reference

    rows = []
    for run_id, image in images.items():
        config = {"prompt": prompt, "variant": run_id.split("__")[1], "seed": 0, "steps": 1,
                  "subjects": [{"name": name, "box": box, "priority": None} for name, box in subjects]}
        Run([image], config, [sprite_reference(name) for name, _ in subjects]).save(folder / "runs" / run_id)
        rows.append({"run_id": run_id, "path": f"runs/{run_id}", "case": run_id.split("__")[0], "variant": config["variant"],
                     "seed": 0, "n_subjects": len(subjects), "prompt": prompt, "names": [n for n, _ in subjects],
                     "classes": [n for n, _ in subjects], "images": [f"toy:{n}" for n, _ in subjects],
                     "boxes": [b for _, b in subjects]})
    (folder / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_toy_backend_scores_a_rendered_scene_above_its_shuffled_pixels(tmp_path):
    from anyms_core.toy import render_scene

    subjects = [("red circle", [0.05, 0.1, 0.5, 0.6]), ("cyan square", [0.55, 0.4, 0.95, 0.9])]
    scene = render_scene("grass", subjects, size=32, seed=0)
    pixels = np.asarray(scene).reshape(-1, 3).copy()
    np.random.default_rng(0).shuffle(pixels)
    shuffled = Image.fromarray(pixels.reshape(32, 32, 3))
    _fake_sweep(tmp_path, {"12__anyms__s0": scene, "12__none__s0": shuffled}, subjects, "a photo on grass")
    scores = score_sweep(tmp_path, ["toy"], progress=False)
    by_variant = {row["variant"]: row for row in scores.per_image}
    assert by_variant["anyms"]["toy_iou"] > 0.8 and by_variant["anyms"]["toy_background"] == 1.0
    assert by_variant["anyms"]["toy_iou"] > by_variant["none"]["toy_iou"]
    assert len(scores.per_subject) == 4 and scores.metrics[-1] == "toy_ap50"
    written = scores.save(tmp_path / "scores", bootstrap=50)
    assert {p.name for p in written} >= {"per_image.csv", "per_subject.csv", "summary.csv", "summary.md", "fig4_toy_iou.png"}
    again = Scores.load(tmp_path / "scores")
    assert again.per_image == scores.per_image and again.metrics == scores.metrics  # case "12" stays a string
    summary = again.summary(bootstrap=50)
    assert summary[0]["toy_ap50"] > summary[-1]["toy_ap50"]


def test_score_command_with_stand_in_paper_backend(tmp_path, tiny):
    reference_scene = _pattern(7, 32)
    subjects = [("red circle", [0.25, 0.25, 0.75, 0.75])]
    _fake_sweep(tmp_path, {"c__anyms__s0": reference_scene}, subjects, "a red circle")
    backend = PaperBackend(("miou", "ap50", "clip_t"), detector=StandIn({"red circle": [([0.25, 0.25, 0.75, 0.75], 0.9)]}),
                           clip=ClipEmbedder(*tiny["clip"]))
    scores = score_sweep(tmp_path, backends=[backend], progress=False)
    assert scores.metrics == ["miou", "clip_t", "ap50"]
    assert scores.per_image[0]["miou"] == 1.0 and -1 <= scores.per_image[0]["clip_t"] <= 1
    assert scores.summary()[0]["ap50"] == 1.0


def test_score_command_errors_are_one_line(tmp_path, capsys):
    from anyms_core.scoring import main

    assert main([str(tmp_path), "--metrics", "toy", "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # (importing the toy world may warn first)
    assert error.startswith("anyms score: error:") and "index.jsonl" in error


def test_score_command_loads_every_paper_model_from_local_folders(tmp_path, tiny, monkeypatch, capsys):
    """`anyms score DIR --metrics paper --detector PATH ...`: the real loading code, on tiny saved models."""
    from anyms_core.scoring import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for kind, key in (("detector", "gdino"), ("segmenter", "sam"), ("clip", "clip"), ("dino", "dino")):
        model, processor = tiny[key]
        model.save_pretrained(tmp_path / kind)
        processor.save_pretrained(tmp_path / kind)
    sweep = tmp_path / "sweep"
    _fake_sweep(sweep, {"c__anyms__s0": _pattern(8, 32), "c__none__s0": _pattern(9, 32)}, [("red circle", [0.1, 0.1, 0.6, 0.6])],
                "a red circle")
    argv = [str(sweep), "--metrics", "paper", "--no-progress", "--bootstrap", "20"]
    argv += [arg for kind in ("detector", "segmenter", "clip", "dino") for arg in (f"--{kind}", str(tmp_path / kind))]
    assert main(argv) == 0
    scores = Scores.load(sweep / "scores")
    assert scores.metrics == ["miou", "clip_i", "dino", "clip_t", "ap50"]
    for row in scores.per_image:
        assert 0 <= row["miou"] <= 1 and all(-1 <= row[m] <= 1 for m in ("clip_i", "dino", "clip_t"))
    assert (sweep / "scores" / "fig4_clip_i.png").exists() and "| anyms | 1 | 1 |" in (sweep / "scores" / "summary.md").read_text()
