"""Sharded retrieval evaluation: each process encodes its share, the re-rank keeps only the top-k per row, and the
metrics equal those of one process and of the dense scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip2.engine.metrics import retrieval_metrics
from blip2.engine.retrieval import share_range, topk_ranks, topk_retrieval_metrics, topk_scores
from blip2.models.scoring import dense_from_topk, rerank_scores
from tests.helpers import shapes_data
from tests.test_distributed import free_port

WORKER = str(Path(__file__).with_name("sharded_eval_worker.py"))


def test_two_processes_encode_half_each_and_match_one_process_exactly(tmp_path):
    data = shapes_data(tmp_path / "shapes", num_train=4, num_test=12, captions_per_image=2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    single = subprocess.run([sys.executable, WORKER, str(tmp_path), str(data.root)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                              str(free_port()), WORKER, str(tmp_path), str(data.root)], env=env, capture_output=True,
                             text=True, timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    one = json.loads((tmp_path / "result_1_0.json").read_text())
    ranks = [json.loads((tmp_path / f"result_2_{rank}.json").read_text()) for rank in range(2)]
    assert one["counted"] == one["reported"] == {"images": 12, "texts": 24}
    for result in ranks:
        assert result["world_size"] == 2
        assert result["metrics"] == one["metrics"]  # every metric, exactly
        assert result["counted"] == result["reported"] == {"images": 6, "texts": 12}  # half the encoding each
    assert 0 < one["metrics"]["r_mean"] <= 100


@pytest.mark.parametrize("count, unit, world", [(12, 3, 2), (10, 4, 2), (5, 16, 2), (25, 4, 3), (7, 1, 4)])
def test_shares_cover_every_item_once_in_whole_units(count, unit, world):
    shares = [share_range(count, unit, rank, world) for rank in range(world)]
    assert shares[0][0] == 0 and shares[-1][1] == count
    for (_, end), (start, _) in zip(shares, shares[1:]):
        assert end == start and (start % unit == 0 or start == count)
    units = [-(-(end - start) // unit) for start, end in shares]
    assert max(units) - min(units) <= 1 and units == sorted(units, reverse=True)


def fake_retrieval(num_images: int, num_texts: int, seed: int = 0):
    """Random ITC similarities behind index "features", and an ITM that is a fixed random function of the pair."""
    generator = torch.Generator().manual_seed(seed)
    sims = torch.rand(num_images, num_texts, generator=generator)
    itm_table = torch.randn(num_images, num_texts, generator=generator)
    image_feats = torch.arange(num_images, dtype=torch.float32)[:, None, None]
    text_feats = torch.arange(num_texts, dtype=torch.float32)[:, None]
    image_embeds = torch.arange(num_images, dtype=torch.float32)[:, None, None]
    text_ids = torch.arange(num_texts)[:, None]

    def similarity(images, texts):
        return sims[images[:, 0, 0].long()][:, texts[:, 0].long()]

    def itm_fn(images, ids, masks):
        positive = itm_table[images[:, 0, 0].long(), ids[:, 0]]
        return torch.stack([-positive, positive], dim=1)

    return sims, similarity, itm_fn, image_feats, text_feats, image_embeds, text_ids


@pytest.mark.parametrize("k_test", [10, 16, 60])
def test_topk_path_gives_the_dense_metrics(k_test):
    num_images, num_texts = 20, 50
    sims, similarity, itm_fn, image_feats, text_feats, image_embeds, text_ids = fake_retrieval(num_images, num_texts)
    mask = torch.ones_like(text_ids)
    owners = torch.randint(0, num_images, (num_texts,), generator=torch.Generator().manual_seed(1))
    txt2img = {text: int(image) for text, image in enumerate(owners)}
    img2txt = {image: [t for t, i in txt2img.items() if i == image] for image in range(num_images)}
    img2txt = {image: texts or [image] for image, texts in img2txt.items()}  # every image has a caption
    txt2img.update({texts[0]: image for image, texts in img2txt.items() if len(texts) == 1})
    dense_i2t, dense_t2i = rerank_scores(itm_fn, sims, image_embeds, text_ids, mask, k_test, batch_size=7)
    top = topk_scores(itm_fn, similarity, image_feats, text_feats, image_embeds, text_ids, mask, k_test,
                      rows_per_chunk=6, batch_size=5)
    torch.testing.assert_close(dense_from_topk(*top["i2t"], num_texts), dense_i2t)
    torch.testing.assert_close(dense_from_topk(*top["t2i"], num_images), dense_t2i)
    expected = retrieval_metrics(dense_i2t, dense_t2i, img2txt, txt2img)
    assert topk_retrieval_metrics(top["i2t"], top["t2i"], img2txt, txt2img) == expected
    assert len({round(v, 6) for v in expected.values()}) > 3  # not all 0 or 100: the comparison can fail


def test_topk_ranks_equal_a_stable_sort_of_the_dense_scores():
    generator = torch.Generator().manual_seed(3)
    num_rows, num_columns, k = 30, 40, 3  # k < 10: most targets are outside the top-k, tied at FILL
    scores = torch.rand(num_rows, num_columns, generator=generator).round(decimals=1)  # ties inside the top-k
    top_scores, top_index = scores.topk(k, dim=1)
    dense = dense_from_topk(top_index, top_scores, num_columns)
    rows = torch.arange(num_rows).repeat_interleave(4)
    columns = torch.randint(0, num_columns, (len(rows),), generator=generator)
    columns[::4] = top_index[:, 0]  # some targets inside the top-k
    order = torch.sort(dense, dim=1, descending=True, stable=True).indices
    expected = torch.tensor([(order[r] == c).nonzero()[0, 0].item() for r, c in zip(rows, columns)])
    assert torch.equal(topk_ranks(top_index, top_scores, rows, columns, num_columns), expected)
