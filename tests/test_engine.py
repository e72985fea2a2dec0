"""Engine: retrieval metrics and re-ranking, resume, schedule, weight-decay groups, bad losses, skipped images."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from blip2 import Blip2Qformer
from blip2.engine.checkpoint import latest_checkpoint
from blip2.engine.metrics import retrieval_metrics, topk_accuracy
from blip2.engine.optim import parameter_groups, warmup_cosine_lr
from blip2.engine.retrieval import rerank_scores
from blip2.engine.trainer import NonFiniteLossError, Trainer
from tests.helpers import run_config, shapes_data, text_batch, tiny_config


def brute_force_recall(score_i2t, score_t2i, img2txt, txt2img):
    """Count, for each query, how many items score strictly higher than its best ground truth."""
    out = {}
    for k in (1, 5, 10):
        image_hits = [sum(score_i2t[i] > max(score_i2t[i][t] for t in texts)) < k for i, texts in img2txt.items()]
        text_hits = [sum(score_t2i[t] > score_t2i[t][i]) < k for t, i in txt2img.items()]
        out[f"txt_r{k}"] = 100 * np.mean(image_hits)
        out[f"img_r{k}"] = 100 * np.mean(text_hits)
    return out


def test_retrieval_metrics_equal_a_brute_force_count():
    rng = np.random.default_rng(0)
    n_img, caps = 12, 3
    img2txt = {i: [i * caps + c for c in range(caps)] for i in range(n_img)}
    txt2img = {t: i for i, texts in img2txt.items() for t in texts}
    score_i2t = rng.normal(size=(n_img, n_img * caps))
    for i, texts in img2txt.items():  # make some ground truths rank first, others middling
        score_i2t[i, texts[i % caps]] += 3.0 * (i % 3)
    score_t2i = rng.normal(size=(n_img * caps, n_img)) + 0.5 * score_i2t.T
    metrics = retrieval_metrics(score_i2t, score_t2i, img2txt, txt2img)
    expected = brute_force_recall(score_i2t, score_t2i, img2txt, txt2img)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    assert metrics["txt_r_mean"] == pytest.approx((expected["txt_r1"] + expected["txt_r5"] + expected["txt_r10"]) / 3)
    assert metrics["r_mean"] == pytest.approx((metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2)
    assert metrics["agg_metrics"] == metrics["txt_r_mean"]


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    result = topk_accuracy(logits, torch.tensor([1, 2, 1]), ks=(1, 2))
    assert result["top1"] == pytest.approx(100 / 3) and result["top2"] == pytest.approx(200 / 3)


def test_rerank_with_k_at_least_n_is_itm_plus_itc_for_every_pair():
    torch.manual_seed(0)
    model = Blip2Qformer(tiny_config()).eval()
    pixel_values = torch.randn(4, 3, 30, 30)
    input_ids, attention_mask = text_batch(6, 7, lengths=[7, 4, 5, 7, 6, 3])
    with torch.no_grad():
        image_embeds = model.encode_image(pixel_values)
        sims = model.itc_similarity(pixel_values, input_ids, attention_mask)
        score_i2t, score_t2i = rerank_scores(model.itm_logits_from_embeds, sims, image_embeds, input_ids,
                                             attention_mask, k_test=10, batch_size=5)
        expected = torch.zeros(4, 6)
        for i in range(4):
            for t in range(6):
                itm = model.itm_logits(pixel_values[i:i + 1], input_ids[t:t + 1], attention_mask[t:t + 1])[0, 1]
                expected[i, t] = itm + sims[i, t]
    torch.testing.assert_close(score_i2t, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(score_t2i, expected.t(), atol=1e-5, rtol=0)
    # with k < N, only the top-k ITC candidates get a score; the rest keep the -100 fill
    score_i2t, _ = rerank_scores(model.itm_logits_from_embeds, sims, image_embeds, input_ids, attention_mask, k_test=2)
    assert torch.equal((score_i2t > -100).sum(1), torch.full((4,), 2))
    top2 = sims.topk(2, dim=1).indices
    assert torch.equal((score_i2t > -100).nonzero()[:, 1].view(4, 2).sort(1).values, top2.sort(1).values)


def test_schedule_warms_up_linearly_then_follows_a_cosine():
    args = dict(learning_rate=1e-3, lr_end=1e-5, warmup_lr_init=1e-6, warmup_steps=10, total_steps=110)
    assert warmup_cosine_lr(0, **args) == pytest.approx(1e-6)
    assert warmup_cosine_lr(5, **args) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert warmup_cosine_lr(10, **args) == pytest.approx(1e-3)
    assert warmup_cosine_lr(60, **args) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 2)))
    assert warmup_cosine_lr(110, **args) == pytest.approx(1e-5)


def test_weight_decay_spares_biases_norms_and_one_dimensional_parameters():
    model = Blip2Qformer(tiny_config())
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert "temp" in spared and "ln_vision.weight" in spared and "vision_proj.bias" in spared
    assert "vision_proj.weight" in decayed and "query_tokens" in decayed
    assert not any(name.startswith("vision_model.") for name in decayed | spared), "frozen ViT is not optimized"
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def _train(data_root, output_dir, max_steps, resume=False, num_workers=0):
    torch.manual_seed(0)
    model = Blip2Qformer.from_pretrained("blip2_tiny")
    config = run_config(data_root, output_dir, max_steps=max_steps, batch_size=8, num_workers=num_workers,
                        save_steps=3)
    config["lr_schedule"]["total_steps"] = 12
    config["model"] = None
    trainer = Trainer(task="contrastive_language_image_pretrain", model=model, config=config)
    trainer.train(resume=resume)
    return trainer


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    data = shapes_data(tmp_path / "shapes", num_train=20, num_test=4)  # 40 pairs: 5 batches per epoch
    straight = _train(data.root, tmp_path / "straight", 12, num_workers=1)
    _train(data.root, tmp_path / "split", 6, num_workers=1)  # stops mid-epoch 1
    assert latest_checkpoint(tmp_path / "split").name == "step_00000006"
    resumed = _train(data.root, tmp_path / "split", 12, resume=True, num_workers=1)
    assert resumed.global_step == 12
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=f"{name} differs after resume")
    assert (tmp_path / "split" / "model" / "model.safetensors").is_file()
    reloaded = Blip2Qformer.from_pretrained(tmp_path / "split" / "model")
    torch.testing.assert_close(reloaded.temp, resumed.model.temp)


def test_non_finite_loss_stops_before_the_optimizer_step_and_names_the_parts(tmp_path):
    data = shapes_data(tmp_path / "shapes", num_train=8, num_test=4)
    model = Blip2Qformer.from_pretrained("blip2_tiny")
    with torch.no_grad():
        model.temp.fill_(float("nan"))
    trainer = Trainer(task="contrastive_language_image_pretrain", model=model,
                      config=run_config(data.root, tmp_path / "run", max_steps=2))
    before = model.query_tokens.detach().clone()
    with pytest.raises(NonFiniteLossError, match=r"step 1: .*loss_itc=nan"):
        trainer.train()
    assert torch.equal(before, model.query_tokens.detach())


def test_a_corrupt_training_image_is_skipped_and_counted_in_the_log(tmp_path):
    data = shapes_data(tmp_path / "shapes", num_train=16, num_test=4)
    (data.root / "images" / "train" / "00003.png").write_bytes(b"not a png")
    model = Blip2Qformer.from_pretrained("blip2_tiny")
    Trainer(task="contrastive_language_image_pretrain", model=model,
            config=run_config(data.root, tmp_path / "run", max_steps=8, batch_size=8)).train()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped_images"] >= 2  # its two captions, each seen at least once in 8 steps of 4 epochs


def test_unknown_task_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown task 'captioning'.*zero_shot_image_classification"):
        Trainer(task="captioning", model=Blip2Qformer(tiny_config()))
