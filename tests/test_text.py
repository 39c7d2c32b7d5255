"""Parallel text: sentence files, the Bible pairs, splits, the SentencePiece tokenizer, batches."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from gatezoo.train.data import sword, text
from gatezoo.train.data.images import DataFormatError, DataNotFoundError
from gatezoo.train.data.text import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Split, TextDataError, TokenBatches, Tokenizer


def _sentences(n: int, seed: int = 0) -> list[str]:
    """Short synthetic ASCII sentences of made-up lowercase words."""
    rng = random.Random(seed)
    syllables = "ba be bi bo bu ka ke ki ko ku la le li lo lu ma me mi mo mu na ne ni no nu sa se si so su".split()
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(150)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 8))) for _ in range(n)]


PAIRS = list(zip(_sentences(60, seed=1), _sentences(60, seed=2)))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    corpus = _sentences(300, seed=3)
    return Tokenizer.train(corpus, tmp_path_factory.mktemp("spm") / "joint", vocab_size=100)


# ---------------------------------------------------------------------------------------------
# Files


def test_read_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffone sentence\r\n  two  \nthree café\n".encode())
    assert text.read_lines(path) == ["one sentence", "two", "three café"]
    path.write_bytes(b"no final newline")
    assert text.read_lines(path) == ["no final newline"]


def test_read_lines_errors(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(DataNotFoundError, match="missing.txt"):
        text.read_lines(missing)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(TextDataError, match=r"empty\.txt: the file is empty"):
        text.read_lines(empty)
    assert text.read_lines(empty, allow_empty=True) == []
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nbad \xff\xfe bytes\nfine\n")
    with pytest.raises(TextDataError, match=r"bad\.txt: line 2 is not valid UTF-8"):
        text.read_lines(bad)
    blank = tmp_path / "blank.txt"
    blank.write_bytes(b"one\ntwo\n   \nfour\n")
    with pytest.raises(TextDataError, match=r"blank\.txt: line 3 is empty"):
        text.read_lines(blank)
    assert issubclass(TextDataError, DataFormatError)


def test_read_parallel(tmp_path):
    (tmp_path / "x.src").write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "x.tgt").write_text("A\nB\n", encoding="utf-8")
    assert text.read_parallel(tmp_path / "x.src", tmp_path / "x.tgt") == [("a", "A"), ("b", "B")]
    (tmp_path / "y.tgt").write_text("A\nB\nC\n", encoding="utf-8")
    with pytest.raises(TextDataError, match=r"x\.src has 2 lines but .*y\.tgt has 3"):
        text.read_parallel(tmp_path / "x.src", tmp_path / "y.tgt")


# ---------------------------------------------------------------------------------------------
# Bible pairs


def test_bible_pairs_from_fake_modules(tmp_path):
    en = sword.write_ztext(tmp_path / "en", {"ot": ["", "In the  <w>beginning</w>\n God.", "Only English."],
                                             "nt": ["Jesus\twept."]})
    es = sword.write_ztext(tmp_path / "es", {"ot": ["", "En el principio   Dios.", ""], "nt": [" Jesús lloró. "]})
    assert text.bible_pairs(en, es) == [("In the beginning God.", "En el principio Dios."),
                                        ("Jesus wept.", "Jesús lloró.")]
    with pytest.raises(DataNotFoundError, match="sword-text-kjv"):
        text.bible_pairs(tmp_path / "nowhere", es)


_MODULES = sword.SWORD_ROOT / "modules" / "texts" / "ztext"


@pytest.mark.skipif(not ((_MODULES / sword.KJV).is_dir() and (_MODULES / sword.RV1909).is_dir()),
                    reason="sword-text-kjv / sword-text-sparv not installed")
def test_bible_pairs_real_modules():
    pairs = text.bible_pairs()
    assert len(pairs) == 31150
    assert all(en and es and en == " ".join(en.split()) and es == " ".join(es.split()) for en, es in pairs)
    assert pairs[0] == ("The First Book of Moses, called Genesis", "Génesis")  # book titles are pairs too
    assert pairs[1][0].startswith("In the beginning God created")


# ---------------------------------------------------------------------------------------------
# Splits


def test_split_pairs_sizes_and_determinism():
    split = text.split_pairs(PAIRS, dev=7, test=11, seed=0)
    assert (len(split.train), len(split.dev), len(split.test)) == (42, 7, 11)
    assert split == text.split_pairs(PAIRS, dev=7, test=11, seed=0)
    assert split != text.split_pairs(PAIRS, dev=7, test=11, seed=1)
    index = {pair: i for i, pair in enumerate(PAIRS)}
    parts = [[index[p] for p in part] for part in (split.train, split.dev, split.test)]
    assert sorted(sum(parts, [])) == list(range(len(PAIRS)))  # disjoint and complete
    assert all(part == sorted(part) for part in parts)  # corpus order kept
    assert text.split_pairs(PAIRS, dev=0, test=0).train == PAIRS


def test_split_pairs_too_large():
    with pytest.raises(TextDataError, match=r"dev=20 \+ test=40 = 60 .* of 60"):
        text.split_pairs(PAIRS, dev=20, test=40)
    with pytest.raises(ValueError, match="dev must be a non-negative integer"):
        text.split_pairs(PAIRS, dev=-1)


def test_split_save_load_round_trip(tmp_path):
    split = text.split_pairs(PAIRS, dev=5, test=9, seed=3)
    split.train.append(("ünïcödé sentence", "¿qué tal?"))
    split.save(tmp_path / "data")
    names = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert names == sorted(f"{part}.{side}" for part in ("train", "dev", "test") for side in ("src", "tgt"))
    assert Split.load(tmp_path / "data") == split
    no_dev = Split(train=PAIRS[:3], dev=[], test=PAIRS[3:4])
    no_dev.save(tmp_path / "nodev")
    assert Split.load(tmp_path / "nodev") == no_dev


def test_split_save_rejects_unsavable_sentence(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TextDataError, match=r"Split\.dev\[0\]\[1\]"):
        Split(train=PAIRS[:2], dev=[("fine", "two\nlines")], test=[]).save(out)
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trip(tokenizer, tmp_path):
    assert tokenizer.vocab_size == 100
    assert tokenizer.path.name == "joint.model" and tokenizer.path.with_suffix(".vocab").is_file()
    assert tokenizer.pieces()[:4] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    sentences = _sentences(20, seed=4)
    ids = tokenizer.encode(sentences)
    assert all(ids_ and min(ids_) > EOS_ID for ids_ in ids)  # no specials added (and no <unk> here)
    assert tokenizer.decode(ids) == sentences
    assert tokenizer.encode(sentences[0]) == ids[0] and tokenizer.decode(ids[0]) == sentences[0]
    pieces = tokenizer.encode_pieces(sentences[:2])
    assert [tokenizer.decode_pieces(p) for p in pieces] == sentences[:2]
    raw = [BOS_ID, *ids[0], EOS_ID, *ids[1], PAD_ID]  # a model's output: cut at </s>
    assert tokenizer.decode(raw) == sentences[0]
    assert tokenizer.decode(torch.tensor([[BOS_ID, *ids[1], EOS_ID, PAD_ID]])) == [sentences[1]]
    assert tokenizer.decode([]) == ""
    with pytest.raises(ValueError, match="id 100 is outside"):
        tokenizer.decode([5, 100])
    again = Tokenizer(tokenizer.path)
    assert again.encode(sentences) == ids


def test_tokenizer_training_is_deterministic(tokenizer, tmp_path):
    other = Tokenizer.train(_sentences(300, seed=3), tmp_path / "again", vocab_size=100)
    assert other.path.read_bytes() == tokenizer.path.read_bytes()


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "junk.model").write_bytes(b"junk")
    with pytest.raises(TextDataError, match="junk.model: not a SentencePiece model"):
        Tokenizer(tmp_path / "junk.model")
    with pytest.raises(TextDataError, match="vocab_size=5000 is too large for this corpus") as info:
        Tokenizer.train(_sentences(50), tmp_path / "big", vocab_size=5000)
    assert "Vocabulary size too high" in str(info.value)
    assert list(tmp_path.glob("big*")) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["junk.model"]
    with pytest.raises(ValueError, match="model_type"):
        Tokenizer.train(_sentences(50), tmp_path / "x", model_type="nope")


# ---------------------------------------------------------------------------------------------
# Batches


def test_collate():
    batch = text.collate([[5, 6, 7], [8]], [[9], [10, 11]])
    assert batch.src.tolist() == [[5, 6, 7], [8, PAD_ID, PAD_ID]]
    assert batch.tgt_in.tolist() == [[BOS_ID, 9, PAD_ID], [BOS_ID, 10, 11]]
    assert batch.tgt_out.tolist() == [[9, EOS_ID, PAD_ID], [10, 11, EOS_ID]]
    assert batch.src.dtype == batch.tgt_in.dtype == batch.tgt_out.dtype == torch.long
    assert batch.ntokens == 5 and len(batch) == 2
    moved = batch.to("cpu")
    assert moved is not batch and torch.equal(moved.tgt_out, batch.tgt_out)
    with pytest.raises(ValueError, match="2 source sequences but 1 target"):
        text.collate([[5], [6]], [[7]])


def _examples(n: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Examples whose first source id encodes their index (ids start at 4, past the specials)."""
    rng = random.Random(seed)
    src = [[4 + i] + [5] * rng.randint(0, 30) for i in range(n)]
    tgt = [[6] * rng.randint(1, 30) for _ in range(n)]
    src[7], tgt[7] = [4 + 7] + [5] * 99, [6] * 120  # larger than max_tokens: a batch of its own
    return src, tgt


def _indices(batch: text.Batch) -> list[int]:
    return [row[0] - 4 for row in batch.src.tolist()]


def test_token_batches_cover_every_example_within_budget():
    src, tgt = _examples(200)
    batches = TokenBatches(src, tgt, max_tokens=100, seed=1)
    assert len(batches) == len(batches.batches) and batches.tokens == sum(len(t) + 1 for t in tgt)
    for e in (0, 1):
        seen, ntokens = [], 0
        for batch in batches.epoch(e):
            b, s = batch.src.shape
            t = batch.tgt_in.shape[1]
            assert b * max(s, t) <= 100 or b == 1
            seen += _indices(batch)
            ntokens += batch.ntokens
        assert sorted(seen) == list(range(200))
        assert ntokens == batches.tokens
    assert any(_indices(b) == [7] for b in batches)  # the oversized example, alone


def test_token_batches_order():
    src, tgt = _examples(200)
    a = TokenBatches(src, tgt, max_tokens=100, seed=1)
    b = TokenBatches(src, tgt, max_tokens=100, seed=1)
    runs = {e: [_indices(x) for x in a.epoch(e)] for e in (0, 1)}
    assert runs[0] == [_indices(x) for x in b.epoch(0)]  # same (seed, epoch): same order
    assert runs[0] != runs[1]  # another epoch: another order
    assert sorted(map(tuple, runs[0])) == sorted(map(tuple, runs[1]))  # of the same batches
    assert [_indices(x) for x in a.epoch(1, start=5)] == runs[1][5:]
    assert [_indices(x) for x in a] == runs[0]
    fixed = TokenBatches(src, tgt, max_tokens=100, shuffle=False)
    assert [_indices(x) for x in fixed.epoch(3)] == [[i for i in members] for members in fixed.batches]
    sizes = [max(fixed.sizes[i] for i in members) for members in fixed.batches]
    assert sizes == sorted(sizes)  # bucketed by length


def test_token_batches_max_len():
    src, tgt = _examples(20)
    with pytest.raises(TextDataError, match=r"example 7 is too long for max_len=64: source has 100 tokens, target 120"):
        TokenBatches(src, tgt, max_len=64)
    assert len(TokenBatches(src, tgt, max_len=121)) >= 1
    with pytest.raises(ValueError, match="start must be in"):
        next(TokenBatches(src, tgt).epoch(0, start=10_000))


def test_example_pipeline(tokenizer, tmp_path):
    """The pieces together: split, tokenize, batch."""
    split = text.split_pairs(PAIRS, dev=5, test=5)
    src = tokenizer.encode([s for s, _ in split.train])
    tgt = tokenizer.encode([t for _, t in split.train])
    batch = next(iter(TokenBatches(src, tgt, max_tokens=200)))
    assert batch.src.shape[0] == batch.tgt_in.shape[0] >= 1
    assert Path(tokenizer.path).suffix == ".model"
