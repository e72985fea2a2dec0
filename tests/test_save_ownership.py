"""Issue 10, item 3: saving never loses a user's files.

A save writes only the files blip2 owns (``blip2.files.OWN_FILES``), each atomically; a folder holding other
files is refused unless ``overwrite=True`` (which still keeps them), and an output that is a regular file is refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blip2 import Blip2Processor, Blip2Qformer
from blip2 import files
from blip2.weights import loader
from blip2.cli.convert import main as convert
from tests.helpers import tiny_config
from weights_fixtures import build_hf_retrieval


@pytest.fixture(scope="module")
def model() -> Blip2Qformer:
    torch.manual_seed(0)
    return Blip2Qformer(tiny_config()).eval()


def _user_folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("my notes")
    return path


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(value, b.state_dict()[key]) for key, value in a.state_dict().items())


def test_item03_folder_with_user_files_is_refused_and_kept(model, tmp_path: Path) -> None:
    folder = _user_folder(tmp_path / "out")
    with pytest.raises(files.OutputFolderError, match=r"holds files blip2 did not write \(notes\.txt\)") as info:
        model.save_pretrained(folder)
    assert str(folder) in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "my notes"


def test_item03_overwrite_writes_our_files_and_keeps_the_users(model, tmp_path: Path) -> None:
    folder = _user_folder(tmp_path / "out")
    model.save_pretrained(folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "model.safetensors", "notes.txt"]
    assert (folder / "notes.txt").read_text() == "my notes"
    assert _same_weights(Blip2Qformer.from_pretrained(folder), model)


@pytest.mark.parametrize("overwrite", [False, True])
def test_item03_output_that_is_a_file_is_refused_and_kept(model, tmp_path: Path, overwrite: bool) -> None:
    target = tmp_path / "out"
    target.write_text("a file of mine")
    with pytest.raises(files.OutputFolderError, match=r"out is a file, not a folder") as info:
        model.save_pretrained(target, overwrite=overwrite)
    assert "\n" not in str(info.value)
    assert target.read_text() == "a file of mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.old, no staging folder


def test_item03_resaving_into_our_own_folder_updates_it_in_place(model, tmp_path: Path) -> None:
    """As ``Trainer.save_model`` does on a second run into the same output_dir: model + processor files."""
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    Blip2Processor.from_pretrained("blip2_tiny").save_pretrained(folder)
    torch.manual_seed(1)
    other = Blip2Qformer(tiny_config()).eval()
    other.save_pretrained(folder)
    Blip2Processor.from_pretrained("blip2_tiny").save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.yaml", "model.safetensors", "preprocessor_config.json", "vocab.txt"]
    assert _same_weights(Blip2Qformer.from_pretrained(folder), other)
    empty = tmp_path / "empty"
    empty.mkdir()
    model.save_pretrained(empty)
    assert sorted(p.name for p in empty.iterdir()) == ["config.yaml", "model.safetensors"]


def test_item03_processor_refuses_a_folder_of_user_files(tmp_path: Path) -> None:
    folder = _user_folder(tmp_path / "out")
    processor = Blip2Processor.from_pretrained("blip2_tiny")
    with pytest.raises(files.OutputFolderError, match="notes.txt"):
        processor.save_pretrained(folder)
    processor.save_pretrained(folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "preprocessor_config.json", "vocab.txt"]


def test_item03_a_crash_while_saving_leaves_the_old_files_whole(model, tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def crash(state, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(loader, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporary file left either


def test_item03_every_file_a_save_writes_is_listed_as_ours(model, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    Blip2Processor.from_pretrained("blip2_tiny").save_pretrained(folder)
    assert {p.name for p in folder.iterdir()} <= files.OWN_FILES
    assert files.foreign_entries(folder) == []


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf_itm")
    build_hf_retrieval().save_pretrained(folder)
    return folder


def test_item03_convert_onto_a_user_folder_is_one_line_and_exit_2(hf_folder, tmp_path: Path, capsys) -> None:
    folder = _user_folder(tmp_path / "out")
    code = convert(["--from", "hf", "--input", str(hf_folder), "--output", str(folder)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(folder) in err and "notes.txt" in err and "--overwrite" in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    code = convert(["--from", "hf", "--input", str(hf_folder), "--output", str(folder), "--overwrite"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "model.safetensors", "notes.txt"]
    assert (folder / "notes.txt").read_text() == "my notes"


def test_item03_stage2_model_and_generation_processor_keep_user_files(tmp_path: Path) -> None:
    from blip2 import Blip2ImageToTextGeneration
    from blip2.processing.llm_tokenizer import load_llm_tokenizer
    from blip2.processing import Blip2GenerationProcessor, Blip2ImageProcessor
    from llm_fixtures import VOCAB, write_byte_level_bpe

    llama = {"model_type": "llama", "hidden_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
             "intermediate_size": 37, "vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    torch.manual_seed(0)
    model = Blip2ImageToTextGeneration(tiny_config(text_config=llama))
    processor = Blip2GenerationProcessor(Blip2ImageProcessor(30), load_llm_tokenizer(write_byte_level_bpe(
        tmp_path / "bpe", as_tokenizer_json=True)))
    folder = _user_folder(tmp_path / "out")
    with pytest.raises(files.OutputFolderError, match="notes.txt"):
        model.save_pretrained(folder, include_llm=True)
    with pytest.raises(files.OutputFolderError, match="notes.txt"):
        processor.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    for _ in range(2):  # the second time over our own files
        model.save_pretrained(folder, include_llm=True, overwrite=True)
        processor.save_pretrained(folder, overwrite=True)
    names = sorted(p.name for p in folder.iterdir())
    assert "notes.txt" in names and "tokenizer.json" in names and "preprocessor_config.json" in names, names
    assert files.foreign_entries(folder) == ["notes.txt"]
    assert load_llm_tokenizer(folder).get_vocab() == processor.tokenizer.get_vocab()


@pytest.mark.parametrize("saver", ["config", "image_processor"])
def test_item03_config_and_image_processor_saves_respect_the_users_folder(model, tmp_path: Path, saver: str) -> None:
    from blip2.processing import Blip2ImageProcessor

    save = (model.config.save_pretrained if saver == "config"
            else Blip2ImageProcessor(30, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)).save_pretrained)
    folder = _user_folder(tmp_path / "out")
    with pytest.raises(files.OutputFolderError, match="notes.txt"):
        save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    save(folder, overwrite=True)
    written = {"config": "config.yaml", "image_processor": "preprocessor_config.json"}[saver]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["notes.txt", written])
    assert (folder / "notes.txt").read_text() == "my notes"


def test_item03_a_full_disk_is_one_line_and_keeps_the_old_files(model, tmp_path: Path, monkeypatch) -> None:
    import errno

    folder = tmp_path / "model"
    model.save_pretrained(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loader, "save_file", full)
    with pytest.raises(files.OutputWriteError, match=r"could not write .*model: no space left on device") as info:
        model.save_pretrained(folder)
    assert "\n" not in str(info.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
