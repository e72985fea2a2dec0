"""Evaluation metrics: retrieval recall (LAVIS definitions, percent) and top-k accuracy."""

from __future__ import annotations

import numpy as np
import torch


def retrieval_metrics(score_i2t: torch.Tensor | np.ndarray, score_t2i: torch.Tensor | np.ndarray,
                      img2txt: dict[int, list[int]], txt2img: dict[int, int]) -> dict[str, float]:
    """txt_r1/5/10 (image -> text, best rank among an image's captions), img_r1/5/10 (text -> its image),
    their means, r_mean and agg_metrics (= txt_r_mean, as LAVIS selects checkpoints)."""
    score_i2t = np.asarray(score_i2t, dtype=np.float64)
    score_t2i = np.asarray(score_t2i, dtype=np.float64)
    image_ranks = np.zeros(score_i2t.shape[0])
    for image, scores in enumerate(score_i2t):
        order = np.argsort(scores)[::-1]
        image_ranks[image] = min(np.where(order == text)[0][0] for text in img2txt[image])
    text_ranks = np.zeros(score_t2i.shape[0])
    for text, scores in enumerate(score_t2i):
        order = np.argsort(scores)[::-1]
        text_ranks[text] = np.where(order == txt2img[text])[0][0]
    result = {}
    for prefix, ranks in (("txt", image_ranks), ("img", text_ranks)):
        for k in (1, 5, 10):
            result[f"{prefix}_r{k}"] = 100.0 * float(np.mean(ranks < k))
        result[f"{prefix}_r_mean"] = (result[f"{prefix}_r1"] + result[f"{prefix}_r5"] + result[f"{prefix}_r10"]) / 3
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    result["agg_metrics"] = result["txt_r_mean"]
    return result


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Percent of rows whose label is among the k highest logits."""
    result = {}
    for k in ks:
        k_eff = min(k, logits.shape[1])
        hits = (logits.topk(k_eff, dim=1).indices == labels[:, None]).any(dim=1)
        result[f"top{k}"] = 100.0 * hits.float().mean().item()
    return result
