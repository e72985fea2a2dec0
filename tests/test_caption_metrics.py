"""Caption metrics against the COCO caption toolkit (pycocoevalcap 1.2).

The ORACLE numbers were computed with pycocoevalcap's own Bleu, Rouge and Cider classes on the generated caption sets
and are pinned here, so those tests run (and can fail) without pycocoevalcap. Where it is installed the numbers are also
recomputed live, and where Java is on the PATH too, our tokenizer and the whole pipeline are checked against its
Stanford PTBTokenizer jar.
"""

from __future__ import annotations

import math
import random
import shutil

import pytest

from blip2.engine.caption_metrics import (PUNCTUATIONS, bleu, caption_metrics, cider, ptb_tokenize,
                                          ptb_tokenize_batch, rouge_l)

_VOCAB = ("a", "an", "the", "man", "woman", "dog", "cat", "on", "in", "with", "of", "riding", "sitting", "table", "red",
          "blue", "small", "two", "people", "street", "next", "to", "horse", "pizza")


def _pick(rng: random.Random, items):
    # only Random.random(): its stream is fixed across Python versions, so the pinned oracle numbers stay valid
    return items[int(rng.random() * len(items))]


def _sentence(rng: random.Random, length: int) -> str:
    return " ".join(_pick(rng, _VOCAB) for _ in range(length))


def caption_sets(seed: int, images: int = 50) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Tokenised references (1 to 7 per image) and candidates of every quality: copies of a reference, references with
    words dropped, random sentences, empty captions and a repeated word (n-gram clipping)."""
    rng = random.Random(seed)
    references, candidates = {}, {}
    for image in range(images):
        refs = [_sentence(rng, 3 + int(rng.random() * 10)) for _ in range(1 + int(rng.random() * 7))]
        quality = rng.random()
        if quality < 0.15:
            candidate = refs[0]
        elif quality < 0.45:
            words = _pick(rng, refs).split()
            candidate = " ".join([word for word in words if rng.random() > 0.25] or words[:1])
        elif quality < 0.9:
            candidate = _sentence(rng, 1 + int(rng.random() * 14))
        elif quality < 0.95:
            candidate = ""
        else:
            candidate = " ".join([_pick(rng, _VOCAB)] * (2 + int(rng.random() * 4)))
        references[f"img{image}"] = refs
        candidates[f"img{image}"] = candidate
    return references, candidates


# pycocoevalcap 1.2: Bleu(4).compute_score(gts, res, verbose=0), Rouge().compute_score, Cider().compute_score on
# caption_sets(seed) with gts = references and res = {id: [candidate]}
ORACLE = {
    0: {"Bleu_1": 0.6113370287232522, "Bleu_2": 0.4399048801712222, "Bleu_3": 0.3635281459472529,
        "Bleu_4": 0.3219269390917838, "ROUGE_L": 0.5069669109881283, "CIDEr": 1.215963187078382},
    1: {"Bleu_1": 0.7224929784235327, "Bleu_2": 0.5461107012223408, "Bleu_3": 0.4684008631302239,
        "Bleu_4": 0.42524004411828115, "ROUGE_L": 0.535674396975703, "CIDEr": 1.9020308307035831},
    2: {"Bleu_1": 0.7446021774660383, "Bleu_2": 0.5610404857402391, "Bleu_3": 0.480725579745932,
        "Bleu_4": 0.44130938279788295, "ROUGE_L": 0.493437921690043, "CIDEr": 1.2314473796893095},
}


def _close(a: float, b: float, tol: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=0.0, abs_tol=tol)


@pytest.mark.parametrize("seed", sorted(ORACLE))
def test_bleu_rouge_cider_match_pinned_pycocoevalcap_numbers(seed):
    references, candidates = caption_sets(seed)
    expected = ORACLE[seed]
    got = dict(bleu(references, candidates), ROUGE_L=rouge_l(references, candidates),
               CIDEr=cider(references, candidates))
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert _close(got[name], value), (name, got[name], value)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_bleu_rouge_cider_match_pycocoevalcap_live(seed):
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    references, candidates = caption_sets(seed, images=30 + 10 * seed)
    gts = {i: list(refs) for i, refs in references.items()}
    res = {i: [candidate] for i, candidate in candidates.items()}
    bleu_scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    ours = bleu(references, candidates)
    for k in range(4):
        assert _close(ours[f"Bleu_{k + 1}"], bleu_scores[k])
    assert _close(rouge_l(references, candidates), float(Rouge().compute_score(gts, res)[0]))
    assert _close(cider(references, candidates), float(Cider().compute_score(gts, res)[0]))


def test_bleu_by_hand_on_one_pair():
    # candidate n-grams matched: 5/6 unigrams, 3/5 bigrams, 1/4 trigrams, 0/3 4-grams; equal lengths, no penalty
    scores = bleu({0: ["the cat is on the mat"]}, {0: "the cat sat on the mat"})
    assert _close(scores["Bleu_1"], 5 / 6)
    assert _close(scores["Bleu_2"], math.sqrt(5 / 6 * 3 / 5))
    assert _close(scores["Bleu_3"], 0.5)
    assert 0 < scores["Bleu_4"] < 1e-3  # pycocoevalcap's 1e-15 / 1e-9 guards: tiny, not zero


def test_bleu_brevity_penalty_uses_the_closest_reference_length_and_the_shorter_on_a_tie():
    short = bleu({0: ["the cat is on the mat"]}, {0: "the cat"})
    assert _close(short["Bleu_1"], math.exp(1 - 6 / 2))
    # a 5-word candidate is 2 words from both a 3-word and a 7-word reference: "closest" takes 3, so no penalty
    tie = bleu({0: ["a b c", "a b c d e f g"]}, {0: "a b c d e"})
    assert _close(tie["Bleu_1"], 1.0)


def test_a_perfect_candidate_scores_bleu_1_and_cider_10():
    captions = ["a man riding a brown horse", "two dogs playing in the snow", "a red bus on a city street"]
    references = {i: [caption] * 5 for i, caption in enumerate(captions)}
    candidates = dict(enumerate(captions))
    assert _close(bleu(references, candidates)["Bleu_4"], 1.0)
    assert _close(cider(references, candidates), 10.0)
    assert _close(rouge_l(references, candidates), 1.0)


def test_cider_is_zero_for_a_single_image():
    # every n-gram's document frequency equals the number of images, so every idf weight is log(1) - log(1) = 0
    assert cider({0: ["a man riding a horse"]}, {0: "a man riding a horse"}) == 0.0


def test_rouge_l_by_hand():
    # LCS "a c d" = 3: precision 3/4, recall 3/5, F with beta 1.2
    precision, recall, beta2 = 3 / 4, 3 / 5, 1.2 ** 2
    expected = (1 + beta2) * precision * recall / (recall + beta2 * precision)
    assert _close(rouge_l({0: ["a x c d y"]}, {0: "a b c d"}), expected)


def test_rouge_l_splits_on_single_spaces_as_pycocoevalcap():
    # "a  b" is three tokens, "a", "" and "b": LCS 2 with "a b", precision 2/3, recall 1
    precision, recall, beta2 = 2 / 3, 1.0, 1.2 ** 2
    expected = (1 + beta2) * precision * recall / (recall + beta2 * precision)
    assert _close(rouge_l({0: ["a b"]}, {0: "a  b"}), expected)


@pytest.mark.parametrize("text, expected", [
    # expectations are the output of pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1) on the same strings
    ("A man riding a horse.", "a man riding a horse"),
    ("Two dogs, a cat; and a bird: all outside!", "two dogs a cat and a bird all outside"),
    ("A MAN'S hat and the dogs' bowls.", "a man 's hat and the dogs bowls"),
    ("He can't, she won't, they cannot and it isn't.", "he ca n't she wo n't they can not and it is n't"),
    ("I'm gonna wanna see it.", "i 'm gon na wan na see it"),
    ('A sign that says "STOP" on it.', "a sign that says stop on it"),
    ("A sign that says \u2018stop\u2019 and \u201cgo\u201d.", "a sign that says stop and go"),
    # pycocoevalcap lists "-LRB-" but compares after lowercasing, so brackets stay in as -lrb- etc.
    ("A cat (small) on a [red] mat {really}.", "a cat -lrb- small -rrb- on a -lsb- red -rsb- mat -lcb- really -rcb-"),
    ("A black-and-white photo of a 3-year-old in a t-shirt.", "a black-and-white photo of a 3-year-old in a t-shirt"),
    ("A man -- or a woman \u2014 walking - slowly...", "a man or a woman walking slowly"),
    ("A train going\u2026 fast!!! Really?!", "a train going fast !!! really ?!"),
    ("Mr. Smith and Dr. Jones on St. Patrick's day, etc.", "mr. smith and dr. jones on st. patrick 's day etc."),
    ("A bus in the U.S. at 3:30 p.m.", "a bus in the u.s. at 3:30 p.m."),
    ("It costs $5.50, 5% of 1,000 dollars.", "it costs $ 5.50 5 % of 1,000 dollars"),
    ("Half (\u00bd) a pizza & a salad &amp; a drink", "half -lrb- 1/2 -rrb- a pizza & a salad & a drink"),
    ("a   dog\tin  the park", "a dog in the park"),
    ("the letter a. The end", "the letter a the end"),
    ("A woman at the Mall, wearing a hat.  ", "a woman at the mall wearing a hat"),
    ("...", ""),
    ("", ""),
])
def test_ptb_tokenize_matches_the_coco_tokenizer(text, expected):
    assert ptb_tokenize(text) == expected


def test_ptb_tokenize_batch_reads_across_captions_as_the_jar_does():
    # "a." before a capitalised sentence start on the next line is the letter and a period; before "the", an initial
    assert ptb_tokenize_batch(["the letter a.", "The next caption"]) == ["the letter a", "the next caption"]
    assert ptb_tokenize_batch(["the letter a.", "the next caption"]) == ["the letter a.", "the next caption"]
    assert ptb_tokenize("the letter a.") == "the letter a."


def test_ptb_tokenize_batch_keeps_one_line_per_caption():
    captions = ["A dog.", "", "two\nlines here", "...", "A cat!"]
    assert ptb_tokenize_batch(captions) == ["a dog", "", "two lines here", "", "a cat"]


def test_punctuations_are_pycocoevalcaps_list():
    assert PUNCTUATIONS == {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                            "--", "...", ";"}


def test_caption_metrics_tokenizes_and_reports_raw_coco_numbers():
    references = {1: ["A man riding a horse.", "A person on a horse!"],
                  2: ["Two dogs play in the snow.", "Dogs, snow."],
                  3: ["A red bus on a street.", "A bus parked outside."]}
    candidates = {1: "a man riding a horse", 2: "Two dogs playing in the SNOW", 3: "a bus"}
    scores = caption_metrics(references, candidates)
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr", "agg_metrics"}
    tokenized_refs = {i: [ptb_tokenize(r) for r in refs] for i, refs in references.items()}
    tokenized_cands = {i: ptb_tokenize(c) for i, c in candidates.items()}
    assert scores == caption_metrics(tokenized_refs, tokenized_cands, tokenize=False)
    assert scores["CIDEr"] == cider(tokenized_refs, tokenized_cands)
    assert scores["agg_metrics"] == scores["CIDEr"] + scores["Bleu_4"]
    assert 0 < scores["Bleu_1"] <= 1  # raw fractions, not percent


def test_mismatched_ids_are_named():
    with pytest.raises(ValueError, match=r"references but no candidate: 'b'.*a candidate but no references: 'z'"):
        caption_metrics({"a": ["x y"], "b": ["x y"]}, {"a": "x y", "z": "x y"})
    with pytest.raises(ValueError, match=r"references but no candidate: 0, 1, 2, 3, 4, \.\.\. \(7 in all\)"):
        bleu({i: ["x"] for i in range(7)}, {})


def test_an_empty_reference_list_is_named():
    with pytest.raises(ValueError, match=r"empty reference list for ids: 'b'"):
        cider({"a": ["x y"], "b": []}, {"a": "x y", "b": "x"})


def test_nothing_to_evaluate_raises():
    with pytest.raises(ValueError, match="no captions to evaluate"):
        caption_metrics({}, {})


def test_wrong_caption_types_are_named():
    with pytest.raises(TypeError, match=r"one caption \(str\); not so for ids: 'a'"):
        bleu({"a": ["x y"]}, {"a": ["x y"]})
    with pytest.raises(TypeError, match=r"list of str; not so for ids: 'a'"):
        rouge_l({"a": "x y"}, {"a": "x y"})


# ---- against the Stanford PTBTokenizer jar itself, where pycocoevalcap and Java are installed ----------------------

_TRICKY_CAPTIONS = [
    "A man's (red) hat, isn't it?", "THE DOG'S BOWL.", "A \"quoted\" sign -- and a dash\u2014here...", "It's 5:30 p.m.",
    "A café in São Paulo\u2026", "Two people; one dog: no cat!", "a 3-year-old's x-ray, etc.", "the letter a.",
    "The U.S. flag", "Mr. Smith's dog", "he cannot go", "a sign that says 'STOP' on it", "1/2 cup and 3 1/2 cups",
    "a    b", "", "rock'n'roll at o'clock", "Y'all gonna see", "cats/dogs & birds", "$5.00 or \u00a35", "a ;) smile",
]


def _java_ptb_tokenizer():
    pytest.importorskip("pycocoevalcap")
    if shutil.which("java") is None:
        pytest.skip("the Stanford PTBTokenizer needs Java")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    return PTBTokenizer()


def test_ptb_tokenize_matches_the_java_tokenizer_on_tricky_captions():
    tokenizer = _java_ptb_tokenizer()
    rng = random.Random(0)
    captions = _TRICKY_CAPTIONS + [" ".join(_pick(rng, _TRICKY_CAPTIONS).split()[:3]).capitalize() for _ in range(40)]
    java = tokenizer.tokenize({0: [{"caption": caption} for caption in captions]})[0]
    assert ptb_tokenize_batch(captions) == java


def test_caption_metrics_matches_coco_eval_end_to_end():
    tokenizer = _java_ptb_tokenizer()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    rng = random.Random(1)
    references = {i: [_pick(rng, _TRICKY_CAPTIONS) + " " + _sentence(rng, 4).capitalize() + "." for _ in range(5)]
                  for i in range(20)}
    candidates = {i: _pick(rng, references[i]).lower() if rng.random() < 0.5 else _sentence(rng, 6) for i in range(20)}
    # COCOEvalCap.evaluate: tokenise gts and res, then score
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in candidates.items()})
    ours = caption_metrics(references, candidates)
    for k, value in enumerate(Bleu(4).compute_score(gts, res, verbose=0)[0]):
        assert _close(ours[f"Bleu_{k + 1}"], value)
    assert _close(ours["ROUGE_L"], float(Rouge().compute_score(gts, res)[0]))
    assert _close(ours["CIDEr"], float(Cider().compute_score(gts, res)[0]))
