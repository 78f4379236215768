"""Video quality metrics that run locally, in the forms VBench uses (frames are (F, H, W, 3) floats in [0, 1]).

- temporal consistency: VBench's subject/background consistency formula over per-frame features,
  mean over frames i >= 1 of (cos(f_i, f_0) + cos(f_i, f_{i-1})) / 2. The features are CLIP image embeddings when
  a CLIP model directory is given (VBench's background consistency uses CLIP), else 32 x 32 thumbnails with their
  mean removed (the cosine is then the thumbnails' correlation: 1 for a still video, about 0 for fresh noise).
- motion smoothness: VBench's score (255 - MAE) / 255 of reconstructing every odd frame from its two neighbours,
  with the neighbours' average in place of VBench's AMT interpolation network (none ships here): 1 for linear
  motion or a still video, lower for flicker.
- CLIP score: 100 x the cosine between the prompt's CLIP text embedding and each frame's image embedding, averaged
  over frames (CLIPSIM).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

THUMBNAIL = 32


def consistency(features: torch.Tensor) -> float:
    """VBench's consistency of per-frame features (F, D)."""
    features = F.normalize(features.float(), dim=1)
    first = features[1:] @ features[0]
    previous = (features[1:] * features[:-1]).sum(dim=1)
    return float(((first + previous) / 2).mean())


def thumbnail_features(frames: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) -> (F, 3·32·32): area-downsized frames, each minus its own mean."""
    pixels = torch.as_tensor(frames, dtype=torch.float32).permute(0, 3, 1, 2)
    small = F.adaptive_avg_pool2d(pixels, THUMBNAIL).flatten(1)
    return small - small.mean(dim=1, keepdim=True)


def motion_smoothness(frames: np.ndarray) -> float:
    """(255 - MAE) / 255 of each odd frame against its neighbours' average (1.0 for under 3 frames)."""
    if len(frames) < 3:
        return 1.0
    middle = np.arange(1, len(frames) - 1, 2)
    guess = (frames[middle - 1] + frames[middle + 1]) / 2
    return float(1 - np.abs(frames[middle] - guess).mean())


class Clip:
    """A local CLIP model directory (CLIPModel, its tokenizer and image processor, as save_pretrained writes them)."""

    def __init__(self, path: str, device: torch.device):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.model = CLIPModel.from_pretrained(path).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.processor = CLIPImageProcessor.from_pretrained(path)
        self.device = device

    @torch.no_grad()
    def image_features(self, frames: np.ndarray) -> torch.Tensor:
        """(F, H, W, 3) -> (F, D) image embeddings."""
        inputs = self.processor(images=list(frames), return_tensors="pt", do_rescale=False)
        pooled = self.model.vision_model(pixel_values=inputs["pixel_values"].to(self.device)).pooler_output
        return self.model.visual_projection(pooled).cpu()

    @torch.no_grad()
    def text_features(self, prompt: str) -> torch.Tensor:
        tokens = self.tokenizer([prompt], padding=True, truncation=True, return_tensors="pt").to(self.device)
        pooled = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return self.model.text_projection(pooled.pooler_output).cpu()[0]

    def score(self, frames: np.ndarray, prompt: str) -> float:
        similarity = F.normalize(self.image_features(frames), dim=1) @ F.normalize(self.text_features(prompt), dim=0)
        return float(100 * similarity.mean())


def video_metrics(frames: np.ndarray, prompt: str, clip: Any | None) -> dict[str, float]:
    """The metrics of one video (F, H, W, 3) in [0, 1]."""
    features = clip.image_features(frames) if clip is not None else thumbnail_features(frames)
    metrics = {"temporal_consistency": consistency(features), "motion_smoothness": motion_smoothness(frames)}
    if clip is not None:
        metrics["clip_score"] = clip.score(frames, prompt)
    return metrics
