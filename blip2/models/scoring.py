"""Scoring with a stage-1 model, shared by evaluation (``blip2.engine``) and inference (``blip2.pipelines``).

Images and texts to features, label features for zero-shot classification (prompt ensembling), zero-shot logits and
ranked labels, and the retrieval re-rank of LAVIS ``compute_sim_matrix``: ITC similarities for every pair, the top
``k_test`` candidates of each image (and each text) re-scored as ITM positive logit (mean over queries) + ITC cosine,
``FILL`` elsewhere. The re-rank scores the rows of one process (``rank`` of ``world_size``); combining the processes'
rows is the caller's (``blip2.engine.retrieval``): nothing here talks to other processes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

FILL = -100.0  # the score of a pair the re-rank did not score
TEXT_BATCH_SIZE = 256  # texts per text-encoder call
ITM_PAIRS_PER_CALL = 128  # default pairs per ITM call of the re-rank


def tokenize(tokenizer, texts: Sequence[str], max_length: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``input_ids`` and ``attention_mask`` (N, max_length) on ``device``."""
    tokens = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                       return_tensors="pt")
    return tokens["input_ids"].to(device), tokens["attention_mask"].to(device)


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], max_length: int, device: torch.device,
                 batch_size: int = TEXT_BATCH_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All texts -> normalized [CLS] features (N, E), ids and masks (N, L)."""
    feats, ids, masks = [], [], []
    for start in range(0, len(texts), batch_size):
        input_ids, attention_mask = tokenize(tokenizer, texts[start : start + batch_size], max_length, device)
        feats.append(model.get_text_features(input_ids, attention_mask).float())
        ids.append(input_ids)
        masks.append(attention_mask)
    return torch.cat(feats), torch.cat(ids), torch.cat(masks)


@torch.no_grad()
def encode_images(model, batches: Iterable[dict[str, Any] | None], device: torch.device, keep_embeds: bool = True,
                  autocast: Callable[[], Any] = contextlib.nullcontext, progress: bool = False):
    """All images -> query features (N, Q, E) in float32, ln_vision(ViT) outputs (N, T, D) for ITM (None unless
    ``keep_embeds``), and labels (None unless the batches have them). A batch is a dict with ``pixel_values`` (and
    ``labels``), or None (skipped)."""
    feats, embeds, labels = [], [], []
    for batch in tqdm(batches, desc="encode images", disable=not progress, leave=False):
        if batch is None:
            continue
        pixel_values = batch["pixel_values"].to(device, non_blocking=True)
        with autocast():
            image_embeds = model.encode_image(pixel_values)  # (b, T, D)
            query_hidden = model.query_forward(image_embeds).last_hidden_state  # (b, Q, D)
            feats.append(model.image_feats(query_hidden).float())
        if keep_embeds:
            embeds.append(image_embeds)
        if "labels" in batch:
            labels.append(batch["labels"])
    return torch.cat(feats), (torch.cat(embeds) if keep_embeds else None), (torch.cat(labels) if labels else None)


@torch.no_grad()
def label_features(model, tokenizer, labels: Sequence[str], templates: Sequence[str] | str, max_length: int,
                   device: torch.device) -> torch.Tensor:
    """One normalized text feature per label (C, E); several templates are averaged (prompt ensembling)."""
    templates = [templates] if isinstance(templates, str) else list(templates)
    per_template = []
    for template in templates:
        texts = [template.format(label) if "{}" in template else f"{template} {label}" for label in labels]
        per_template.append(encode_texts(model, tokenizer, texts, max_length, device)[0])
    return F.normalize(torch.stack(per_template).mean(0), dim=-1)


def zero_shot_logits(model, image_feats: torch.Tensor, label_feats: torch.Tensor) -> torch.Tensor:
    """Max-over-queries cosine divided by the learned temperature: (N, Q, E) x (C, E) -> (N, C)."""
    return model.similarity(image_feats, label_feats) / model.temp.float()


def ranked_labels(probs: torch.Tensor, labels: Sequence[str], top_k: int | None) -> list[list[dict[str, Any]]]:
    """Per row of ``probs`` (N, C): the ``top_k`` labels (None: all) as ``{"score", "label"}``, best first."""
    out = []
    for row in probs.tolist():
        order = sorted(range(len(labels)), key=lambda i: row[i], reverse=True)[: top_k or len(labels)]
        out.append([{"score": row[i], "label": labels[i]} for i in order])
    return out


def rank_rows(scores: torch.Tensor, limit: int | None) -> list[list[tuple[int, float]]]:
    """Per row, (column, score) pairs of the ``limit`` best columns, best first (ties: lower index first)."""
    k = scores.shape[1] if limit is None else min(limit, scores.shape[1])
    values, index = scores.float().cpu().sort(dim=1, descending=True, stable=True)
    return [list(zip(row_index[:k], row_values[:k])) for row_index, row_values in zip(index.tolist(), values.tolist())]


class _Reranker:
    """Queues (direction, row, top candidates) jobs and scores them in ITM calls of about ``pairs_per_call`` pairs."""

    def __init__(self, itm_fn, image_embeds: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                 scores: dict[str, torch.Tensor], add_itm: bool) -> None:
        self.itm_fn, self.add_itm, self.scores = itm_fn, add_itm, scores
        self.image_embeds, self.text_ids, self.text_mask = image_embeds, text_ids, text_mask
        self.pending: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queued pairs' image embeddings, text ids and masks, job after job."""
        images, ids, masks = [], [], []
        for direction, row, top_index, _ in self.pending:
            if direction == "i2t":
                images.append(self.image_embeds[row : row + 1].expand(len(top_index), -1, -1))
                ids.append(self.text_ids[top_index])
                masks.append(self.text_mask[top_index])
            else:
                images.append(self.image_embeds[top_index])
                ids.append(self.text_ids[row : row + 1].expand(len(top_index), -1))
                masks.append(self.text_mask[row : row + 1].expand(len(top_index), -1))
        return torch.cat(images), torch.cat(ids), torch.cat(masks)

    def flush(self) -> None:
        if not self.pending:
            return
        itm = self.itm_fn(*self.pairs())[:, 1].float() if self.add_itm else None
        offset = 0
        for direction, row, top_index, top_sim in self.pending:
            score = top_sim + (itm[offset : offset + len(top_index)] if self.add_itm else 0.0)
            offset += len(top_index)
            self.scores[direction][row, top_index] = score
        self.pending.clear()


@torch.no_grad()
def rerank_scores(itm_fn, sims: torch.Tensor, image_embeds: torch.Tensor, text_ids: torch.Tensor,
                  text_mask: torch.Tensor, k_test: int, batch_size: int = ITM_PAIRS_PER_CALL, add_itm: bool = True,
                  progress: bool = False, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-ranked (N_img, N_txt) image->text and (N_txt, N_img) text->image scores of this process's rows.

    ``itm_fn(image_embeds (P, N, D), input_ids (P, L), attention_mask (P, L)) -> (P, 2)`` scores pairs;
    ``sims`` (N_img, N_txt) is the ITC similarity; about ``batch_size`` pairs go to one ``itm_fn`` call. Row r of
    each direction is scored by process r % ``world_size``: this call scores those of ``rank`` and leaves ``FILL``
    in the others' (one process: ``rank=0, world_size=1`` scores every row).
    """
    n_img, n_txt = sims.shape
    scores = {"i2t": torch.full((n_img, n_txt), FILL, dtype=torch.float32, device=sims.device),
              "t2i": torch.full((n_txt, n_img), FILL, dtype=torch.float32, device=sims.device)}
    jobs = ([("i2t", row) for row in range(rank, n_img, world_size)]
            + [("t2i", row) for row in range(rank, n_txt, world_size)])
    k = {"i2t": min(k_test, n_txt), "t2i": min(k_test, n_img)}
    reranker = _Reranker(itm_fn, image_embeds, text_ids, text_mask, scores, add_itm)
    pairs_per_call = max(1, batch_size)
    queued = 0
    for direction, row in tqdm(jobs, desc="ITM re-rank", disable=not progress, leave=False):
        row_sims = sims[row] if direction == "i2t" else sims[:, row]
        top_sim, top_index = row_sims.topk(k[direction])
        reranker.pending.append((direction, row, top_index, top_sim.float()))
        queued += len(top_index)
        if queued >= pairs_per_call:
            reranker.flush()
            queued = 0
    reranker.flush()
    return scores["i2t"], scores["t2i"]


@torch.no_grad()
def rerank_rows(itm_fn, row_sims: torch.Tensor, rows: torch.Tensor, direction: str, image_embeds: torch.Tensor,
                text_ids: torch.Tensor, text_mask: torch.Tensor, k_test: int, batch_size: int = ITM_PAIRS_PER_CALL,
                add_itm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory-lean re-rank of some rows: ``row_sims`` (R, C) holds the ITC similarities of rows ``rows`` (R,)
    of ``direction`` ("i2t": image rows, text columns; "t2i": text rows, image columns). Returns the top
    ``min(k_test, C)`` columns of each row (R, k) and their scores (R, k): ITC + ITM positive logit, the values
    ``rerank_scores`` writes there (every other column of the row would be ``FILL``)."""
    k = min(k_test, row_sims.shape[1])
    top_sim, top_index = row_sims.topk(k, dim=1)
    scores = top_sim.float().clone()
    if not add_itm or scores.numel() == 0:
        return top_index, scores
    flat_rows = rows.to(top_index.device).repeat_interleave(k)
    flat_cols = top_index.reshape(-1)
    image_index, text_index = (flat_rows, flat_cols) if direction == "i2t" else (flat_cols, flat_rows)
    itm = []
    step = max(1, batch_size)
    for start in range(0, len(flat_rows), step):
        images, texts = image_index[start : start + step], text_index[start : start + step]
        itm.append(itm_fn(image_embeds[images], text_ids[texts], text_mask[texts])[:, 1].float())
    return top_index, scores + torch.cat(itm).view(-1, k).to(scores.device)


def dense_from_topk(top_index: torch.Tensor, top_scores: torch.Tensor, num_columns: int) -> torch.Tensor:
    """(R, k) columns and scores -> the dense (R, num_columns) score matrix, ``FILL`` where nothing was scored."""
    dense = torch.full((top_index.shape[0], num_columns), FILL, dtype=torch.float32, device=top_scores.device)
    return dense.scatter_(1, top_index.to(dense.device), top_scores.float())
