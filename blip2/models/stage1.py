"""Stage 1: the Q-Former learns from a frozen image encoder with three losses (ITC, ITM with hard negatives, LM).

Reading order follows the paper: image path, text path, then ``_itc``, ``_itm``, ``_lm`` and a ``forward`` that
calls the three. Inference entry points (features, similarities, ITM logits, captions) come last.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blip2.config import Blip2Config
from blip2.models import generation
from blip2.models.base import Blip2PreTrainedModel, init_bert_weights, init_qformer_weights
from blip2.models.gather import LOCAL, FeatureGather
from blip2.models.outputs import Blip2FeatureOutput, Blip2Output
from blip2.nn.qformer import QformerLMHead

LABEL_SMOOTHING = 0.1
EXCLUDED_LOGIT = -10000.0  # a logit whose softmax weight is 0: the positive is never drawn as a hard negative (LAVIS)


class Blip2Qformer(Blip2PreTrainedModel):
    """BLIP-2 stage 1: EVA ViT (frozen) + ln_vision + Q-Former with ITC, ITM and LM heads."""

    preset_group = "stage1"

    def __init__(self, config: Blip2Config) -> None:
        super().__init__(config)
        qformer = config.qformer_config
        self.build_image_path(with_text=True)
        self.lm_head = QformerLMHead(qformer)
        init_qformer_weights(self.qformer, qformer)
        init_bert_weights(self.lm_head, std=qformer.initializer_range)
        nn.init.normal_(self.query_tokens, std=qformer.initializer_range)
        # the projections and the ITM head keep nn.Linear's default initialisation, as in LAVIS
        self.vision_proj = nn.Linear(qformer.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(qformer.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(qformer.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        if config.freeze_vision:
            self.apply_freezing()

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vision_model] if self.config.freeze_vision else []

    # --- image path: encode_image and query_forward come from Blip2PreTrainedModel --------------------------------
    def image_feats(self, query_hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(query_hidden), dim=-1)  # (B, Q, E)

    # --- text path -----------------------------------------------------------------------------------------------
    def text_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Text alone, bidirectional: (B, L) -> (B, L, D)."""
        return self.qformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def text_feat(self, text_hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_hidden[:, 0]), dim=-1)  # (B, E), the [CLS] token

    # --- losses --------------------------------------------------------------------------------------------------
    @staticmethod
    def _positive_mask(batch: int, gather: FeatureGather, image_ids: torch.Tensor | None,
                       device: torch.device) -> torch.Tensor:
        """(B, B*W) True where local pair b and gathered pair j show the same image: the diagonal of this process's
        block, or, given ``image_ids`` (retrieval fine-tuning: several captions per image), every equal id."""
        if image_ids is None:
            positive = torch.zeros(batch, batch * gather.world_size, dtype=torch.bool, device=device)
            positive[:, gather.rank * batch : (gather.rank + 1) * batch].fill_diagonal_(True)
            return positive
        image_ids = image_ids.to(device).view(-1)
        return image_ids[:, None] == gather.all_gather(image_ids)[None, :]

    def _itc(self, image_feats: torch.Tensor, text_feat: torch.Tensor, gather: FeatureGather,
             positive: torch.Tensor | None = None):
        """Contrastive loss over the (gathered) batch; returns the loss and both similarity matrices / temp.

        ``positive`` (B, B*W), when given, spreads each row's target evenly over its positives (LAVIS' image_id
        branch: captions of one image are not pushed apart); without it the target is the pair itself."""
        image_feats_all = gather.all_gather(image_feats)  # (B*W, Q, E), no gradient
        text_feat_all = gather.all_gather(text_feat)  # (B*W, E)
        image_feats, text_feat = image_feats.float(), text_feat.float()
        temp = self.temp.float()
        sim_i2t = torch.einsum("bqe,te->btq", image_feats, text_feat_all.float()).amax(-1) / temp  # (B, B*W)
        sim_t2i = torch.einsum("be,tqe->btq", text_feat, image_feats_all.float()).amax(-1) / temp  # (B, B*W)
        batch = image_feats.shape[0]
        if positive is None:
            targets = torch.arange(batch, device=image_feats.device) + gather.rank * batch
        else:
            targets = positive.float() / positive.sum(1, keepdim=True)  # soft targets over same-image columns
        loss = (
            F.cross_entropy(sim_i2t, targets, label_smoothing=LABEL_SMOOTHING)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=LABEL_SMOOTHING)
        ) / 2
        return loss, sim_i2t, sim_t2i

    @torch.no_grad()
    def _hard_negative_index(self, sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """One index per row, drawn from softmax(sim) with each row's positives excluded; one batched draw. A row
        with no negative at all draws anything: the caller leaves it out (``positive.all(1)``)."""
        weights = torch.nan_to_num(sim.float(), nan=0.0, posinf=-EXCLUDED_LOGIT, neginf=EXCLUDED_LOGIT)
        weights = weights.masked_fill(positive, EXCLUDED_LOGIT)
        return torch.multinomial(weights.softmax(dim=1), 1).squeeze(1)  # (B,)

    def _itm(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        sim_i2t: torch.Tensor,
        sim_t2i: torch.Tensor,
        gather: FeatureGather,
        positive: torch.Tensor,
    ) -> torch.Tensor:
        """Image-text matching on B positives, B negative images and B negative texts (batch of 3B). Negatives
        are never drawn from ``positive`` (B, B*W); a pair whose gathered batch holds no other image gets no
        negatives (3B - 2 rows for each such pair)."""
        text_ids_all = gather.all_gather(input_ids)  # (B*W, L)
        text_mask_all = gather.all_gather(attention_mask)
        image_embeds_all = gather.all_gather_with_grad(image_embeds)  # (B*W, N, D_img)
        if text_ids_all.shape[1] > input_ids.shape[1]:  # other processes padded their captions longer
            padding = (0, text_ids_all.shape[1] - input_ids.shape[1])
            input_ids, attention_mask = F.pad(input_ids, padding), F.pad(attention_mask, padding)
        negative_image = self._hard_negative_index(sim_t2i, positive)  # for each text
        negative_text = self._hard_negative_index(sim_i2t, positive)  # for each image
        has_negative = ~positive.all(dim=1)
        if not bool(has_negative.all()):
            negative_image, negative_text = negative_image[has_negative], negative_text[has_negative]
        itm_ids = torch.cat((input_ids, input_ids[has_negative], text_ids_all[negative_text]), dim=0)  # (B + 2V, L)
        itm_mask = torch.cat((attention_mask, attention_mask[has_negative], text_mask_all[negative_text]), dim=0)
        itm_images = torch.cat((image_embeds, image_embeds_all[negative_image], image_embeds[has_negative]), dim=0)
        logits = self._itm_logits(itm_images, itm_ids, itm_mask)  # (B + 2V, 2)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        labels[: input_ids.shape[0]] = 1
        return F.cross_entropy(logits.float(), labels)

    def _lm(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_cache) -> torch.Tensor:
        """Image-grounded captioning: [DEC] replaces [CLS]; causal text that sees every query (cached K/V)."""
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = self.config.qformer_config.bos_token_id
        hidden = self.qformer(
            input_ids=decoder_ids, attention_mask=attention_mask, past_key_values=query_cache, causal=True
        ).last_hidden_state
        # position t predicts token t + 1; only real (non-padding) targets reach the vocabulary projection
        keep = attention_mask[:, 1:].bool()
        logits = self.lm_head(hidden[:, :-1][keep], self.qformer.embeddings.word_embeddings.weight)  # (T, V)
        return F.cross_entropy(logits.float(), decoder_ids[:, 1:][keep], label_smoothing=LABEL_SMOOTHING)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_tuple: bool = False,
        gather: FeatureGather | None = None,
        interpolate_pos_encoding: bool = False,
        image_ids: torch.Tensor | None = None,
    ) -> Blip2Output | tuple[torch.Tensor, ...]:
        """Stage-1 losses for a batch of image-caption pairs: (loss, loss_itc, loss_itm, loss_lm).

        ``image_ids`` (B,) (retrieval fine-tuning, LAVIS' image_id branch): pairs with equal ids, across processes
        too, are all positives of each other: ITC spreads its target over them and ITM never draws them as hard
        negatives. Without it each pair is its own only positive (pretraining).
        Images of another size than ``vision_config.image_size`` need ``interpolate_pos_encoding=True`` (as in every
        method that takes ``pixel_values``)."""
        gather = gather or LOCAL
        if attention_mask is None:
            attention_mask = (input_ids != self.config.qformer_config.pad_token_id).long()
        image_embeds = self.encode_image(pixel_values, interpolate_pos_encoding)  # (B, N, D_img)
        query_out = self.query_forward(image_embeds, use_cache=True)
        image_feats = self.image_feats(query_out.last_hidden_state)  # (B, Q, E)
        text_feat = self.text_feat(self.text_forward(input_ids, attention_mask))  # (B, E)
        positive = self._positive_mask(input_ids.shape[0], gather, image_ids, image_feats.device)
        loss_itc, sim_i2t, sim_t2i = self._itc(image_feats, text_feat, gather,
                                               positive if image_ids is not None else None)
        loss_itm = self._itm(image_embeds, input_ids, attention_mask, sim_i2t, sim_t2i, gather, positive)
        loss_lm = self._lm(input_ids, attention_mask, query_out.past_key_values)
        output = Blip2Output(loss_itc + loss_itm + loss_lm, loss_itc, loss_itm, loss_lm)
        return output.to_tuple() if return_tuple else output

    # --- inference -----------------------------------------------------------------------------------------------
    def _itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Joint bidirectional pass of queries + text reading ``image_embeds``; ITM head averaged over queries."""
        query_tokens = self.query_tokens.expand(input_ids.shape[0], -1, -1)
        hidden = self.qformer(
            query_embeds=query_tokens, input_ids=input_ids, attention_mask=attention_mask, image_embeds=image_embeds
        ).last_hidden_state
        return self.itm_head(hidden[:, : query_tokens.shape[1]]).mean(dim=1)  # (B, 2)

    def itm_logits_from_embeds(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ITM logits (B, 2) for pairs (image_embeds[i], text[i]) from cached ``encode_image`` outputs."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self._itm_logits(image_embeds, input_ids, attention_mask)

    def get_image_features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Normalized query features (B, Q, E)."""
        image_embeds = self.encode_image(pixel_values, interpolate_pos_encoding)
        return self.image_feats(self.query_forward(image_embeds).last_hidden_state)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalized [CLS] features (B, E)."""
        return self.text_feat(self.text_forward(input_ids, attention_mask))

    @staticmethod
    def similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """Max-over-queries cosine: image_feats (N_img, Q, E), text_feats (N_txt, E) -> (N_img, N_txt).

        One (N_img * Q, E) x (E, N_txt) product on a view of the features: no copy of the image features is made
        (an einsum over ``iqe,te`` permutes them first), which matters when it is called chunk by chunk."""
        num_images, queries, dim = image_feats.shape
        scores = image_feats.float().reshape(num_images * queries, dim) @ text_feats.float().t()
        return scores.view(num_images, queries, -1).amax(1)

    def itc_similarity(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        """(N_img, N_txt) max-over-queries cosine similarity, without temperature."""
        return self.similarity(self.get_image_features(pixel_values, interpolate_pos_encoding),
                               self.get_text_features(input_ids, attention_mask))

    def itm_logits(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        """ITM logits (B, 2) for the pairs (image i, text i); index 1 = match."""
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"itm_logits scores pairs: got {pixel_values.shape[0]} images and {input_ids.shape[0]} texts"
            )
        return self.itm_logits_from_embeds(self.encode_image(pixel_values, interpolate_pos_encoding), input_ids,
                                           attention_mask)

    def extract_features(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mode: str = "multimodal",
        interpolate_pos_encoding: bool = False,
    ) -> Blip2FeatureOutput:
        """LAVIS ``extract_features``: mode "image", "text" or "multimodal" (query outputs of the joint pass)."""
        if mode not in ("image", "text", "multimodal"):
            raise ValueError(f"mode={mode!r} must be 'image', 'text' or 'multimodal'")
        if mode in ("image", "multimodal") and pixel_values is None:
            raise ValueError(f"mode={mode!r} needs pixel_values")
        if mode in ("text", "multimodal") and input_ids is None:
            raise ValueError(f"mode={mode!r} needs input_ids")
        if mode == "image":
            image_embeds = self.encode_image(pixel_values, interpolate_pos_encoding)
            query_hidden = self.query_forward(image_embeds).last_hidden_state
            return Blip2FeatureOutput(image_embeds=query_hidden, image_embeds_proj=self.image_feats(query_hidden))
        if mode == "text":
            text_hidden = self.text_forward(input_ids, attention_mask)
            return Blip2FeatureOutput(
                text_embeds=text_hidden, text_embeds_proj=F.normalize(self.text_proj(text_hidden), dim=-1)
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        query_tokens = self.query_tokens.expand(input_ids.shape[0], -1, -1)
        hidden = self.qformer(
            query_embeds=query_tokens, input_ids=input_ids, attention_mask=attention_mask,
            image_embeds=self.encode_image(pixel_values, interpolate_pos_encoding),
        ).last_hidden_state
        return Blip2FeatureOutput(multimodal_embeds=hidden[:, : query_tokens.shape[1]])

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        num_beams: int = 3,
        max_length: int = 30,
        min_length: int = 10,
        do_sample: bool = False,
        top_p: float = 0.9,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        num_captions: int = 1,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        """Captions from the Q-Former's LM head: token ids (B * num_captions, T) starting with [DEC].

        ``num_beams=1`` is greedy; ``do_sample`` draws with nucleus sampling (``top_p``). Decode with
        ``Blip2Processor.batch_decode``.
        """
        qcfg = self.config.qformer_config
        repeats = num_captions if do_sample else num_beams
        image_embeds = self.encode_image(pixel_values, interpolate_pos_encoding).repeat_interleave(repeats, dim=0)
        query_cache = self.query_forward(image_embeds, use_cache=True).past_key_values
        bos = torch.full((image_embeds.shape[0], 1), qcfg.bos_token_id, dtype=torch.long, device=image_embeds.device)
        word_embeddings = self.qformer.embeddings.word_embeddings.weight

        def step(new_ids: torch.Tensor, cache, position: int):
            out = self.qformer(input_ids=new_ids, past_key_values=cache, causal=True, use_cache=True,
                               position_offset=position)
            return self.lm_head(out.last_hidden_state[:, -1], word_embeddings), out.past_key_values

        common = dict(max_length=max_length, min_length=min_length, eos_token_id=qcfg.sep_token_id,
                      pad_token_id=qcfg.pad_token_id, repetition_penalty=repetition_penalty)
        if do_sample or num_beams == 1:
            return generation.sample_or_greedy(step, query_cache, bos, do_sample=do_sample, top_p=top_p,
                                               temperature=temperature, **common)
        return generation.beam_search(step, query_cache, bos, num_beams=num_beams, length_penalty=length_penalty,
                                      num_return_sequences=num_captions, **common)
