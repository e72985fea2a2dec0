"""pipeline(): zero-shot classification and image-text retrieval on raw inputs, checked against direct model calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from blip2 import Blip2Qformer, pipeline
from blip2.models.stage1 import init_bert_weights
from blip2.pipelines import ImageTextRetrievalPipeline, ZeroShotImageClassificationPipeline
from blip2.processing import Blip2ImageProcessor, Blip2Processor, load_tokenizer
from tests.helpers import tiny_config

LABELS = ["cat", "dog", "red square", "tree", "toy car"]
TEMPLATE = "This is a photo of {}."
TEXTS = ["A dog, running on grass!", "a red square", "Two cats sleeping.", "a tree in the park", "A toy car"]


def tiny_model() -> Blip2Qformer:
    torch.manual_seed(0)
    model = Blip2Qformer.from_pretrained("blip2_tiny").eval()
    # BERT's std-0.02 init gives every image and label nearly the same score (all about 1/C); a wider one makes the
    # scores depend on both, so a wrong query reduction, template or image transform shows in the numbers
    init_bert_weights(model.qformer, std=0.2)
    return model


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def model() -> Blip2Qformer:
    return tiny_model()


@pytest.fixture(scope="module")
def images(arrays) -> list[Image.Image]:
    return [Image.fromarray(array) for array in arrays]


@pytest.fixture(scope="module")
def classify(model) -> ZeroShotImageClassificationPipeline:
    return pipeline("zero_shot_image_classification", model=model, candidate_labels=LABELS,
                    hypothesis_template=TEMPLATE)


@pytest.fixture(scope="module")
def retrieve(model) -> ImageTextRetrievalPipeline:
    return pipeline("image_text_retrieval", model=model)


def pixels(model: Blip2Qformer, images) -> torch.Tensor:
    return Blip2ImageProcessor(model.config.vision_config.image_size)(images)["pixel_values"]


def text_features(model: Blip2Qformer, texts: list[str]) -> torch.Tensor:
    tokens = load_tokenizer()(texts, padding="longest", return_tensors="pt")
    return model.get_text_features(tokens["input_ids"], tokens["attention_mask"])  # (C, E)


@torch.no_grad()
def direct_probs(model: Blip2Qformer, images, label_feats: torch.Tensor) -> torch.Tensor:
    """softmax over labels of max over queries of cosine / temp, from the model's public features."""
    image_feats = model.get_image_features(pixels(model, images))  # (N, Q, E)
    cosine = (image_feats @ label_feats.T).amax(dim=1)  # (N, C)
    return (cosine / model.temp).softmax(dim=-1)


def as_dict(ranking: list[dict]) -> dict[str, float]:
    return {item["label"]: item["score"] for item in ranking}


# --- zero-shot image classification ------------------------------------------------------------------------------
def test_one_image_gives_every_label_once_sorted_by_score_summing_to_one(classify, images):
    ranking = classify(images[0])
    assert all(set(item) == {"score", "label"} for item in ranking)
    assert sorted(item["label"] for item in ranking) == sorted(LABELS)
    scores = [item["score"] for item in ranking]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-5)
    assert scores[0] > scores[-1]  # not uniform: the temperature spreads the random model's cosines


def test_top_k_keeps_the_k_best(classify, images):
    full = classify(images[1])
    assert classify(images[1], top_k=2) == full[:2]
    assert pipeline("zero_shot_image_classification", model=classify.model, candidate_labels=LABELS,
                    hypothesis_template=TEMPLATE, top_k=3)(images[1]) == full[:3]


def test_a_list_gives_one_ranking_per_image_whatever_the_batch_size(classify, images):
    batched = classify(images, batch_size=2)
    assert len(batched) == len(images)
    assert all(isinstance(ranking, list) and len(ranking) == len(LABELS) for ranking in batched)
    for image, ranking in zip(images, batched):
        single = as_dict(classify(image))
        assert as_dict(ranking) == pytest.approx(single, abs=1e-6)
    assert batched != [batched[0]] * len(images)  # the images really differ


def test_path_pil_and_array_inputs_give_the_same_scores(classify, arrays, images, tmp_path):
    path = tmp_path / "image.png"
    images[0].save(path)  # PNG is lossless: the same pixels come back
    from_pil, from_array, from_path, from_str = classify([images[0], arrays[0], path, str(path)])
    assert as_dict(from_array) == pytest.approx(as_dict(from_pil), abs=1e-6)
    assert as_dict(from_path) == pytest.approx(as_dict(from_pil), abs=1e-6)
    assert as_dict(from_str) == pytest.approx(as_dict(from_pil), abs=1e-6)


def test_scores_equal_a_direct_computation_from_model_features(classify, model, images):
    label_feats = text_features(model, [TEMPLATE.format(label) for label in LABELS])
    expected = direct_probs(model, images, label_feats)  # (N, C)
    for row, ranking in zip(expected.tolist(), classify(images)):
        assert as_dict(ranking) == pytest.approx(dict(zip(LABELS, row)), abs=1e-5)


def test_template_ensemble_is_the_normalized_mean_of_normalized_features(classify, model, images):
    templates = ["a photo of a {}.", "a drawing of the {}", "{}, seen from far away"]
    per_template = torch.stack([text_features(model, [t.format(label) for label in LABELS]) for t in templates])
    ensembled = F.normalize(per_template.mean(0), dim=-1)  # (C, E)
    expected = direct_probs(model, images, ensembled)
    got = classify(images, hypothesis_template=templates)
    for row, ranking in zip(expected.tolist(), got):
        assert as_dict(ranking) == pytest.approx(dict(zip(LABELS, row)), abs=1e-5)
    first_only = classify(images, hypothesis_template=templates[0])
    assert as_dict(first_only[0]) != pytest.approx(as_dict(got[0]), abs=1e-4)


def test_label_features_are_cached_per_labels_and_templates(model, images, monkeypatch):
    encoded = []
    original = model.get_text_features

    def counting(input_ids, attention_mask=None):
        encoded.append(input_ids.shape[0])
        return original(input_ids, attention_mask)

    monkeypatch.setattr(model, "get_text_features", counting)
    classify = pipeline("zero_shot_image_classification", model=model, candidate_labels=LABELS)
    first = classify(images[0])
    assert sum(encoded) == len(LABELS)
    assert classify(images[1:]) and classify(images[0]) == first
    assert sum(encoded) == len(LABELS)  # no re-encoding
    classify(images[0], candidate_labels=LABELS[:2])
    assert sum(encoded) == len(LABELS) + 2
    classify(images[0], hypothesis_template=["a {}", "the {}"])
    assert sum(encoded) == len(LABELS) + 2 + 2 * len(LABELS)  # two templates: each label twice


def test_labels_and_template_given_at_call_override_the_pipeline_defaults(classify, model, images):
    other = pipeline("zero_shot_image_classification", model=model)
    assert as_dict(other(images[0], candidate_labels=LABELS, hypothesis_template=TEMPLATE)) == pytest.approx(
        as_dict(classify(images[0])), abs=1e-6)
    assert sorted(as_dict(classify(images[0], candidate_labels=["x", "y"]))) == ["x", "y"]


def test_a_preset_name_builds_the_model_and_its_processor(images):
    torch.manual_seed(0)
    by_name = pipeline("zero_shot_image_classification", model="blip2_tiny", candidate_labels=LABELS,
                       hypothesis_template=TEMPLATE, device="cpu")
    torch.manual_seed(0)
    same_weights = Blip2Qformer.from_pretrained("blip2_tiny")
    assert isinstance(by_name.model, Blip2Qformer) and by_name.device == torch.device("cpu")
    assert not by_name.model.training
    assert by_name.processor.image_processor.image_size == 32 and by_name.processor.max_length == 32
    label_feats = text_features(same_weights, [TEMPLATE.format(label) for label in LABELS])
    expected = direct_probs(same_weights, images[:1], label_feats)[0].tolist()
    assert as_dict(by_name(images[0])) == pytest.approx(dict(zip(LABELS, expected)), abs=1e-5)


def test_the_default_processor_follows_the_model_config(images):
    config = tiny_config()  # image_size 30, patch 6: 224 or 32 pixels would not fit its position embeddings
    config.max_txt_len = 12
    torch.manual_seed(0)
    extract = pipeline("feature_extraction", model=Blip2Qformer(config))
    assert extract.processor.image_processor.image_size == 30 and extract.processor.max_length == 12
    assert [feat.shape for feat in extract(images=images)] == [(5, 24)] * len(images)  # (Q, E) of this config


def test_a_saved_folder_gives_the_same_scores_as_the_model(classify, model, images, tmp_path):
    model.save_pretrained(tmp_path)
    from_folder = pipeline("zero_shot_image_classification", model=str(tmp_path), candidate_labels=LABELS,
                           hypothesis_template=TEMPLATE)
    assert from_folder.model is not model
    assert as_dict(from_folder(images[2])) == pytest.approx(as_dict(classify(images[2])), abs=1e-6)


def test_missing_candidate_labels_raise(model, images):
    classify = pipeline("zero_shot_image_classification", model=model)
    with pytest.raises(ValueError, match="needs candidate_labels"):
        classify(images[0])
    with pytest.raises(ValueError, match="needs candidate_labels"):
        classify(images[0], candidate_labels=[])


def test_bad_arguments_raise(classify, model, images):
    with pytest.raises(ValueError, match="unknown task 'image_captioning'; available tasks: "
                                         "zero_shot_image_classification, image_text_retrieval"):
        pipeline("image_captioning", model=model)
    with pytest.raises(ValueError, match="needs model="):
        pipeline("zero_shot_image_classification")
    with pytest.raises(ValueError, match="top_k=0"):
        classify(images[0], top_k=0)
    with pytest.raises(ValueError, match="hypothesis_template"):
        classify(images[0], hypothesis_template=[])


def test_a_custom_processor_is_used(model, images):
    processor = Blip2Processor(Blip2ImageProcessor(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)), load_tokenizer())
    custom = pipeline("zero_shot_image_classification", model=model, processor=processor, candidate_labels=LABELS)
    default = pipeline("zero_shot_image_classification", model=model, candidate_labels=LABELS)
    assert custom.processor is processor
    assert as_dict(custom(images[0])) != pytest.approx(as_dict(default(images[0])), abs=1e-4)


# --- image-text retrieval and features ---------------------------------------------------------------------------
@torch.no_grad()
def direct_pair_scores(model: Blip2Qformer, images, texts) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC cosine (N_img, N_txt) and ITM match logit for every (image, text) pair, one pair per row."""
    pixel_values = pixels(model, images)
    tokens = Blip2Processor(Blip2ImageProcessor(32), load_tokenizer())(text=texts)  # cleaned, as retrieval captions
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    itc = model.itc_similarity(pixel_values, ids, mask)
    n_img, n_txt = itc.shape
    itm = model.itm_logits(pixel_values.repeat_interleave(n_txt, 0), ids.repeat(n_img, 1), mask.repeat(n_img, 1))
    return itc, itm[:, 1].view(n_img, n_txt)


@pytest.fixture(scope="module")
def pair_scores(model, images) -> tuple[torch.Tensor, torch.Tensor]:
    return direct_pair_scores(model, images, TEXTS)


def ranking(row: torch.Tensor) -> list[int]:
    return sorted(range(len(row)), key=lambda i: -float(row[i]))


def test_retrieval_ranks_every_pair_by_itm_plus_itc_when_k_test_covers_all(retrieve, pair_scores, images):
    itc, itm = pair_scores
    expected = itc + itm
    out = retrieve(images, TEXTS, top_k=None, k_test=len(TEXTS))
    assert set(out) == {"image_to_text", "text_to_image"}
    assert len(out["image_to_text"]) == len(images) and len(out["text_to_image"]) == len(TEXTS)
    for i, ranked in enumerate(out["image_to_text"]):
        assert [item["index"] for item in ranked] == ranking(expected[i])
        assert [item["text"] for item in ranked] == [TEXTS[item["index"]] for item in ranked]
        assert [item["score"] for item in ranked] == pytest.approx(expected[i, ranking(expected[i])].tolist(), abs=1e-5)
    for t, ranked in enumerate(out["text_to_image"]):
        assert set(ranked[0]) == {"index", "score"}
        assert [item["index"] for item in ranked] == ranking(expected[:, t])
        assert [item["score"] for item in ranked] == pytest.approx(
            expected[ranking(expected[:, t]), t].tolist(), abs=1e-5)
    # the ITM term matters: ranking by ITC alone would differ somewhere
    assert any(ranking(itc[i]) != ranking(expected[i]) for i in range(len(images))) or any(
        ranking(itc[:, t]) != ranking(expected[:, t]) for t in range(len(TEXTS)))


def test_retrieval_without_rerank_ranks_by_itc(retrieve, pair_scores, images):
    itc, _ = pair_scores
    out = retrieve(images, TEXTS, top_k=None, rerank=False)
    for i, ranked in enumerate(out["image_to_text"]):
        assert [item["index"] for item in ranked] == ranking(itc[i])
        assert [item["score"] for item in ranked] == pytest.approx(itc[i, ranking(itc[i])].tolist(), abs=1e-5)
    for t, ranked in enumerate(out["text_to_image"]):
        assert [item["index"] for item in ranked] == ranking(itc[:, t])


def test_rerank_only_reorders_the_k_test_best_itc_candidates(retrieve, pair_scores, images):
    itc, itm = pair_scores
    out = retrieve(images, TEXTS, top_k=None, k_test=2)
    for i, ranked in enumerate(out["image_to_text"]):
        candidates = ranking(itc[i])[:2]
        assert [item["index"] for item in ranked] == sorted(candidates, key=lambda t: -float(itc[i, t] + itm[i, t]))
    assert all(len(ranked) == 2 for ranked in out["text_to_image"])


def test_retrieval_top_k_truncates_both_directions(retrieve, images):
    full = retrieve(images, TEXTS, top_k=None)
    top2 = retrieve(images, TEXTS, top_k=2, batch_size=1)
    for direction in ("image_to_text", "text_to_image"):
        assert [[x["index"] for x in ranked] for ranked in top2[direction]] == [
            [x["index"] for x in ranked[:2]] for ranked in full[direction]]
        assert [[x["score"] for x in ranked] for ranked in top2[direction]] == [
            pytest.approx([x["score"] for x in ranked[:2]], abs=1e-5) for ranked in full[direction]]
    assert [len(ranked) for ranked in full["text_to_image"]] == [len(images)] * len(TEXTS)
    assert all(len(ranked) == 5 for ranked in retrieve(images, TEXTS)["image_to_text"])  # default top_k=5


def test_images_alone_give_query_features_and_texts_alone_text_features(retrieve, model, images):
    image_feats = retrieve(images=images, batch_size=2)
    assert isinstance(image_feats, list) and len(image_feats) == len(images)
    assert all(feat.shape == (8, 32) for feat in image_feats)  # (Q, E) of blip2_tiny
    with torch.no_grad():
        expected = model.get_image_features(pixels(model, images))
    torch.testing.assert_close(torch.stack(image_feats), expected, atol=1e-5, rtol=1e-5)
    assert retrieve(images=images[1]).shape == (8, 32)

    text_feats = retrieve(texts=["a red square", "two cats"])
    assert len(text_feats) == 2 and all(feat.shape == (32,) for feat in text_feats)
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(text_feats), text_features(model, ["a red square", "two cats"]),
                                   atol=1e-5, rtol=1e-5)
    single = retrieve(texts="a red square")
    assert single.shape == (32,)
    torch.testing.assert_close(single.norm(), torch.tensor(1.0))


def test_feature_extraction_is_the_retrieval_pipeline(model, images):
    extract = pipeline("feature_extraction", model=model)
    assert isinstance(extract, ImageTextRetrievalPipeline)
    assert extract(images=images[0]).shape == (8, 32)


def test_retrieval_needs_images_or_texts(retrieve):
    with pytest.raises(ValueError, match="needs images, texts or both"):
        retrieve()
    with pytest.raises(ValueError, match="k_test=0"):
        retrieve(texts="a", images=np.zeros((8, 8, 3), dtype=np.uint8), k_test=0)
