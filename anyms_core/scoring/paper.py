"""The paper's metrics (Sec. 4.1) as a scoring backend: mIoU, AP50, CLIP-I, DINO, CLIP-T (+ DreamSim).

Models come from hub ids already in the local cache, or local folders; nothing is downloaded. The
defaults are common choices (the paper does not name its checkpoints); pass others with
``anyms score --detector/--segmenter/--clip/--dino``. DreamSim is opt-in (``--metrics dreamsim``): it
needs the ``dreamsim`` package (pip install dreamsim) and its weights in ``--dreamsim-cache``.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from .detection import Detection, GroundingDinoDetector, average_precision, best_detection
from .identity import ClipEmbedder, DinoEmbedder, DreamSimScorer, SamSegmenter, cosine, cut_out

NAME = "paper"
IMAGE_METRICS = ("miou", "clip_i", "dino", "dreamsim", "clip_t")
SET_METRICS = ("ap50",)
ALL_METRICS = ("miou", "ap50", "clip_i", "dino", "dreamsim", "clip_t")
DEFAULT_MODELS = {
    "detector": "IDEA-Research/grounding-dino-base",
    "segmenter": "facebook/sam-vit-base",
    "clip": "openai/clip-vit-large-patch14",
    "dino": "facebook/dino-vits16",
}
DREAMSIM_CACHE = "~/.cache/dreamsim"  # where the dreamsim package keeps its weights (not a hub repo)


class ModelNotAvailable(RuntimeError):
    """A scoring model is neither in the local hub cache nor a local folder; the message says how to get it."""


def load_model(kind: str, source: str, device: str = "cpu"):
    """Loads one scoring model (``detector``, ``segmenter``, ``clip``, ``dino`` or ``dreamsim``) from the cache or a folder.

    For ``dreamsim``, ``source`` is the folder holding the dreamsim package's weights.
    """
    if kind == "dreamsim":
        return load_dreamsim(source, device)
    import transformers

    classes = {
        "detector": ("AutoModelForZeroShotObjectDetection", "AutoProcessor", GroundingDinoDetector),
        "segmenter": ("SamModel", "SamProcessor", SamSegmenter),
        "clip": ("CLIPModel", "CLIPProcessor", ClipEmbedder),
        "dino": ("AutoModel", "AutoImageProcessor", DinoEmbedder),
    }
    if kind not in classes:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(classes)}")
    model_class, processor_class, wrapper = classes[kind]
    try:
        model = getattr(transformers, model_class).from_pretrained(source, local_files_only=True)
        processor = getattr(transformers, processor_class).from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0][:200]
        raise ModelNotAvailable(
            f"cannot load the {kind} model {source!r} ({reason}). anyms score never downloads weights: "
            f"run `hf download {source}` first, or pass a local folder with --{kind} PATH"
        ) from None
    return wrapper(model.to(device), processor)


def load_dreamsim(cache_dir: str = DREAMSIM_CACHE, device: str = "cpu") -> DreamSimScorer:
    """DreamSim from the ``dreamsim`` package, with weights already in ``cache_dir`` (never downloaded here)."""
    import importlib.util
    import os

    if importlib.util.find_spec("dreamsim") is None:
        raise ModelNotAvailable("the dreamsim metric needs the dreamsim package: pip install dreamsim")
    folder = os.path.expanduser(cache_dir)
    if not os.path.isdir(folder) or not os.listdir(folder):
        raise ModelNotAvailable(
            f"DreamSim's weights are not in {folder!r}; anyms score never downloads weights. Fetch them once with "
            f"`python -c \"from dreamsim import dreamsim; dreamsim(pretrained=True, device='cpu', cache_dir='{folder}')\"` "
            "or pass the folder that holds them with --dreamsim-cache PATH")
    from dreamsim import dreamsim

    model, preprocess = dreamsim(pretrained=True, device=device, cache_dir=folder)
    return DreamSimScorer(model, preprocess, device)


@dataclass
class PaperBackend:
    """Scores runs with the paper's metrics; any model left None is not needed by ``metrics``.

    ``detector`` answers ``detect(image, query)``; ``segmenter`` ``mask(image, box)``; ``clip``
    ``images(...)`` and ``texts(...)``; ``dino`` ``images(...)``; ``dreamsim``
    ``similarity(images, references)``. A subject's crop is the detection of
    its class that overlaps its box most, else that class's best-scored detection, else its box
    (``crop_from`` says which), refined by the segmenter's mask when there is one.
    """

    metrics: tuple[str, ...] = ALL_METRICS
    detector: object | None = None
    segmenter: object | None = None
    clip: object | None = None
    dino: object | None = None
    dreamsim: object | None = None
    name: str = NAME

    def __post_init__(self) -> None:
        self.metrics = tuple(self.metrics)
        unknown = sorted(set(self.metrics) - set(ALL_METRICS))
        if unknown:
            raise ValueError(f"unknown paper metric(s) {unknown}; choose from {list(ALL_METRICS)}")
        needs = {"detector": {"miou", "ap50", "clip_i", "dino", "dreamsim"}, "clip": {"clip_i", "clip_t"}, "dino": {"dino"},
                 "dreamsim": {"dreamsim"}}
        for model, metrics in needs.items():
            if getattr(self, model) is None and metrics & set(self.metrics):
                raise ValueError(f"metric(s) {sorted(metrics & set(self.metrics))} need a {model} model")
        self.image_metrics = tuple(m for m in IMAGE_METRICS if m in self.metrics)
        self.set_metrics = tuple(m for m in SET_METRICS if m in self.metrics)

    @classmethod
    def from_pretrained(cls, metrics: tuple[str, ...] = ALL_METRICS, models: dict | None = None, device: str = "cpu",
                        segment: bool = True) -> "PaperBackend":
        """Loads the models ``metrics`` need (``models`` overrides :data:`DEFAULT_MODELS` per kind)."""
        sources = {**DEFAULT_MODELS, "dreamsim": DREAMSIM_CACHE, **(models or {})}
        metrics = tuple(metrics)
        wanted = {"detector": {"miou", "ap50", "clip_i", "dino", "dreamsim"},
                  "segmenter": {"clip_i", "dino", "dreamsim"} if segment else set(),
                  "clip": {"clip_i", "clip_t"}, "dino": {"dino"}, "dreamsim": {"dreamsim"}}
        loaded = {kind: load_model(kind, sources[kind], device) if kinds & set(metrics) else None
                  for kind, kinds in wanted.items()}
        return cls(metrics, **loaded)

    def score_image(self, row: dict, image: Image.Image, references: list[Image.Image]) -> tuple[dict, list[dict], dict]:
        """-> (per-image metrics, per-subject rows, the record ``set_values`` needs)."""
        classes, boxes = row["classes"], row["boxes"]
        detections: list[Detection] = []
        if self.detector is not None:
            for query in dict.fromkeys(classes):
                detections += [Detection(query, d.box, d.score) for d in self.detector.detect(image, query)]
        subjects = [{} for _ in boxes]
        crops = []
        for subject, label, box in zip(subjects, classes, boxes):
            if self.detector is None:
                continue
            iou, match = best_detection(box, label, detections)
            subject["iou"] = iou
            if match is None:
                own = [d for d in detections if d.label == label]
                match = max(own, key=lambda d: d.score) if own else None
            subject["detected_box"] = None if match is None else match.box
            if not {"clip_i", "dino", "dreamsim"} & set(self.metrics):
                continue  # layout metrics only: no cut-outs
            subject["crop_from"] = "box" if match is None else "detection"
            crop_box = box if match is None else match.box
            mask = self.segmenter.mask(image, crop_box) if self.segmenter is not None else None
            if mask is not None and not mask.any():
                mask = None
            crops.append(cut_out(image, crop_box, mask))
        if "clip_i" in self.metrics:
            for subject, value in zip(subjects, cosine(self.clip.images(crops), self.clip.images(references))):
                subject["clip_i"] = value
        if "dino" in self.metrics:
            for subject, value in zip(subjects, cosine(self.dino.images(crops), self.dino.images(references))):
                subject["dino"] = value
        if "dreamsim" in self.metrics:
            for subject, value in zip(subjects, self.dreamsim.similarity(crops, references)):
                subject["dreamsim"] = value
        per_image = {}
        for metric, key in (("miou", "iou"), ("clip_i", "clip_i"), ("dino", "dino"), ("dreamsim", "dreamsim")):
            if metric in self.metrics:
                per_image[metric] = sum(s[key] for s in subjects) / len(subjects)
        if "clip_t" in self.metrics:
            per_image["clip_t"] = cosine(self.clip.images([image]), self.clip.texts([row["prompt"]]))[0]
        record = {"detections": [d.to_json() for d in detections],
                  "truths": [{"label": label, "box": list(box)} for label, box in zip(classes, boxes)]}
        return per_image, subjects, record

    def set_values(self, records: list[dict]) -> dict:
        return {"ap50": average_precision(records)} if "ap50" in self.metrics else {}


def set_values(records: list[dict]) -> dict:
    """AP50 of a set of saved records (what :meth:`PaperBackend.set_values` computes, without models)."""
    return {"ap50": average_precision(records)}
