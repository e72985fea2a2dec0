"""Stage-1 model: the three losses against an independent computation, gradients, features and captions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blip2 import Blip2Qformer
from blip2.nn.attention import Attention
from blip2.nn.qformer import build_attention_mask
from tests.helpers import text_batch, tiny_config


def smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label-smoothed CE written out: (1 - e) * NLL + e * mean over classes of -log p, averaged over rows."""
    log_probs = logits.log_softmax(-1)
    nll = -log_probs.gather(1, targets[:, None]).squeeze(1)
    uniform = -log_probs.mean(-1)
    return ((1 - smoothing) * nll + smoothing * uniform).mean()


def make_model(seed: int = 0, **overrides) -> Blip2Qformer:
    torch.manual_seed(seed)
    return Blip2Qformer(tiny_config(**overrides)).eval()


def test_losses_equal_an_independent_computation_for_a_batch_of_two():
    model = make_model()
    pixel_values = torch.randn(2, 3, 30, 30)
    input_ids, attention_mask = text_batch(2, 9, lengths=[9, 6])
    out = model(pixel_values, input_ids, attention_mask)

    with torch.no_grad():
        image_feats = model.get_image_features(pixel_values)  # (2, Q, E)
        text_feats = model.get_text_features(input_ids, attention_mask)  # (2, E)
        temp = model.temp
        sim_i2t = torch.stack([
            torch.stack([(image_feats[i] @ text_feats[t]).max() for t in range(2)]) for i in range(2)
        ]) / temp
        sim_t2i = sim_i2t.t()  # one process: text-to-image is the transpose
        targets = torch.arange(2)
        itc = (smoothed_cross_entropy(sim_i2t, targets, 0.1) + smoothed_cross_entropy(sim_t2i, targets, 0.1)) / 2

        # batch of two: the only hard negative of each item is the other one
        image_embeds = model.encode_image(pixel_values)
        swapped = torch.tensor([1, 0])
        ids3 = torch.cat([input_ids, input_ids, input_ids[swapped]])
        mask3 = torch.cat([attention_mask, attention_mask, attention_mask[swapped]])
        images3 = torch.cat([image_embeds, image_embeds[swapped], image_embeds])
        itm_logits = model.itm_logits_from_embeds(images3, ids3, mask3)
        itm = F.cross_entropy(itm_logits, torch.tensor([1, 1, 0, 0, 0, 0]))

        # LM in one pass with the UniLM mask (queries + text together), not through the cached keys/values
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = model.config.qformer_config.bos_token_id
        queries = model.query_tokens.expand(2, -1, -1)
        hidden = model.qformer(query_embeds=queries, input_ids=decoder_ids, attention_mask=attention_mask,
                               image_embeds=image_embeds, causal=True).last_hidden_state
        logits = model.lm_head(hidden[:, queries.shape[1]:], model.qformer.embeddings.word_embeddings.weight)
        keep = attention_mask[:, 1:].bool()
        lm = smoothed_cross_entropy(logits[:, :-1][keep], decoder_ids[:, 1:][keep], 0.1)

    torch.testing.assert_close(out.loss_itc, itc, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss_itm, itm, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss_lm, lm, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, itc + itm + lm, atol=1e-5, rtol=0)
    assert model(pixel_values, input_ids, attention_mask, return_tuple=True)[1].item() == pytest.approx(itc.item(), abs=1e-5)


def test_gradients_reach_every_trainable_part_and_never_the_frozen_vit():
    model = make_model()
    model.train()
    assert not model.vision_model.training, "the frozen ViT must stay in eval mode"
    pixel_values = torch.randn(3, 3, 30, 30)
    input_ids, attention_mask = text_batch(3, 8, lengths=[8, 5, 7])
    model(pixel_values, input_ids, attention_mask).loss.backward()
    for name in ("query_tokens", "temp", "ln_vision.weight", "vision_proj.weight", "text_proj.weight",
                 "itm_head.weight", "lm_head.dense.weight", "qformer.embeddings.word_embeddings.weight",
                 "qformer.layers.0.cross_attn.attn.k_proj.weight", "qformer.layers.2.query_ffn.intermediate.weight",
                 "qformer.layers.1.text_ffn.intermediate.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reached {name}"
    for name, param in model.vision_model.named_parameters():
        assert not param.requires_grad and param.grad is None, f"the frozen ViT got a gradient in {name}"


def test_unfrozen_vit_trains():
    model = make_model(freeze_vision=False).train()
    input_ids, attention_mask = text_batch(2, 6)
    model(torch.randn(2, 3, 30, 30), input_ids, attention_mask).loss.backward()
    assert model.vision_model.blocks[0].attn.qkv.weight.grad is not None


def test_cross_attention_init_std_redraws_only_the_cross_attention_queries_and_keys():
    torch.manual_seed(0)
    config = tiny_config()
    model = Blip2Qformer(config.replace(qformer_config=config.qformer_config.replace(cross_attention_init_std=0.1)))
    stds = {name: p.std().item() for name, p in model.qformer.named_parameters() if name.endswith("proj.weight")}
    redrawn = [name for name in stds if "cross_attn" in name and (".q_proj" in name or ".k_proj" in name)]
    assert len(redrawn) == 2 * len(model.qformer.layers[::2])  # cross-attention every 2nd layer
    for name, std in stds.items():
        assert std == pytest.approx(0.1 if name in redrawn else 0.02, rel=0.15), name


def test_initializer_range_sets_the_qformer_weights_queries_and_lm_head_std():
    torch.manual_seed(0)
    config = tiny_config()
    qformer = config.qformer_config.replace(initializer_range=0.08, cross_attention_init_std=0.3)
    model = Blip2Qformer(config.replace(qformer_config=qformer))
    weights = {f"qformer.{name}": p for name, p in model.qformer.named_parameters() if name.endswith("weight")}
    weights = {name: p for name, p in weights.items() if p.ndim == 2 and "cross_attn.attn.q_proj" not in name
               and "cross_attn.attn.k_proj" not in name}
    weights.update({"query_tokens": model.query_tokens, "lm_head.dense": model.lm_head.dense.weight})
    assert len(weights) > 10
    for name, p in weights.items():
        assert p.std().item() == pytest.approx(0.08, rel=0.2), name
    # the ViT is not the Q-Former's: its own initialisation is untouched
    assert model.vision_model.blocks[0].attn.qkv.weight.std().item() < 0.05


def test_random_vit_positions_are_a_sine_cosine_grid():
    pos_embed = make_model().vision_model.pos_embed[0].detach()  # (1 + 25, D): CLS, then a 5 x 5 grid
    assert torch.equal(pos_embed[0], torch.zeros_like(pos_embed[0]))
    distances = torch.cdist(pos_embed[1:], pos_embed[1:])
    # every patch has its own code, and neighbours are nearer than patches far apart: the table says where a patch is
    assert (distances + torch.eye(25)).min() > 0
    assert distances[0, 1] < distances[0, 4] and distances[0, 5] < distances[0, 20] and distances[0, 6] < distances[0, 24]
    # each sine-cosine pair has norm position_init_amplitude (MAE: 1.0)
    dim = pos_embed.shape[1]
    for amplitude in (0.3, 1.0):
        config = tiny_config()
        model = Blip2Qformer(config.replace(vision_config=config.vision_config.replace(position_init_amplitude=amplitude)))
        norms = model.vision_model.pos_embed[0, 1:].detach().norm(dim=1)
        assert torch.allclose(norms, torch.full((25,), amplitude * (dim // 2) ** 0.5, dtype=norms.dtype)), amplitude


def test_features_have_the_documented_shapes_and_norms():
    model = make_model()
    pixel_values = torch.randn(3, 3, 30, 30)
    input_ids, attention_mask = text_batch(4, 7, lengths=[7, 3, 5, 7])
    with torch.no_grad():
        image_feats = model.get_image_features(pixel_values)
        text_feats = model.get_text_features(input_ids, attention_mask)
        sims = model.itc_similarity(pixel_values, input_ids, attention_mask)
        features = model.extract_features(pixel_values[:1], input_ids[:1], mode="multimodal")
        text_features = model.extract_features(input_ids=input_ids, attention_mask=attention_mask, mode="text")
    assert image_feats.shape == (3, 5, 24) and text_feats.shape == (4, 24)
    torch.testing.assert_close(image_feats.norm(dim=-1), torch.ones(3, 5))
    torch.testing.assert_close(text_feats.norm(dim=-1), torch.ones(4))
    assert sims.shape == (3, 4) and sims.abs().max() <= 1 + 1e-6
    assert features.multimodal_embeds.shape == (1, 5, 32)
    torch.testing.assert_close(text_features.text_embeds_proj[:, 0], text_feats)
    with pytest.raises(ValueError, match="pairs"):
        model.itm_logits(pixel_values, input_ids)
    with pytest.raises(ValueError, match="mode"):
        model.extract_features(pixel_values, mode="both")


def test_padding_does_not_change_a_caption_s_features():
    model = make_model()
    input_ids, attention_mask = text_batch(1, 6)
    padded_ids = torch.cat([input_ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([attention_mask, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model.get_text_features(input_ids, attention_mask),
                                   model.get_text_features(padded_ids, padded_mask), atol=1e-6, rtol=0)
        image = torch.randn(1, 3, 30, 30)
        torch.testing.assert_close(model.itm_logits(image, input_ids, attention_mask),
                                   model.itm_logits(image, padded_ids, padded_mask), atol=1e-5, rtol=0)


def eager_attention(query, key, value, mask):
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ value


def test_attention_matches_an_eager_reference_with_cache_and_masks():
    torch.manual_seed(0)
    attention = Attention(32, 4, kv_size=20).eval()
    hidden, image = torch.randn(2, 7, 32), torch.randn(2, 9, 20)
    out, _ = attention(hidden, kv_states=image)
    heads = lambda t: t.view(2, -1, 4, 8).transpose(1, 2)
    expected = eager_attention(heads(attention.q_proj(hidden)), heads(attention.k_proj(image)),
                               heads(attention.v_proj(image)), None)
    torch.testing.assert_close(out, attention.out_proj(expected.transpose(1, 2).reshape(2, 7, 32)))

    self_attention = Attention(32, 4, fused_qkv=True).eval()
    torch.nn.init.normal_(self_attention.q_bias)
    torch.nn.init.normal_(self_attention.v_bias)
    mask = build_attention_mask(2, 3, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), 0, True, hidden.device)
    out, present = self_attention(hidden, attn_mask=mask, return_key_value=True)
    q, k, v = (self_attention.qkv(hidden) + torch.cat([self_attention.q_bias, torch.zeros(32),
                                                       self_attention.v_bias])).chunk(3, -1)
    expected = eager_attention(heads(q), heads(k), heads(v), mask)
    torch.testing.assert_close(out, self_attention.out_proj(expected.transpose(1, 2).reshape(2, 7, 32)))
    assert present[0].shape == (2, 4, 7, 8)


def test_causal_mask_lets_queries_see_only_queries_and_text_see_the_past():
    mask = build_attention_mask(1, 2, torch.tensor([[1, 1, 0]]), 0, True, torch.device("cpu"))[0, 0].int()
    expected = torch.tensor([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
    ])
    assert torch.equal(mask, expected)
    assert build_attention_mask(2, 3, torch.ones(2, 4), 0, False, torch.device("cpu")) is None


def test_cached_decoding_equals_the_full_pass():
    """The LM pass through the query cache and one token at a time gives the same logits as one UniLM pass."""
    model = make_model()
    pixel_values = torch.randn(2, 3, 30, 30)
    input_ids, _ = text_batch(2, 6)
    input_ids[:, 0] = model.config.qformer_config.bos_token_id
    with torch.no_grad():
        image_embeds = model.encode_image(pixel_values)
        cache = model.query_forward(image_embeds, use_cache=True).past_key_values
        step_hidden = []
        for position in range(6):
            out = model.qformer(input_ids=input_ids[:, position:position + 1], past_key_values=cache, causal=True,
                                use_cache=True, position_offset=position)
            cache = out.past_key_values
            step_hidden.append(out.last_hidden_state)
        queries = model.query_tokens.expand(2, -1, -1)
        full = model.qformer(query_embeds=queries, input_ids=input_ids, image_embeds=image_embeds,
                             causal=True).last_hidden_state[:, 5:]
    torch.testing.assert_close(torch.cat(step_hidden, 1), full, atol=1e-5, rtol=0)


def test_generate_greedy_equals_step_by_step_argmax_and_beams_are_sorted():
    model = make_model()
    pixel_values = torch.randn(2, 3, 30, 30)
    qcfg = model.config.qformer_config
    greedy = model.generate(pixel_values, num_beams=1, max_length=8, min_length=8)
    assert greedy.shape == (2, 8) and torch.all(greedy[:, 0] == qcfg.bos_token_id)
    with torch.no_grad():  # recompute greedy without the cache: one full UniLM pass per step
        image_embeds = model.encode_image(pixel_values)
        queries = model.query_tokens.expand(2, -1, -1)
        ids = greedy[:, :1]
        for _ in range(7):
            hidden = model.qformer(query_embeds=queries, input_ids=ids, image_embeds=image_embeds,
                                   causal=True).last_hidden_state
            logits = model.lm_head(hidden[:, -1], model.qformer.embeddings.word_embeddings.weight)
            logits[:, qcfg.sep_token_id] = float("-inf")  # min_length blocks the end token
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, ids)
    beams = model.generate(pixel_values, num_beams=3, max_length=8, min_length=3, num_captions=2)
    assert beams.shape[0] == 4 and torch.all(beams[:, 0] == qcfg.bos_token_id)
    sampled = model.generate(pixel_values, do_sample=True, top_p=0.9, max_length=6, min_length=2, num_captions=3)
    assert sampled.shape[0] == 6
