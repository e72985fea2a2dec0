"""The image index (``blip2 index`` / ``blip2 search`` / ``blip2.engine.index``): exact search is the brute-force ITC
ranking, faiss keeps recall@10 >= 0.99, builds are incremental and resumable, bad input is one line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from blip2 import Blip2Processor, Blip2Qformer
from blip2.cli.main import main
from blip2.engine import index as index_module
from blip2.engine import index_ann
from blip2.engine.index import ImageIndex, build_index, search
from blip2.files import TEMP_PREFIX
from blip2.models.scoring import encode_texts
from blip2.processing.auto import image_processor_for
from blip2.processing.text import clean_caption

pytestmark = pytest.mark.usefixtures("one_thread")
QUERIES = ["a red bicycle", "Two dogs, on a beach!"]


def save_image(path: Path, seed: int, size: tuple[int, int] = (24, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def image_folder(root: Path, count: int) -> Path:
    """``count`` images in nested folders, a corrupt ``.jpg`` and a text file that is not an image."""
    for number in range(count):
        save_image(root / ("a" if number % 2 else "b/c") / f"img{number}.png", number)
    (root / "a").mkdir(parents=True, exist_ok=True)
    (root / "a" / "broken.jpg").write_bytes(b"not really a jpeg")
    (root / "notes.txt").write_text("skip me")
    return root


@pytest.fixture(scope="module")
def model() -> Blip2Qformer:
    torch.manual_seed(0)
    return Blip2Qformer.from_pretrained("blip2_tiny").eval()


@pytest.fixture(scope="module")
def processor() -> Blip2Processor:
    return Blip2Processor.from_pretrained("blip2_tiny")


def count_embedded(model, monkeypatch) -> list[int]:
    """Batch sizes passed to ``get_image_features`` from now on (what was embedded)."""
    sizes, original = [], model.get_image_features

    def counting(pixel_values, *args, **kwargs):
        sizes.append(len(pixel_values))
        return original(pixel_values, *args, **kwargs)

    monkeypatch.setattr(model, "get_image_features", counting)
    return sizes


def text_features(model, processor, queries) -> torch.Tensor:
    return encode_texts(model, processor.tokenizer, [clean_caption(q) for q in queries], processor.max_length,
                        torch.device("cpu"))[0]


def brute_force(feats: torch.Tensor, text_feats: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's similarity over everything, sorted (stable: ties keep the lower row first)."""
    scores = Blip2Qformer.similarity(feats, text_feats).t()
    values, rows = scores.sort(dim=1, descending=True, stable=True)
    return values[:, :k], rows[:, :k]


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# --- exact search --------------------------------------------------------------------------------------------------
def test_exact_search_equals_the_brute_force_itc_ranking_ties_to_the_lower_row(monkeypatch):
    feats = unit(300, 4, 16, seed=0)
    feats[[10, 200, 250]] = feats[120].clone()  # four images with the same score for every text: ties
    text = torch.cat([unit(5, 16, seed=1), feats[120, 2][None]])  # the last text hits the tied images first
    expected_scores, expected_rows = brute_force(feats, text, 12)
    for chunk in (1 << 21, 7):  # one similarity call, and many chunks
        monkeypatch.setattr(index_ann, "EXACT_CHUNK_VECTORS", chunk)
        scores, rows = index_ann.exact_search(feats, text, 12)
        assert torch.equal(rows, expected_rows) and torch.equal(scores, expected_scores)
    assert rows[-1, :4].tolist() == [10, 120, 200, 250]
    assert index_ann.exact_search(feats, text, 1000)[1].shape == (6, 300)  # k' = min(k, N)


def test_search_ranks_indexed_images_by_the_models_own_itc(model, processor, tmp_path):
    folder = image_folder(tmp_path / "images", 9)
    build_index(model, folder, tmp_path / "idx", batch_size=4, part_size=4, progress=False)
    index = ImageIndex.load(tmp_path / "idx")
    assert len(index) == 9 and index.ids[0] == "a/img1.png" and index.model_name == "blip2_tiny"
    assert not index.large() and not (tmp_path / "idx" / "ann.faiss").exists()  # small: "auto" is exact
    assert index.paths[0] == str((folder / "a/img1.png").resolve())
    pixel_values = image_processor_for(model, "blip2_tiny")([Image.open(p) for p in index.paths])["pixel_values"]
    torch.testing.assert_close(index.feats, model.get_image_features(pixel_values))  # (N, Q, E) query features
    results = search(model, processor, index, QUERIES, k=5, mode="exact")
    expected_scores, expected_rows = brute_force(index.feats, text_features(model, processor, QUERIES), 5)
    for found, rows, scores in zip(results, expected_rows.tolist(), expected_scores.tolist()):
        assert [entry["id"] for entry in found] == [index.ids[row] for row in rows]
        assert [entry["score"] for entry in found] == scores
        assert [entry["rank"] for entry in found] == [1, 2, 3, 4, 5]
    assert search(model, processor.tokenizer, index, QUERIES, k=5, mode="exact") == results  # a bare tokenizer


# --- faiss -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("images, per_image", [(50_000, 1), (2_000, 32)])
def test_faiss_recall_at_10_is_at_least_099_of_exact_on_random_features(images, per_image):
    """Random unit vectors (no structure to exploit: the hard case for approximate search), 50k pooled images and
    2k images with 32 query features each; every score faiss returns is the exact one."""
    feats, text = unit(images, per_image, 256, seed=2), unit(50, 256, seed=3)
    _, exact_rows = index_ann.exact_search(feats, text, 10)
    ann = index_ann.build_ann(feats)
    assert type(ann).__name__ == "IndexPQFastScan"
    scores, rows = index_ann.ann_search(ann, feats, text, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), exact_rows.tolist())])
    assert recall >= 0.99
    # the exact scores (up to float rounding: a matrix product over other rows may round the last bit otherwise)
    torch.testing.assert_close(scores, Blip2Qformer.similarity(feats, text).t().gather(1, rows), rtol=0, atol=1e-6)


def test_a_large_index_is_searched_through_its_saved_faiss_file(model, processor, tmp_path, monkeypatch):
    monkeypatch.setattr(index_module, "ANN_MIN_VECTORS", 5 * 8)  # 5 images of the tiny model's 8 queries
    folder = image_folder(tmp_path / "images", 5)
    result = build_index(model, folder, tmp_path / "idx", part_size=3, progress=False)
    assert result.ann_built and (tmp_path / "idx" / "ann.faiss").is_file()
    index = ImageIndex.load(tmp_path / "idx")
    exact = search(model, processor, index, QUERIES, k=3, mode="exact")
    calls = []
    monkeypatch.setattr(index_ann, "build_ann", lambda feats: calls.append(feats))  # the saved file must serve
    monkeypatch.setattr(index_ann, "exact_search", None)  # and "auto" must take it
    for mode in ("auto", "faiss"):
        found = search(model, processor, index, QUERIES, k=3, mode=mode)
        assert [[entry["id"] for entry in ranking] for ranking in found] == [[e["id"] for e in r] for r in exact]
        assert [entry["score"] for ranking in found for entry in ranking] == pytest.approx(
            [entry["score"] for ranking in exact for entry in ranking], abs=1e-6)
    assert calls == [] and index._ann is not None
    (folder / "a" / "img1.png").unlink()  # drops below the size: the faiss file goes
    monkeypatch.undo()
    monkeypatch.setattr(index_module, "ANN_MIN_VECTORS", 5 * 8)  # 5 images of the tiny model's 8 queries
    assert not build_index(model, folder, tmp_path / "idx", progress=False).ann_built
    assert not (tmp_path / "idx" / "ann.faiss").exists()


def test_without_faiss_a_large_index_stays_exact_and_faiss_mode_says_what_to_install(model, processor, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setattr(index_module, "ANN_MIN_VECTORS", 4 * 8)  # 4 images of the tiny model's 8 queries
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError, as without the index extra
    monkeypatch.setattr(index_ann, "faiss_available", lambda: False)
    folder = image_folder(tmp_path / "images", 4)
    result = build_index(model, folder, tmp_path / "idx", progress=False)
    assert not result.ann_built and not (tmp_path / "idx" / "ann.faiss").exists()
    index = ImageIndex.load(tmp_path / "idx")
    assert index.large()
    exact = search(model, processor, index, QUERIES, k=3, mode="exact")
    assert search(model, processor, index, QUERIES, k=3, mode="auto") == exact
    with pytest.raises(ValueError, match="faiss is not installed: pip install faiss-cpu"):
        search(model, processor, index, QUERIES, k=3, mode="faiss")


# --- building: incremental, resumable ---------------------------------------------------------------------------------
def test_an_incremental_run_embeds_only_new_and_changed_files_and_drops_gone_ones(model, processor, tmp_path,
                                                                                  monkeypatch):
    folder = image_folder(tmp_path / "images", 6)
    first = build_index(model, folder, tmp_path / "idx", batch_size=4, progress=False)
    assert (first.embedded, first.reused, first.unreadable) == (6, 0, ["a/broken.jpg"])
    before = ImageIndex.load(tmp_path / "idx")
    save_image(folder / "new" / "x.png", 100)
    save_image(folder / "new" / "y.png", 101)
    save_image(folder / "b/c/img0.png", 102, size=(30, 26))  # changed: other pixels, other size
    (folder / "a" / "img3.png").unlink()  # gone
    embedded = count_embedded(model, monkeypatch)
    second = build_index(model, folder, tmp_path / "idx", batch_size=4, progress=False)
    assert sum(embedded) == 3 == second.embedded  # the two new files and the changed one, nothing else
    assert (second.reused, second.removed, second.unreadable) == (4, ["a/img3.png"], ["a/broken.jpg"])
    index = ImageIndex.load(tmp_path / "idx")
    assert sorted(index.ids) == sorted(["a/img1.png", "a/img5.png", "b/c/img0.png", "b/c/img2.png", "b/c/img4.png",
                                        "new/x.png", "new/y.png"])
    for image_id in ("a/img1.png", "b/c/img2.png"):  # untouched rows keep their features
        assert torch.equal(index.feats[index.ids.index(image_id)], before.feats[before.ids.index(image_id)])
    fresh = build_index(model, folder, tmp_path / "fresh", batch_size=4, progress=False)
    assert fresh.embedded == 7
    scratch = ImageIndex.load(tmp_path / "fresh")
    for row, image_id in enumerate(scratch.ids):  # the updated index holds what a build from scratch holds
        torch.testing.assert_close(index.feats[index.ids.index(image_id)], scratch.feats[row])
    found = search(model, processor, index, QUERIES, k=20)
    assert all("a/img3.png" not in [entry["id"] for entry in ranking] for ranking in found)  # gone: never returned
    again = build_index(model, folder, tmp_path / "idx", progress=False)
    assert (again.embedded, again.reused, again.parts_written) == (0, 7, [])  # nothing new: nothing written


class Killed(Exception):
    pass


def test_a_killed_run_resumes_without_redoing_finished_parts_and_equals_an_uninterrupted_run(model, tmp_path,
                                                                                           monkeypatch):
    folder = image_folder(tmp_path / "images", 7)
    out = tmp_path / "idx"

    def kill(part):
        raise Killed(part)

    with pytest.raises(Killed):
        build_index(model, folder, out, batch_size=2, part_size=3, progress=False, on_part_written=kill)
    assert json.loads((out / "index.json").read_text())["parts"] == ["part-00000"]
    assert ImageIndex.load(out).ids == ["a/img1.png", "a/img3.png"]  # part 0 (and a/broken.jpg) searchable already
    # a kill in the middle of the next part: its tensors written, its record not, and a temporary file left over
    (out / "part-00001.safetensors").write_bytes(b"half written")
    (out / f"{TEMP_PREFIX}dead-part-00001.json").write_text("{")
    stamp = (out / "part-00000.safetensors").stat().st_mtime_ns
    embedded = count_embedded(model, monkeypatch)
    resumed = build_index(model, folder, out, batch_size=2, part_size=3, progress=False)
    assert sum(embedded) == resumed.embedded == 5 and resumed.reused == 2  # only what the killed run had not done
    assert resumed.unreadable == ["a/broken.jpg"]  # known from part 0, not tried again
    assert (out / "part-00000.safetensors").stat().st_mtime_ns == stamp
    monkeypatch.undo()
    build_index(model, folder, tmp_path / "whole", batch_size=2, part_size=3, progress=False)
    a, b = ImageIndex.load(out), ImageIndex.load(tmp_path / "whole")
    assert a.ids == b.ids and a.paths == b.paths and torch.equal(a.feats, b.feats)
    assert a.header["parts"] == b.header["parts"]


KILLED_BUILD = """
import sys, time, torch
from blip2 import Blip2Qformer
from blip2.engine.index import build_index
torch.set_num_threads(1)
torch.manual_seed(0)
model = Blip2Qformer.from_pretrained("blip2_tiny").eval()
build_index(model, sys.argv[1], sys.argv[2], batch_size=1, part_size=2, progress=False,
            on_part_written=lambda part: time.sleep(0.5))
"""


def test_a_build_killed_with_sigkill_resumes_where_it_stopped(model, tmp_path, monkeypatch):
    folder, out = image_folder(tmp_path / "images", 8), tmp_path / "idx"  # 9 files: 5 parts of 2
    process = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(folder), str(out)])
    deadline = time.monotonic() + 120

    def parts_recorded() -> int:  # index.json is replaced atomically: never read half written
        header = out / "index.json"
        return len(json.loads(header.read_text())["parts"]) if header.exists() else 0

    # kill once two parts are recorded in index.json (the part files come first: waiting for them raced the header)
    while parts_recorded() < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    done = json.loads((out / "index.json").read_text())["parts"]
    assert 2 <= len(done) < 5, done  # killed part-way
    finished = ImageIndex.load(out)
    embedded = count_embedded(model, monkeypatch)
    resumed = build_index(model, folder, out, batch_size=1, part_size=2, progress=False)
    assert sum(embedded) == resumed.embedded == 8 - len(finished) and resumed.reused == len(finished)
    monkeypatch.undo()
    build_index(model, folder, tmp_path / "whole", batch_size=1, part_size=2, progress=False)
    a, b = ImageIndex.load(out), ImageIndex.load(tmp_path / "whole")
    assert a.ids == b.ids and a.paths == b.paths and a.header["parts"] == b.header["parts"]
    torch.testing.assert_close(a.feats, b.feats)  # another process: equal up to its own float rounding


def test_tar_shards_are_indexed_member_by_member(model, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(2):
        with tarfile.open(shards / f"shard-{shard:06d}.tar", "w") as tar:
            for number in range(2):
                key = f"{shard * 2 + number:09d}"
                buffer = io.BytesIO()
                Image.fromarray(np.full((20, 24, 3), 40 * (shard * 2 + number), np.uint8)).save(buffer, "JPEG")
                for name, data in ((f"{key}.jpg", buffer.getvalue()), (f"{key}.txt", b"a caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    result = build_index(model, shards, tmp_path / "idx", pooled=True, progress=False)
    assert result.embedded == 4 and not result.unreadable
    index = ImageIndex.load(tmp_path / "idx")
    assert index.ids[:2] == ["shard-000000.tar#000000000.jpg", "shard-000000.tar#000000001.jpg"]
    assert index.paths[3] == f"{(shards / 'shard-000001.tar').resolve()}#000000003.jpg"
    image = index.open_image(3)
    assert image.size == (24, 20) and image.getpixel((0, 0))[0] in range(115, 126)
    pixel_values = image_processor_for(model, "blip2_tiny")([index.open_image(row) for row in range(4)])
    pooled = F.normalize(model.get_image_features(pixel_values["pixel_values"]).mean(1), dim=-1)
    assert index.feats.shape == (4, 1, 32)  # "pooled": one normalized mean of the query features per image
    torch.testing.assert_close(index.feats[:, 0], pooled)


def test_rerank_scores_the_top_k_by_itc_plus_the_itm_match_logit(model, processor, tmp_path):
    folder = image_folder(tmp_path / "images", 5)
    build_index(model, folder, tmp_path / "idx", progress=False)
    index = ImageIndex.load(tmp_path / "idx")
    plain = search(model, processor, index, QUERIES[:1], k=3)[0]
    reranked = search(model, processor, index, QUERIES[:1], k=3, rerank=True)[0]
    assert sorted(entry["id"] for entry in reranked) == sorted(entry["id"] for entry in plain)
    tokens = processor.tokenizer([clean_caption(QUERIES[0])] * 3, padding="max_length", truncation=True,
                                 max_length=processor.max_length, return_tensors="pt")
    images = [Image.open(entry["path"]) for entry in reranked]
    pixel_values = image_processor_for(model, "blip2_tiny")(images)["pixel_values"]
    itm = model.itm_logits(pixel_values, tokens["input_ids"], tokens["attention_mask"])[:, 1]
    itc = {entry["id"]: entry["score"] for entry in plain}
    for entry, match in zip(reranked, itm.tolist()):
        assert entry["itc"] == itc[entry["id"]] and entry["itm"] == pytest.approx(match, abs=1e-5)
        assert entry["score"] == entry["itc"] + entry["itm"]
    assert [entry["score"] for entry in reranked] == sorted((entry["score"] for entry in reranked), reverse=True)


# --- refusals ---------------------------------------------------------------------------------------------------------
def test_an_index_refuses_another_model_another_kind_another_source_and_a_foreign_folder(model, tmp_path):
    folder = image_folder(tmp_path / "images", 2)
    build_index(model, folder, tmp_path / "idx", progress=False)
    torch.manual_seed(1)
    other = Blip2Qformer.from_pretrained("blip2_tiny").eval()
    with pytest.raises(ValueError, match="other weights"):
        build_index(other, folder, tmp_path / "idx", progress=False)
    with pytest.raises(ValueError, match="holds queries features, not pooled"):
        build_index(model, folder, tmp_path / "idx", pooled=True, progress=False)
    with pytest.raises(ValueError, match="indexes .*images, not"):
        build_index(model, image_folder(tmp_path / "more", 1), tmp_path / "idx", progress=False)
    with pytest.raises(ValueError, match="other weights"):
        search(other, Blip2Processor.from_pretrained("blip2_tiny"), ImageIndex.load(tmp_path / "idx"), ["x"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.pdf").write_text("keep")
    with pytest.raises(FileExistsError, match="thesis.pdf"):
        build_index(model, folder, tmp_path / "mine", progress=False)
    assert sorted(os.listdir(tmp_path / "mine")) == ["thesis.pdf"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_index_then_search(tmp_path, capsys):
    folder = image_folder(tmp_path / "images", 3)
    status, out, err = run_cli(capsys, "index", str(folder), "--model", "blip2_tiny", "--output", str(tmp_path / "idx"),
                               "--device", "cpu")
    assert status == 0 and "4 images: 3 embedded now, 0 already indexed, 1 unreadable" in out
    assert "skipped 1 unreadable images: a/broken.jpg" in err
    status, out, _ = run_cli(capsys, "index", str(folder), "--output", str(tmp_path / "idx"))  # the recorded model
    assert status == 0 and "0 embedded now, 3 already indexed" in out
    status, out, _ = run_cli(capsys, "search", str(tmp_path / "idx"), "a red bicycle", "-k", "2", "--json")
    found = json.loads(out)
    assert status == 0 and found[0]["query"] == "a red bicycle" and len(found[0]["results"]) == 2
    status, out, _ = run_cli(capsys, "search", str(tmp_path / "idx"), "a red bicycle", "--rerank")
    assert status == 0 and out.splitlines()[1].split() == ["rank", "score", "itc", "itm", "id"]
    assert len(out.splitlines()) == 2 + 3


@pytest.mark.parametrize("argv, expected", [
    (["search", "{tmp}/missing", "x"], "index folder .*missing does not exist"),
    (["search", "{tmp}/images", "x"], "is not an image index: it has no index.json"),
    (["search", "{tmp}/idx", "x", "--seed", "1"], "built with model blip2_tiny .* other weights"),
    (["search", "{tmp}/idx", "x", "-k", "0"], "-k must be >= 1"),
    (["index", "{tmp}/missing", "--model", "blip2_tiny", "--output", "{tmp}/new"], "image source .* does not exist"),
    (["index", "{tmp}/images", "--output", "{tmp}/new"], "--model is required"),
    (["index", "{tmp}/images", "--model", "blip2_tiny", "--output", "{tmp}/idx", "--pooled"], "not pooled"),
    (["index", "{tmp}/images", "--model", "blip2_tiny", "--output", "{tmp}/images"], "did not write"),
])
def test_cli_reports_bad_input_in_one_line(tmp_path, capsys, argv, expected):
    import re

    folder = image_folder(tmp_path / "images", 1)
    assert main(["index", str(folder), "--model", "blip2_tiny", "--output", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    listing = sorted(os.listdir(tmp_path / "idx"))
    status, _, err = run_cli(capsys, *[arg.replace("{tmp}", str(tmp_path)) for arg in argv])
    assert status == 2 and len(err.strip().splitlines()) == 1 and err.startswith("blip2: error: ")
    assert re.search(expected, err), err
    assert sorted(os.listdir(tmp_path / "idx")) == listing and not (tmp_path / "new").exists()
