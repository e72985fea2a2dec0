"""Retrieval fine-tuning (``image_text_retrieval_finetune``): pairs of one image are positives of each other in ITC
and are never ITM hard negatives; a trainable ViT learns at a lower, layer-wise decayed rate."""

from __future__ import annotations

import copy

import pytest
import torch

from blip2 import Blip2Qformer
from blip2.data import MultiImgCapDataLoader
from blip2.engine.optim import WarmupCosineSchedule, build_optimizer
from blip2.engine.run_config import RunConfig
from blip2.engine.trainer import Trainer
from blip2.models.gather import LOCAL
from tests.helpers import run_config, shapes_data, text_batch, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoProcessGather:
    """Rank 0 of two: the other process's features are ``other`` (what a real all_gather would concatenate)."""

    rank, world_size = 0, 2

    def __init__(self, others: dict[str, torch.Tensor]) -> None:
        self.others = others

    def _other(self, tensor: torch.Tensor) -> torch.Tensor:
        for other in self.others.values():
            if other.shape[1:] == tensor.shape[1:] and other.dtype == tensor.dtype:
                return other
        raise AssertionError(f"no stand-in for a tensor of shape {tuple(tensor.shape)}")

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat((tensor.detach(), self._other(tensor)))

    def all_gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat((tensor, self._other(tensor)))


def leaf_features(seed: int = 0, batch: int = 4, queries: int = 3, dim: int = 8):
    generator = torch.Generator().manual_seed(seed)
    image_feats = torch.nn.functional.normalize(torch.randn(batch, queries, dim, generator=generator), dim=-1)
    text_feat = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    return image_feats, text_feat


def pull_on_second_caption(model: Blip2Qformer, image_ids: torch.Tensor | None) -> float:
    """How the ITC loss changes when caption 1 moves toward image 0 (the directional derivative): negative when
    the loss pulls them together, positive when it pushes them apart. Images are orthogonal unit vectors, each
    caption at its own image, so no other term of the loss depends on that direction. Caption 1 already leans
    toward image 0 (a confusable negative: more probable than label smoothing's floor)."""
    image_feats = torch.eye(4, 8).unsqueeze(1)  # (B, Q=1, E)
    text_feat = torch.eye(4, 8)
    text_feat[1, 0] = 0.8
    text_feat = torch.nn.functional.normalize(text_feat, dim=-1).requires_grad_()
    positive = model._positive_mask(4, LOCAL, image_ids, image_feats.device)
    loss, _, _ = model._itc(image_feats, text_feat, LOCAL, positive if image_ids is not None else None)
    (grad,) = torch.autograd.grad(loss, text_feat)
    return float(grad[1] @ image_feats[0, 0])


def test_two_captions_of_one_image_are_pulled_together_not_apart(config):
    model = Blip2Qformer(config)
    assert pull_on_second_caption(model, torch.tensor([7, 7, 8, 9])) < 0  # pairs 0 and 1 show one image
    assert pull_on_second_caption(model, None) > 0  # pretraining: caption 1 is a negative of image 0


def test_itc_targets_share_mass_between_same_image_pairs(config):
    model = Blip2Qformer(config)
    image_feats, text_feat = leaf_features()
    image_ids = torch.tensor([3, 3, 5, 6])
    positive = model._positive_mask(4, LOCAL, image_ids, image_feats.device)
    loss, sim_i2t, sim_t2i = model._itc(image_feats, text_feat, LOCAL, positive)
    smoothing, columns = 0.1, 4
    targets = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    targets = (1 - smoothing) * targets + smoothing / columns  # LAVIS: 0.9 * targets + 0.1 / columns
    expected = -((sim_i2t.log_softmax(1) * targets).sum(1).mean() + (sim_t2i.log_softmax(1) * targets).sum(1).mean())
    torch.testing.assert_close(loss, expected / 2)


def test_positive_mask_spans_processes():
    ids = torch.tensor([1, 2])
    gather = TwoProcessGather({"ids": torch.tensor([2, 4])})
    mask = Blip2Qformer._positive_mask(2, gather, ids, torch.device("cpu"))
    assert mask.tolist() == [[True, False, False, False], [False, True, True, False]]
    diagonal = Blip2Qformer._positive_mask(2, gather, None, torch.device("cpu"))
    assert diagonal.tolist() == [[True, False, False, False], [False, True, False, False]]


def test_itm_never_draws_a_same_image_negative(config, monkeypatch):
    torch.manual_seed(0)
    model = Blip2Qformer(config)
    image_ids = torch.tensor([0, 0, 0, 1, 1, 2])
    drawn = []
    original = model._hard_negative_index

    def spy(sim, positive):
        # the same-image columns get the highest similarity: an unmasked draw would pick them nearly always
        index = original(sim + 50.0 * positive.float(), positive)
        drawn.append(index)
        return index

    monkeypatch.setattr(model, "_hard_negative_index", spy)
    pixel_values = torch.randn(6, 3, 30, 30)
    input_ids, attention_mask = text_batch(6, 9, lengths=[9, 7, 5, 9, 6, 8])
    for _ in range(20):
        model(pixel_values, input_ids, attention_mask, image_ids=image_ids)
    assert len(drawn) == 40
    for index in drawn:
        assert (image_ids[index] != image_ids).all(), (index.tolist(), image_ids.tolist())


def test_itm_leaves_out_pairs_with_no_other_image(config):
    """Every pair of one image: no negative can be drawn, so ITM sees the B positives only (LAVIS would draw a
    positive as a 'negative')."""
    torch.manual_seed(0)
    model = Blip2Qformer(config)
    calls = []
    original = model._itm_logits
    model._itm_logits = lambda images, ids, mask: calls.append(ids.shape[0]) or original(images, ids, mask)
    input_ids, attention_mask = text_batch(3, 8)
    output = model(torch.randn(3, 3, 30, 30), input_ids, attention_mask, image_ids=torch.tensor([4, 4, 4]))
    assert calls == [3] and torch.isfinite(output.loss)
    calls.clear()
    model(torch.randn(3, 3, 30, 30), input_ids, attention_mask, image_ids=torch.tensor([4, 4, 5]))
    assert calls == [9]


def test_image_ids_cross_processes_in_the_loss(config):
    """With two processes, a caption on the other process of the same image is a positive: the loss differs from
    the same batch whose ids all differ, and no negative is drawn from it."""
    torch.manual_seed(0)
    model = Blip2Qformer(config)
    pixel_values = torch.randn(2, 3, 30, 30)
    input_ids, attention_mask = text_batch(2, 8)
    other_ids, other_mask = text_batch(2, 8, seed=1)
    others = {"feats": torch.nn.functional.normalize(torch.randn(2, config.qformer_config.query_length,
                                                                 config.embed_dim), dim=-1),
              "text": torch.nn.functional.normalize(torch.randn(2, config.embed_dim), dim=-1),
              "ids": other_ids, "embeds": torch.randn(2, 26, config.vision_config.hidden_size)}
    gather = TwoProcessGather(others)
    gather.others["image_ids"] = torch.tensor([1, 9])  # the other process's first pair shows this one's image 1
    shared = model(pixel_values, input_ids, attention_mask, gather=gather, image_ids=torch.tensor([0, 1]))
    gather.others["image_ids"] = torch.tensor([8, 9])
    torch.manual_seed(1)
    apart = model(pixel_values, input_ids, attention_mask, gather=gather, image_ids=torch.tensor([0, 1]))
    assert not torch.isclose(shared.loss_itc, apart.loss_itc)


def test_captions_of_one_image_share_an_id(tmp_path):
    data = shapes_data(tmp_path / "shapes", num_train=6, num_test=2, captions_per_image=3)
    dataset = MultiImgCapDataLoader(data.root, ["annotations/train.json"], ["images"])
    assert len(dataset) == 18
    by_path = {}
    for path, image_id in zip(dataset.image_paths, dataset.image_ids):
        by_path.setdefault(path, set()).add(image_id)
    assert all(len(ids) == 1 for ids in by_path.values()) and len(set(dataset.image_ids)) == 6
    assert dataset[4]["image_id"] == dataset.image_ids[4]


def test_layer_decay_scales_the_vit_learning_rates():
    model = Blip2Qformer(tiny_config(freeze_vision=False))  # 2 ViT blocks
    optimizer = build_optimizer(model, 1e-3, 0.05, vision_lr_scale=0.5, layer_decay=0.8)
    schedule = WarmupCosineSchedule(optimizer, 1e-3, 1e-3, 1e-3, 0, 10)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    expected = {"vision_model.pos_embed": 0.5 * 0.8 ** 3, "vision_model.blocks.0.mlp.fc1.weight": 0.5 * 0.8 ** 2,
                "vision_model.blocks.1.mlp.fc1.weight": 0.5 * 0.8, "ln_vision.weight": 1.0,
                "qformer.layers.0.self_attn.attn.q_proj.weight": 1.0, "temp": 1.0}
    for name, scale in expected.items():
        assert lr_of[id(named[name])] == pytest.approx(1e-3 * scale), name
    assert schedule.get_last_lr() == pytest.approx(1e-3)
    frozen = build_optimizer(Blip2Qformer(tiny_config()), 1e-3, 0.05, vision_lr_scale=0.5, layer_decay=0.8)
    assert {group["lr_scale"] for group in frozen.param_groups} == {1.0}  # a frozen ViT has nothing to scale


def test_gradient_checkpointing_gives_the_same_gradients(config):
    torch.manual_seed(0)
    plain = Blip2Qformer(tiny_config(freeze_vision=False)).train()
    checkpointed_config = copy.deepcopy(plain.config)
    checkpointed_config.vision_config.use_grad_checkpoint = True
    checkpointed = Blip2Qformer(checkpointed_config).train()
    checkpointed.load_state_dict(plain.state_dict())
    pixel_values = torch.randn(4, 3, 30, 30)
    input_ids, attention_mask = text_batch(4, 8)
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        model(pixel_values, input_ids, attention_mask, image_ids=torch.tensor([0, 0, 1, 2])).loss.backward()
        grads.append(model.vision_model.blocks[0].mlp.fc1.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_finetune_config_trains_the_vit_and_refuses_bad_decay(tmp_path):
    from blip2.config import ConfigError
    from blip2.resources import config_file

    tiny = RunConfig.from_yaml(config_file("run_blip2_tiny_retrieval_finetune.yaml"))
    assert tiny.trainer.type == "image_text_retrieval_finetune" and tiny.optimizer.layer_decay < 1
    coco = RunConfig.from_yaml(config_file("run_blip2_stage1_vit_g_retrieval_coco_finetune.yaml"))
    assert coco.model.model_config.freeze_vision is False and coco.optimizer.layer_decay == 0.95
    assert coco.model.model_config.vision_config.use_grad_checkpoint is True
    assert coco.model.model_config.vision_config.image_size == 364
    with pytest.raises(ConfigError, match="optimizer.layer_decay"):
        RunConfig.from_dict({**tiny.to_dict(), "optimizer": {"layer_decay": 1.5}})


def test_finetuning_trains_the_vit_from_a_stage1_start(tmp_path):
    """The run YAML's path: a stage-1 folder as model_config.checkpoint_name_or_path, the YAML's config (trainable
    ViT) kept; the ViT's weights move and the loss is finite."""
    data = shapes_data(tmp_path / "shapes", num_train=16, num_test=4, captions_per_image=2)
    torch.manual_seed(0)
    start = Blip2Qformer.from_pretrained("blip2_tiny")
    start.save_pretrained(tmp_path / "start")
    config = run_config(data.root, tmp_path / "run", max_steps=3, batch_size=8)
    unfrozen = {**start.config.to_dict(), "freeze_vision": False}
    config["model"] = {"model_config": {**unfrozen, "checkpoint_name_or_path": str(tmp_path / "start")}}
    config["optimizer"] = {"vision_lr_scale": 0.5, "layer_decay": 0.9}
    config.pop("eval_dataset")
    trainer = Trainer(task="image_text_retrieval_finetune", config=config)
    before = trainer.model.vision_model.blocks[0].mlp.fc1.weight.detach().clone()
    trainer.train()
    after = trainer.model.vision_model.blocks[0].mlp.fc1.weight.detach()
    assert not torch.equal(before, after)
