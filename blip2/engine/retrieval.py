"""Image-text retrieval evaluation across processes: ``blip2.models.scoring.rerank_scores`` scores this process's
rows (LAVIS ``compute_sim_matrix``: ITC top ``k_test`` re-ranked by ITM); the processes' rows are then summed."""

from __future__ import annotations

import torch

from blip2.engine import distributed
from blip2.models import scoring
from blip2.models.scoring import FILL, ITM_PAIRS_PER_CALL


@torch.no_grad()
def rerank_scores(itm_fn, sims: torch.Tensor, image_embeds: torch.Tensor, text_ids: torch.Tensor,
                  text_mask: torch.Tensor, k_test: int, batch_size: int = ITM_PAIRS_PER_CALL, add_itm: bool = True,
                  progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-ranked (N_img, N_txt) image->text and (N_txt, N_img) text->image scores, every row filled: rows are shared
    out over the processes (row r goes to rank r % W) and combined here (see ``scoring.rerank_scores``)."""
    world = distributed.world_size()
    score_i2t, score_t2i = scoring.rerank_scores(itm_fn, sims, image_embeds, text_ids, text_mask, k_test,
                                                 batch_size=batch_size, add_itm=add_itm, progress=progress,
                                                 rank=distributed.rank(), world_size=world)
    if world > 1:
        # every row was filled by exactly one rank; elsewhere it holds FILL. Shift, sum, shift back.
        for scores in (score_i2t, score_t2i):
            scores -= FILL
            distributed.all_reduce_sum(scores)
            scores += FILL
    return score_i2t, score_t2i
