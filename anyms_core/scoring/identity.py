"""Identity and text metrics: subject cut-outs (GroundingDINO box + SAM mask), CLIP-I, DINO, CLIP-T.

As the paper does it (Sec. 4.1): each subject's region is cut out of the generated image (the
detector's box, refined to a mask by SAM; pixels outside the mask become white, the reference's
backdrop) and compared with the subject's reference image by the cosine similarity of image
embeddings: CLIP-I (CLIP image embeddings), DINO (the CLS token of a self-supervised ViT, as in
DreamBooth's DINO score). CLIP-T is the cosine between the whole image's and the prompt's CLIP
embeddings. Scores are plain cosines in [-1, 1] (the paper prints them x 100).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def pixel_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """A normalized box as whole pixels (x0, y0, x1, y1 exclusive), at least one pixel wide and high."""
    x0, y0 = int(math.floor(box[0] * width)), int(math.floor(box[1] * height))
    x1, y1 = int(math.ceil(box[2] * width)), int(math.ceil(box[3] * height))
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    return x0, y0, max(min(x1, width), x0 + 1), max(min(y1, height), y0 + 1)


def cut_out(image: Image.Image, box: Sequence[float], mask: np.ndarray | None = None, fill: int = 255) -> Image.Image:
    """The region ``box`` of ``image``; with a boolean ``mask`` [H, W], pixels outside it become ``fill``."""
    array = np.array(image.convert("RGB"))
    if mask is not None:
        if mask.shape != array.shape[:2]:
            raise ValueError(f"mask has shape {mask.shape}, the image {array.shape[:2]}")
        array[~mask] = fill
    x0, y0, x1, y1 = pixel_box(box, image.width, image.height)
    return Image.fromarray(array[y0:y1, x0:x1])


class SamSegmenter:
    """SAM (transformers' ``SamModel``) prompted with one box: the subject's mask."""

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor

    @torch.no_grad()
    def mask(self, image: Image.Image, box: Sequence[float]) -> np.ndarray:
        """Boolean [H, W] mask of the object in normalized ``box``."""
        x0, y0, x1, y1 = pixel_box(box, image.width, image.height)
        device = next(self.model.parameters()).device
        inputs = self.processor(images=image, input_boxes=[[[float(x0), float(y0), float(x1), float(y1)]]],
                                return_tensors="pt").to(device)
        outputs = self.model(**inputs, multimask_output=False)
        masks = self.processor.post_process_masks(outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(),
                                                  inputs["reshaped_input_sizes"].cpu())
        return masks[0][0, 0].numpy().astype(bool)


def _features(output) -> torch.Tensor:
    # transformers >= 5 returns a model output whose pooler_output is the projected embedding
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEmbedder:
    """CLIP (transformers' ``CLIPModel``): L2-normalized image and text embeddings."""

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(device)
        return torch.nn.functional.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True).to(device)
        features = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return torch.nn.functional.normalize(_features(features).float(), dim=-1)


class DinoEmbedder:
    """A self-supervised ViT (DINO ``ViTModel`` or ``Dinov2Model``): L2-normalized CLS embeddings."""

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(device)
        cls = self.model(pixel_values=pixels).last_hidden_state[:, 0]
        return torch.nn.functional.normalize(cls.float(), dim=-1)


class DreamSimScorer:
    """DreamSim (the ``dreamsim`` package, Fu et al. 2023): similarity = 1 - DreamSim distance.

    ``model(a, b)`` is the package's perceptual distance of two preprocessed [1, 3, H, W] images and
    ``preprocess(image)`` its PIL-to-tensor transform, as ``dreamsim.dreamsim(...)`` returns them.
    """

    def __init__(self, model, preprocess, device: str | torch.device = "cpu"):
        self.model = model
        self.preprocess = preprocess
        self.device = device

    @torch.no_grad()
    def similarity(self, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> list[float]:
        out = []
        for image, reference in zip(images, references, strict=True):
            distance = self.model(self.preprocess(image).to(self.device), self.preprocess(reference).to(self.device))
            out.append(1.0 - float(torch.as_tensor(distance).flatten()[0]))
        return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Row-wise cosine of two [N, D] batches of L2-normalized embeddings."""
    return (a * b).sum(-1).clamp(-1, 1).tolist()
