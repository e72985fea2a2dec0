"""Image-text retrieval evaluation (LAVIS ``compute_sim_matrix``): ITC similarities for every pair, the top
``k_test`` candidates of each image (and each text) re-ranked by ITM; score = ITM positive logit (mean over queries)
+ ITC cosine, -100 elsewhere. Re-ranking rows are split across processes and summed."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from blip2.engine import distributed

FILL = -100.0


@torch.no_grad()
def rerank_scores(
    itm_fn,
    sims: torch.Tensor,
    image_embeds: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    k_test: int,
    batch_size: int = 128,
    add_itm: bool = True,
    progress: bool = False,
    split_across_ranks: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-ranked (N_img, N_txt) image->text and (N_txt, N_img) text->image scores.

    ``itm_fn(image_embeds (P, N, D), input_ids (P, L), attention_mask (P, L)) -> (P, 2)`` scores pairs;
    ``sims`` (N_img, N_txt) is the ITC similarity. Rows are shared out over processes (row r goes to rank r % W)
    unless ``split_across_ranks`` is False, for a caller that runs in one process only (a pipeline).
    """
    n_img, n_txt = sims.shape
    score_i2t = torch.full((n_img, n_txt), FILL, dtype=torch.float32, device=sims.device)
    score_t2i = torch.full((n_txt, n_img), FILL, dtype=torch.float32, device=sims.device)
    rank, world = (distributed.rank(), distributed.world_size()) if split_across_ranks else (0, 1)
    jobs = [("i2t", row) for row in range(rank, n_img, world)] + [("t2i", row) for row in range(rank, n_txt, world)]
    k_i2t, k_t2i = min(k_test, n_txt), min(k_test, n_img)
    pending: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []
    pairs_per_call = max(1, batch_size)

    def flush() -> None:
        if not pending:
            return
        images, ids, masks = [], [], []
        for direction, row, top_index, _ in pending:
            if direction == "i2t":
                images.append(image_embeds[row : row + 1].expand(len(top_index), -1, -1))
                ids.append(text_ids[top_index])
                masks.append(text_mask[top_index])
            else:
                images.append(image_embeds[top_index])
                ids.append(text_ids[row : row + 1].expand(len(top_index), -1))
                masks.append(text_mask[row : row + 1].expand(len(top_index), -1))
        itm = itm_fn(torch.cat(images), torch.cat(ids), torch.cat(masks))[:, 1].float() if add_itm else None
        offset = 0
        for direction, row, top_index, top_sim in pending:
            score = top_sim + (itm[offset : offset + len(top_index)] if add_itm else 0.0)
            offset += len(top_index)
            target = score_i2t if direction == "i2t" else score_t2i
            target[row, top_index] = score
        pending.clear()

    queued = 0
    for direction, row in tqdm(jobs, desc="ITM re-rank", disable=not progress, leave=False):
        row_sims = sims[row] if direction == "i2t" else sims[:, row]
        top_sim, top_index = row_sims.topk(k_i2t if direction == "i2t" else k_t2i)
        pending.append((direction, row, top_index, top_sim.float()))
        queued += len(top_index)
        if queued >= pairs_per_call:
            flush()
            queued = 0
    flush()
    if world > 1:
        # every row was filled by exactly one rank; elsewhere it holds FILL. Shift, sum, shift back.
        for scores in (score_i2t, score_t2i):
            scores -= FILL
            distributed.all_reduce_sum(scores)
            scores += FILL
    return score_i2t, score_t2i
