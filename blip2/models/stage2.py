"""Stage 2: the Q-Former's queries, projected by ``llm_proj``, become a soft prompt for a frozen causal LLM.

The LLM reads one sequence of embeddings, ``[projected queries (Q)][prompt tokens][caption tokens]``, with the
queries always first: a left-padded prompt batch sits as ``[queries][pad ...][BOS][prompt]``, exactly as transformers'
``Blip2ForConditionalGeneration`` lays it out, and the LLM takes its positions from the attention mask. Training
(``forward``) is the causal LM loss on the caption; ``generate`` hands the embeddings to the LLM's own ``generate``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from blip2.config import Blip2Config, ConfigError
from blip2.models.base import Blip2PreTrainedModel, init_qformer_weights
from blip2.models.outputs import Blip2Stage2Output

IGNORE_INDEX = -100  # a label the loss skips: query positions, the fixed prompt, padding


def causal_lm_loss(logits: torch.Tensor, text_labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy where position t predicts token t + 1; ``text_labels`` (B, L) cover the last L positions.

    The positions before the text (the queries) get no label of their own; the last query predicts the first text
    token, unless that token is masked (``IGNORE_INDEX``).
    """
    query_length = logits.shape[1] - text_labels.shape[1]
    labels = F.pad(text_labels, (query_length, 0), value=IGNORE_INDEX)  # (B, Q + L)
    shifted_logits = logits[:, :-1].flatten(0, 1).float()  # (B * (Q + L - 1), V), the loss in fp32
    return F.cross_entropy(shifted_logits, labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


class Blip2ImageToTextGeneration(Blip2PreTrainedModel):
    """BLIP-2 stage 2: EVA ViT (frozen) + ln_vision + Q-Former query path + ``llm_proj`` + a causal LLM (frozen)."""

    preset_group = ("stage2", "itt")
    accepts_language_model = True  # ``blip2.weights`` passes a built LLM by this sign, never importing this module

    def __init__(self, config: Blip2Config, *, language_model: nn.Module | None = None) -> None:
        """``language_model``: the LLM, built by the caller (``from_pretrained`` passes one built empty, on the meta
        device, when the checkpoint holds the LLM). Without it, ``blip2.weights.llm.build_language_model`` builds it
        from ``config.text_config``: read from ``checkpoint_name_or_path`` (a local folder, its sizes checked against
        text_config's), else random; in ``text_config.dtype`` (e.g. "bfloat16" for a frozen 7B LLM), float32 if
        unset. This class itself reads no file."""
        super().__init__(config)
        if config.text_config is None:
            raise ConfigError(
                "Blip2ImageToTextGeneration needs text_config (the LLM: checkpoint_name_or_path of a local folder, "
                "or transformers config keys with model_type); this config has none (a stage-1 config?)"
            )
        self.build_image_path(with_text=False)  # LAVIS deletes the Q-Former's text parts in stage 2
        init_qformer_weights(self.qformer, config.qformer_config)
        nn.init.normal_(self.query_tokens, std=config.qformer_config.initializer_range)
        if language_model is None:
            from blip2.weights.llm import build_language_model  # transformers' model classes: for stage 2 only

            language_model = build_language_model(config)
        self.language_model = language_model
        llm_width = self.language_model.get_input_embeddings().embedding_dim  # OPT-350m: word_embed_proj_dim
        self.llm_proj = nn.Linear(config.qformer_config.hidden_size, llm_width)  # default init, as LAVIS opt_proj
        self.apply_freezing()

    def frozen_modules(self) -> list[nn.Module]:
        frozen = [self.vision_model] if self.config.freeze_vision else []
        return frozen + ([self.language_model] if self.config.freeze_text else [])

    @property
    def llm_folder(self) -> str | None:
        """The folder the LLM's weights came from, or None (random, or read from a BLIP-2 checkpoint)."""
        folder = self.config.text_config.get("checkpoint_name_or_path")
        return str(folder) if folder else None

    # --- image path: encode_image and query_forward come from Blip2PreTrainedModel --------------------------------
    def get_image_features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """The queries in the LLM's input space: pixel_values (B, 3, H, W) -> (B, Q, D_llm)."""
        image_embeds = self.encode_image(pixel_values, interpolate_pos_encoding)
        query_hidden = self.query_forward(image_embeds).last_hidden_state  # (B, Q, D)
        return self.llm_proj(query_hidden)

    def llm_inputs(
        self, image_features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[queries][text]`` as LLM input embeddings (B, Q + L, D_llm) and its attention mask (B, Q + L)."""
        text_embeds = self.language_model.get_input_embeddings()(input_ids)  # (B, L, D_llm)
        inputs_embeds = torch.cat((image_features.to(text_embeds.dtype), text_embeds), dim=1)
        query_mask = attention_mask.new_ones(image_features.shape[:2])  # (B, Q): queries are never padding
        return inputs_embeds, torch.cat((query_mask, attention_mask), dim=1)

    # --- training ------------------------------------------------------------------------------------------------
    def text_labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Targets (B, L): the caption tokens, with padding and the fixed prompt (``prompt_length``) masked."""
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        labels[:, : self.config.prompt_length] = IGNORE_INDEX
        return labels

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> Blip2Stage2Output:
        """LM loss and logits for image-caption pairs; ``input_ids`` (B, L) are right-padded LLM tokens.

        ``labels`` (B, L), if given, replace ``text_labels``: use ``IGNORE_INDEX`` for tokens that are not targets.
        """
        if attention_mask is None:
            attention_mask = self._default_attention_mask(input_ids)
        image_features = self.get_image_features(pixel_values, interpolate_pos_encoding)
        inputs_embeds, llm_mask = self.llm_inputs(image_features, input_ids, attention_mask)
        logits = self.language_model(inputs_embeds=inputs_embeds, attention_mask=llm_mask, use_cache=False).logits
        if labels is None:
            labels = self.text_labels(input_ids, attention_mask)
        return Blip2Stage2Output(causal_lm_loss(logits, labels), logits)  # logits (B, Q + L, V)

    # --- inference -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **generation_kwargs,
    ) -> torch.Tensor:
        """New token ids (B * num_return_sequences, T) after ``[queries][prompt]``; the prompt is left out.

        ``input_ids`` (B, L) is a left-padded prompt batch (default: the LLM's BOS alone, as transformers does).
        ``generation_kwargs`` go to the LLM's ``generate``: ``max_new_tokens``, ``min_new_tokens``, ``num_beams``,
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``length_penalty``,
        ``eos_token_id``, ``num_return_sequences``, ... (``max_length`` counts the Q query positions and the prompt).
        What they leave out comes from ``generation_defaults``. With ``text_config.seq_length`` set, a prompt that
        leaves no room in it for the queries and ``max_new_tokens`` (or for one token below ``max_length``) raises
        ValueError, naming the lengths.
        """
        defaults = self.generation_defaults()
        if {"max_length", "max_new_tokens"} & generation_kwargs.keys():  # the caller's length limit replaces ours
            defaults = {key: value for key, value in defaults.items() if key not in ("max_length", "max_new_tokens")}
        generation_kwargs = {**defaults, **generation_kwargs}
        if input_ids is None:
            input_ids = self._bos_ids(pixel_values.shape[0], pixel_values.device)
        self._check_sequence_budget(input_ids.shape[1], generation_kwargs)
        image_features = self.get_image_features(pixel_values, interpolate_pos_encoding)  # (B, Q, D_llm)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs_embeds, llm_mask = self.llm_inputs(image_features, input_ids, attention_mask)
        # the ids beside the embeddings are what repetition penalties and stopping criteria read, as in transformers'
        # BLIP-2 (there: <image> ids for the queries). Ours hold the pad id, which the embeddings never look up.
        query_ids = input_ids.new_full(image_features.shape[:2], self._pad_token_id())
        prefix_ids = torch.cat((query_ids, input_ids), dim=1)  # (B, Q + L)
        output = self.language_model.generate(
            input_ids=prefix_ids, inputs_embeds=inputs_embeds, attention_mask=llm_mask, **generation_kwargs
        )
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        return sequences[:, prefix_ids.shape[1]:]

    def generation_defaults(self) -> dict:
        """Settings the seed keeps in ``text_config`` (``do_sample``, ``top_k``, ``top_p``, ``repetition_penalty``,
        ``use_past``, ``max_decode_length``), in transformers' names; the length limit is always set.

        As in the seed, ``max_length`` = min(``max_decode_length``, ``seq_length``) counts the queries and the prompt;
        with neither given, up to ``max_txt_len`` new tokens.
        """
        text = self.config.text_config
        defaults = {name: text[name] for name in ("do_sample", "repetition_penalty") if name in text}
        if text.get("do_sample"):  # top_k / top_p only shape sampling
            defaults |= {name: text[name] for name in ("top_k", "top_p") if name in text}
        if "use_past" in text:
            defaults["use_cache"] = bool(text["use_past"])
        limits = [text[name] for name in ("max_decode_length", "seq_length") if text.get(name)]
        if limits:
            defaults["max_length"] = min(limits)
        else:
            defaults["max_new_tokens"] = self.config.max_txt_len
        return defaults

    def _check_sequence_budget(self, prompt_length: int, generation_kwargs: dict) -> None:
        """With ``text_config.seq_length`` set, the queries, the prompt and the new tokens must fit in it (the seed's
        static sequence); a prompt that leaves no room is refused here rather than cut or overrun."""
        seq_length = self.config.text_config.get("seq_length")
        if not seq_length:
            return
        queries = self.config.qformer_config.query_length
        max_new_tokens = generation_kwargs.get("max_new_tokens")
        if max_new_tokens is not None:
            if queries + prompt_length + max_new_tokens > seq_length:
                raise ValueError(
                    f"the prompt is too long: {prompt_length} tokens, but text_config.seq_length={seq_length} holds "
                    f"query_length={queries} + the prompt + max_new_tokens={max_new_tokens}, which leaves room for "
                    f"at most {seq_length - queries - max_new_tokens} prompt tokens"
                )
            return
        max_length = generation_kwargs.get("max_length")
        if max_length is not None and queries + prompt_length >= max_length:
            raise ValueError(
                f"the prompt is too long: {prompt_length} tokens, but max_length={max_length} (which counts "
                f"query_length={queries} and the prompt; text_config.seq_length={seq_length}) leaves no room for a "
                f"new token: at most {max_length - queries - 1} prompt tokens"
            )

    # --- saving --------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, include_llm: bool | None = None,
                        overwrite: bool = False) -> None:
        """Write ``config.yaml`` + ``model.safetensors``; the LLM's tensors only when they cannot be found elsewhere.

        By default (``include_llm=None``) a frozen LLM read from a folder is not copied: the config refers to that
        folder (``text_config.checkpoint_name_or_path``). ``include_llm=True`` writes the LLM too and makes the folder
        self-contained (the config then carries the LLM's own transformers config instead of the folder). A folder
        holding files blip2 did not write is refused unless ``overwrite`` (which replaces only our files there).
        """
        from blip2.weights import save_pretrained

        if include_llm is None:
            include_llm = self.llm_folder is None or not self.config.freeze_text
        if not include_llm:
            save_pretrained(self, directory, skip_prefixes=("language_model.",), overwrite=overwrite)
            return
        text_config = {key: value for key, value in self.config.text_config.items() if key != "checkpoint_name_or_path"}
        text_config.update(self.language_model.config.to_dict())
        save_pretrained(self, directory, config=self.config.replace(text_config=text_config), overwrite=overwrite)

    # --- helpers -------------------------------------------------------------------------------------------------
    def _special_id(self, name: str) -> int | None:
        value = getattr(self.language_model.generation_config, name, None)
        if value is None:
            value = getattr(self.language_model.config, name, None)
        return value[0] if isinstance(value, (list, tuple)) else value

    def _pad_token_id(self) -> int:
        pad = self._special_id("pad_token_id")
        return 0 if pad is None else pad

    def _bos_ids(self, batch_size: int, device: torch.device) -> torch.Tensor:
        bos = self._special_id("bos_token_id")
        if bos is None:
            raise ValueError("the LLM has no bos_token_id: pass input_ids (a prompt) to generate")
        return torch.full((batch_size, 1), bos, dtype=torch.long, device=device)

    def _default_attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        pad = self._special_id("pad_token_id")
        return torch.ones_like(input_ids) if pad is None else (input_ids != pad).long()
