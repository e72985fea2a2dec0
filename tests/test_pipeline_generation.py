"""pipeline("image_to_text_generation"): captions and prompt continuations from a stage-2 model, checked against
direct ``Blip2ImageToTextGeneration.generate`` calls decoded by the LLM's tokenizer, and against transformers' BLIP-2.

Two tiny LLMs with real tokenizers: a Llama with a sentencepiece ``tokenizer.model`` (read from its own folder), and
transformers' Blip2ForConditionalGeneration with OPT and a byte-level BPE tokenizer saved in the BLIP-2 folder.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from blip2 import Blip2ImageToTextGeneration, Blip2Qformer, pipeline
from blip2.processing.llm_tokenizer import load_llm_tokenizer
from blip2.models.base import init_bert_weights
from blip2.pipelines import ImageToTextGenerationPipeline
from blip2.processing import Blip2GenerationProcessor, Blip2ImageProcessor
from tests.helpers import tiny_config
from llm_fixtures import VOCAB, tiny_llama, write_byte_level_bpe, write_llama
from weights_fixtures import NUM_QUERIES, build_hf_generation

TASK = "image_to_text_generation"
SEQ_LENGTH = 40  # with 5 queries and 8 new tokens: room for a prompt of 27 tokens
PROMPTS = ["a dog", "the old train waits at", ""]
OPT_IMAGE_TOKEN = VOCAB  # one id past the tokenizer's vocabulary, as <image> is added to OPT's


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama folder with a sentencepiece tokenizer.model (vocabulary 300: <unk> 0, <s> 1, </s> 2)."""
    return write_llama(tiny_llama(), tmp_path_factory.mktemp("llama"))


def steered(model: Blip2ImageToTextGeneration) -> Blip2ImageToTextGeneration:
    """Wide Q-Former and projection weights: at their usual scale every image gives the LLM the same soft prompt."""
    init_bert_weights(model.qformer, std=0.2)
    with torch.no_grad():
        model.llm_proj.weight.mul_(20)
    return model.eval()


@pytest.fixture(scope="module")
def llama_model(llama_dir) -> Blip2ImageToTextGeneration:
    torch.manual_seed(0)
    config = tiny_config(text_config={"checkpoint_name_or_path": str(llama_dir), "seq_length": SEQ_LENGTH})
    return steered(Blip2ImageToTextGeneration(config))


@pytest.fixture(scope="module")
def caption(llama_model) -> ImageToTextGenerationPipeline:
    return pipeline(TASK, model=llama_model, max_new_tokens=8)


@pytest.fixture(scope="module")
def hf_opt_dir(tmp_path_factory):
    """(transformers Blip2ForConditionalGeneration with OPT, its folder with the OPT tokenizer saved beside it)."""
    hf = build_hf_generation(vocab_size=VOCAB + 1, image_token_index=OPT_IMAGE_TOKEN)
    with torch.no_grad():
        hf.language_projection.weight.mul_(20)
    folder = tmp_path_factory.mktemp("hf_blip2_opt")
    hf.save_pretrained(folder)
    tokenizer_dir = write_byte_level_bpe(tmp_path_factory.mktemp("opt_tokenizer"), "opt")
    load_llm_tokenizer(tokenizer_dir).save_pretrained(str(folder))  # as transformers' processor saves it
    return hf, folder


def pixels(images) -> torch.Tensor:
    return Blip2ImageProcessor(30)(images)["pixel_values"]


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(row) for row in rows)
    input_ids = torch.tensor([[pad] * (length - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
    return input_ids, attention_mask


@torch.no_grad()
def direct_texts(model, tokenizer, images, prompts: list[str], **settings) -> list[str]:
    """The model's own generate on the same pixels and left-padded prompts ([BOS] + the prompt's tokens), each row
    decoded with its prompt, as the seed decodes the whole sequence."""
    rows = [tokenizer(prompt).input_ids for prompt in prompts]  # Llama and OPT put BOS first, and no EOS
    new_ids = model.generate(pixels(images), *left_padded(rows, tokenizer.pad_token_id), **settings)
    return [tokenizer.decode(row + new, skip_special_tokens=True).strip() for row, new in zip(rows, new_ids.tolist())]


def texts(outputs: list[dict]) -> list[str]:
    assert all(set(output) == {"generated_text"} for output in outputs)
    return [output["generated_text"] for output in outputs]


# --- the same text as the model's generate -----------------------------------------------------------------------
def test_captions_equal_the_models_generate_decoded_with_the_llm_tokenizer(caption, llama_model, llama_dir, arrays):
    tokenizer = load_llm_tokenizer(llama_dir)
    got = texts(caption(arrays, prompt=PROMPTS))
    assert got == direct_texts(llama_model, tokenizer, arrays, PROMPTS, max_new_tokens=8)
    assert [text.startswith(prompt) for text, prompt in zip(got, PROMPTS)] == [True] * 3
    assert len(set(got)) == 3
    # no prompt: generation starts from the BOS alone, as generate does without input_ids
    alone = caption(arrays[2])
    with torch.no_grad():
        new_ids = llama_model.generate(pixels(arrays[2:]), max_new_tokens=8)
    assert alone == {"generated_text": tokenizer.decode(new_ids[0], skip_special_tokens=True).strip()}
    assert alone == caption(arrays[2], prompt="")


def test_batches_give_what_each_image_gives_alone_greedy(caption, arrays):
    batched = caption(arrays, prompt=PROMPTS, batch_size=3)
    assert batched == caption(arrays, prompt=PROMPTS, batch_size=1)
    assert batched == caption(arrays, prompt=PROMPTS, batch_size=2)
    assert batched == [caption(image, prompt=prompt) for image, prompt in zip(arrays, PROMPTS)]


def test_images_change_the_caption(caption, arrays):
    assert len(set(texts(caption(arrays, prompt="two men", return_full_text=False)))) == 3


def test_path_pil_array_and_dict_inputs(caption, arrays, tmp_path):
    image = Image.fromarray(arrays[1])
    path = tmp_path / "image.png"
    image.save(path)  # PNG is lossless: the same pixels come back
    from_array = caption(arrays[1], prompt="a dog")
    assert isinstance(from_array, dict)
    assert caption([image, path, str(path)], prompt="a dog") == [from_array] * 3
    assert caption({"image": arrays[1], "prompt": "a dog"}) == from_array  # the seed's input form
    assert caption([{"image": a, "prompt": p} for a, p in zip(arrays, PROMPTS)]) == caption(arrays, prompt=PROMPTS)


# --- prompts and templates ---------------------------------------------------------------------------------------
def test_the_text_includes_the_prompt_unless_return_full_text_is_false(caption, llama_model, arrays):
    full = caption(arrays, prompt=PROMPTS)
    short = caption(arrays, prompt=PROMPTS, return_full_text=False)
    for prompt, whole, new in zip(PROMPTS, texts(full), texts(short)):
        assert whole.startswith(prompt) and new and new == whole[len(prompt):].strip()
    assert pipeline(TASK, model=llama_model, max_new_tokens=8, return_full_text=False)(arrays, prompt=PROMPTS) == short


def test_hypothesis_template_wraps_the_prompt(llama_model, caption, arrays):
    templated = pipeline(TASK, model=llama_model, max_new_tokens=8, hypothesis_template="a photo of {}")
    assert templated(arrays[0], prompt="a dog") == caption(arrays[0], prompt="a photo of a dog")
    assert templated(arrays[0]) == caption(arrays[0], prompt="a photo of")  # "a photo of ".strip()
    spaced = caption(arrays[0], prompt="a dog", hypothesis_template=" {} sits ")
    assert spaced == caption(arrays[0], prompt="a dog sits")
    assert templated(arrays[0], prompt="a dog", hypothesis_template="{}") == caption(arrays[0], prompt="a dog")


def test_a_template_without_a_slot_is_the_prompt_as_in_the_seed(caption, arrays):
    out = caption(arrays[0], hypothesis_template="a picture of")
    assert out == caption(arrays[0], prompt="a picture of")
    assert out["generated_text"].startswith("a picture of")
    with pytest.raises(ValueError, match="hypothesis_template='a picture of' has no {} for the prompt 'a dog'"):
        caption(arrays[0], prompt="a dog", hypothesis_template="a picture of")


def test_one_prompt_per_image(caption, arrays):
    together = caption(arrays, prompt=PROMPTS)
    assert together == [caption(image, prompt=prompt) for image, prompt in zip(arrays, PROMPTS)]
    assert caption(arrays, prompt="a dog") == caption(arrays, prompt=["a dog"] * 3)


# --- generation settings -----------------------------------------------------------------------------------------
def recording(model, monkeypatch) -> list[tuple[dict, torch.Tensor]]:
    """Each generate call's keyword arguments and result."""
    calls = []
    original = model.generate

    def generate(pixel_values, input_ids=None, attention_mask=None, **kwargs):
        out = original(pixel_values, input_ids, attention_mask, **kwargs)
        calls.append((kwargs, out))
        return out

    monkeypatch.setattr(model, "generate", generate)
    return calls


def test_generation_settings_pass_through_and_calls_override_the_pipelines(llama_model, llama_dir, arrays,
                                                                           monkeypatch):
    calls = recording(llama_model, monkeypatch)
    caption = pipeline(TASK, model=llama_model, max_new_tokens=5, num_beams=3, length_penalty=0.5)
    out = caption(arrays[:2], prompt=PROMPTS[:2], max_new_tokens=6, repetition_penalty=1.3, min_new_tokens=6)
    settings = dict(max_new_tokens=6, num_beams=3, length_penalty=0.5, repetition_penalty=1.3, min_new_tokens=6)
    assert calls[0][0] == settings
    assert calls[0][1].shape == (2, 6)
    monkeypatch.undo()
    assert texts(out) == direct_texts(llama_model, load_llm_tokenizer(llama_dir), arrays[:2], PROMPTS[:2], **settings)


def test_sampling_with_a_seed_equals_the_models_generate(caption, llama_model, llama_dir, arrays):
    settings = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
    torch.manual_seed(3)
    sampled = caption(arrays, prompt=PROMPTS, **settings)
    torch.manual_seed(3)
    expected = direct_texts(llama_model, load_llm_tokenizer(llama_dir), arrays, PROMPTS, max_new_tokens=8, **settings)
    assert texts(sampled) == expected


def test_several_sequences_per_image_give_a_list_per_image(caption, arrays):
    out = caption(arrays[:2], prompt="a dog", num_beams=3, num_return_sequences=2)
    assert [len(per_image) for per_image in out] == [2, 2]
    assert out[0][0] == caption(arrays[0], prompt="a dog", num_beams=3)  # the best beam first
    assert caption(arrays[0], num_beams=2, num_return_sequences=2)[1]["generated_text"]


def test_an_unknown_generation_setting_is_named(caption, arrays):
    with pytest.raises(ValueError, match="max_new_tokenz"):
        caption(arrays[0], max_new_tokenz=3)


# --- the tokenizer and the processor -----------------------------------------------------------------------------
def test_prompts_start_with_the_tokenizers_bos_and_never_end_with_eos(llama_dir, tmp_path):
    image_processor = Blip2ImageProcessor(30)
    tokenizer = load_llm_tokenizer(llama_dir, add_eos_token=True)
    processor = Blip2GenerationProcessor(image_processor, tokenizer)
    plain = tokenizer("a dog", add_special_tokens=False).input_ids
    assert tokenizer("a dog").input_ids == [1] + plain + [2]  # what the tokenizer itself would give
    tokens = processor(text=["a dog", ""])
    width = len(plain) + 1
    assert tokens["input_ids"].tolist() == [[1] + plain, [0] * (width - 1) + [1]]  # left-padded with <unk> (0)
    assert tokens["attention_mask"].tolist() == [[1] * width, [0] * (width - 1) + [1]]
    no_bos = Blip2GenerationProcessor(image_processor, load_llm_tokenizer(llama_dir, add_bos_token=False))
    assert no_bos.encode(["a dog"]) == [plain]  # Baichuan-7B's tokenizer, as the seed: no special tokens
    opt = Blip2GenerationProcessor(image_processor, load_llm_tokenizer(write_byte_level_bpe(tmp_path, "opt")))
    assert opt.encode(["a dog"])[0][0] == 2 and opt.pad(opt.encode(["a", "a dog"]))["input_ids"][0, 0] == 1


@pytest.mark.parametrize("kind", ["sentencepiece", "opt"])
def test_the_continuation_joins_the_prompt_as_the_whole_sequence_decodes(llama_dir, tmp_path, kind):
    folder = llama_dir if kind == "sentencepiece" else write_byte_level_bpe(tmp_path, "opt")
    tokenizer = load_llm_tokenizer(folder)
    processor = Blip2GenerationProcessor(Blip2ImageProcessor(30), tokenizer)
    sentence = "the old train waits at a green field"
    [ids] = processor.encode([sentence])
    for split in range(1, len(ids)):  # every seam, inside words ("a pic" + "ture") and between them (" a dog")
        prompt = tokenizer.decode(ids[:split], skip_special_tokens=True)
        assert prompt + processor.continuation(ids[:split], ids[split:]) == sentence, split


def test_tokenizer_argument_object_or_folder(llama_model, llama_dir, caption, arrays):
    tokenizer = load_llm_tokenizer(llama_dir)
    assert pipeline(TASK, model=llama_model, tokenizer=tokenizer).processor.tokenizer is tokenizer
    by_folder = pipeline(TASK, model=llama_model, tokenizer=str(llama_dir), max_new_tokens=8)
    assert by_folder(arrays, prompt=PROMPTS) == caption(arrays, prompt=PROMPTS)


def test_missing_tokenizer_names_where_it_looked_and_a_saved_processor_is_found(tmp_path, arrays):
    torch.manual_seed(0)
    llama = {"model_type": "llama", "hidden_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
             "intermediate_size": 37, "vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    model = steered(Blip2ImageToTextGeneration(tiny_config(text_config=llama)))
    with pytest.raises(FileNotFoundError, match=r"no tokenizer for the LLM: looked for tokenizer.json, "
                       r"tokenizer.model or vocab.json \+ merges.txt in no LLM folder .*; no model folder"):
        pipeline(TASK, model=model)
    model.save_pretrained(tmp_path / "model")  # a random LLM: its weights are written into the folder
    with pytest.raises(FileNotFoundError, match=f"in no LLM folder .*; the model folder {tmp_path / 'model'}\\. "
                       "Pass tokenizer="):
        pipeline(TASK, model=tmp_path / "model")
    tokenizer_dir = write_llama(tiny_llama(), tmp_path / "llm")
    processor = Blip2GenerationProcessor(Blip2ImageProcessor(30, mean=(0.5,) * 3, std=(0.5,) * 3),
                                         load_llm_tokenizer(tokenizer_dir))
    processor.save_pretrained(tmp_path / "model")
    from_folder = pipeline(TASK, model=tmp_path / "model", max_new_tokens=6)
    assert from_folder.processor.image_processor.mean == (0.5, 0.5, 0.5)  # its preprocessor_config.json
    assert from_folder(arrays, prompt=PROMPTS) == pipeline(TASK, model=model, processor=processor,
                                                           max_new_tokens=6)(arrays, prompt=PROMPTS)


def test_a_preset_without_a_tokenizer_names_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP2_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"no LLM folder .*; the model folder {tmp_path / 'blip2_stage2_tiny'}"):
        pipeline(TASK, model="blip2_stage2_tiny")


# --- a transformers BLIP-2 folder ------------------------------------------------------------------------------------
@torch.no_grad()
def test_transformers_folder_with_its_tokenizer_gives_transformers_text(hf_opt_dir, arrays):
    hf, folder = hf_opt_dir
    caption = pipeline(TASK, model=folder, max_new_tokens=10)  # the tokenizer saved in the BLIP-2 folder
    tokenizer = load_llm_tokenizer(folder)
    for image, prompt in zip(arrays, PROMPTS):
        prompt_ids = tokenizer(prompt).input_ids  # [</s> (OPT's BOS)] + the prompt's tokens
        input_ids = torch.tensor([[OPT_IMAGE_TOKEN] * NUM_QUERIES + prompt_ids])
        hf_ids = hf.generate(pixels([image]), input_ids, torch.ones_like(input_ids), max_new_tokens=10)
        expected = tokenizer.decode(hf_ids[0, NUM_QUERIES:], skip_special_tokens=True).strip()
        assert caption(image, prompt=prompt) == {"generated_text": expected}


def test_opt_batches_give_what_each_image_gives_alone_greedy(hf_opt_dir, arrays):
    caption = pipeline(TASK, model=hf_opt_dir[1], max_new_tokens=10)
    batched = caption(arrays, prompt=PROMPTS, batch_size=3)
    assert batched == [caption(image, prompt=prompt) for image, prompt in zip(arrays, PROMPTS)]
    assert len(set(texts(batched))) == 3


# --- errors ------------------------------------------------------------------------------------------------------
def test_a_prompt_too_long_for_seq_length_names_the_lengths(caption, llama_model, arrays):
    long_prompt = " ".join(["the old train waits at the station"] * 4)
    with pytest.raises(ValueError, match=r"the prompt is too long: \d+ tokens, but text_config.seq_length=40 holds "
                       r"query_length=5 \+ the prompt \+ max_new_tokens=8, which leaves room for at most 27 prompt "
                       r"tokens"):
        caption(arrays[0], prompt=long_prompt)
    default_limit = pipeline(TASK, model=llama_model)  # max_length = seq_length, counting queries and prompt
    with pytest.raises(ValueError, match=r"max_length=40 .* at most 34 prompt tokens"):
        default_limit(arrays[0], prompt=long_prompt * 2)
    with pytest.raises(ValueError, match="the prompt is too long"):  # the model itself refuses it
        llama_model.generate(pixels(arrays[:1]), torch.ones(1, 30, dtype=torch.long), max_new_tokens=8)


def test_wrong_model_and_argument_errors(caption, arrays):
    with pytest.raises(TypeError, match="image_to_text_generation needs a Blip2ImageToTextGeneration \\(stage-2\\)"):
        pipeline(TASK, model=Blip2Qformer(tiny_config()))
    with pytest.raises(ValueError, match="needs model=: a Blip2ImageToTextGeneration, a preset name \\(.*"
                                         "blip2_stage2_tiny"):
        pipeline(TASK)
    with pytest.raises(ValueError, match="tokenizer= is for image_to_text_generation"):
        pipeline("zero_shot_image_classification", model="blip2_tiny", tokenizer="somewhere")
    with pytest.raises(ValueError, match="got 2 prompts for 3 images"):
        caption(arrays, prompt=PROMPTS[:2])
    with pytest.raises(ValueError, match="prompts given twice"):
        caption([{"image": arrays[0], "prompt": "a"}], prompt=["b"])
    with pytest.raises(ValueError, match="an input dict needs 'image'"):
        caption({"img": arrays[0]})
    with pytest.raises(ValueError, match="no images given"):
        caption([])
    with pytest.raises(ValueError, match=r"hypothesis_template='a \{x\}' must have at most one plain \{\} slot"):
        caption(arrays[0], hypothesis_template="a {x}")
    with pytest.raises(TypeError, match="a prompt must be a string"):
        caption(arrays[0], prompt=[3])
