"""data.py: the WikiText download (sha256, cache, offline), variants, vocabulary, batches, windows.

Run: python -m pytest tests/test_data.py -q
"""

import hashlib
import urllib.error
import urllib.request
import zipfile

import pytest
import torch

import data
from conftest import SHARED_DATA
from eemini import EEminiError


class FakeResponse:
    def __init__(self, blob):
        self.blob = blob

    def read(self):
        return self.blob

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def fake_wikitext_zip(tmp_path):
    path = tmp_path / "fake.zip"
    with zipfile.ZipFile(path, "w") as z:
        for split in ("train", "valid", "test"):
            z.writestr(f"wikitext-2-raw/wiki.{split}.raw", f" = {split} = \n some text \n")
    return path.read_bytes()


def test_download_is_checked_and_unpacked_once(tmp_path, monkeypatch):
    blob = fake_wikitext_zip(tmp_path)
    calls = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: calls.append(url) or FakeResponse(blob))
    with pytest.raises(EEminiError, match="failed its sha256 check"):
        data.download_wikitext(tmp_path / "cache")
    assert not (tmp_path / "cache" / "wikitext-2-raw").exists()
    monkeypatch.setattr(data, "WIKITEXT_SHA256", hashlib.sha256(blob).hexdigest())
    folder = data.download_wikitext(tmp_path / "cache")
    assert data.read_split(folder, "valid")[0] == " = valid = \n some text \n"
    assert data.download_wikitext(tmp_path / "cache") == folder and len(calls) == 2  # cached: no third fetch


def test_offline_download_is_one_clear_error(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(EEminiError, match="could not download WikiText-2.*pass --data"):
        data.download_wikitext(tmp_path / "cache")


def test_folder_with_both_variants_reads_raw_for_every_split(wiki_folder):
    for split in ("train", "valid", "test"):
        (wiki_folder / f"wiki.{split}.tokens").write_text("<unk> " * 50)
    for split in ("train", "valid", "test"):
        text, source = data.read_split(wiki_folder, split)
        assert source.endswith(f"wiki.{split}.raw") and "<unk>" not in text
    for split in ("train", "valid", "test"):
        (wiki_folder / f"wiki.{split}.raw").unlink()
    assert data.read_split(wiki_folder, "valid")[1].endswith("wiki.valid.tokens")


def test_a_folder_missing_a_split_names_that_file(wiki_folder):
    (wiki_folder / "wiki.valid.raw").rename(wiki_folder / "wiki.valid.tokens")  # train .raw, valid .tokens
    with pytest.raises(EEminiError, match=r"has wiki\.train\.raw, wiki\.valid\.tokens: give these splits in one"):
        data.read_split(wiki_folder, "train")
    (wiki_folder / "wiki.valid.tokens").unlink()
    with pytest.raises(EEminiError, match=r"has no wiki\.valid\.raw \(nor \.tokens\)"):  # not wiki.train.raw
        data.read_split(wiki_folder, "train")
    (wiki_folder / "wiki.valid.raw").write_text("a valid split\n" * 20)
    (wiki_folder / "wiki.test.raw").unlink()
    with pytest.raises(EEminiError, match=r"has no wiki\.test\.raw"):
        data.read_split(wiki_folder, "test")


def test_single_file_is_cut_90_10_and_has_no_test_split(text_file):
    whole = text_file.read_text()
    train, _ = data.read_split(text_file, "train")
    valid, _ = data.read_split(text_file, "valid")
    assert train + valid == whole and len(train) == int(len(whole) * 0.9)
    with pytest.raises(EEminiError, match="no test split"):
        data.read_split(text_file, "test")


def test_vocab_reserves_id_0_for_unseen_characters():
    vocab = data.Vocab.from_text("abca")
    assert vocab.itos == [data.UNK, "a", "b", "c"]
    assert vocab.encode("cab?").tolist() == [3, 1, 2, 0] and vocab.decode([1, 2, 3]) == "abc"


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data/wikitext-2")
def test_wikitext_loads_raw_variant_and_counts_unknowns():
    vocab, train_ids, val_ids = data.load_data(SHARED_DATA, 500_000, 50_000)
    assert len(train_ids) == 500_000 and len(val_ids) == 50_000
    assert (val_ids == 0).sum().item() == 11  # 11 validation characters never occur in train
    assert vocab.decode(train_ids[:30].tolist()).startswith(" \n = Valkyria Chronicles III")


def test_batches_are_windows_of_the_text_and_their_next_characters():
    text = torch.arange(1000)
    g = torch.Generator().manual_seed(1)
    x, y = data.get_batch(text, 8, 4, g, "cpu")
    starts = torch.randint(1000 - 8 - 1, (4,), generator=torch.Generator().manual_seed(1))  # the same draw
    for row, s in zip(x, starts):
        assert row.tolist() == list(range(s, s + 8))
    assert torch.equal(y, x + 1)


def test_eval_windows_cover_the_text_once_in_order():
    text = torch.arange(50)
    xs, ys = zip(*data.eval_windows(text, 8, 4))
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (6, 8) and x.flatten().tolist() == list(range(48)) and torch.equal(y, x + 1)
    with pytest.raises(EEminiError, match="shorter than one window"):
        next(data.eval_windows(torch.arange(8), 8, 4))
