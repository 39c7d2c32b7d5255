"""Parallel text for machine translation: files, the Bible corpus, splits, a tokenizer and batches.

The pieces, in the order a translation trainer uses them:

- :func:`read_lines` / :func:`read_parallel`: UTF-8 files with one sentence per line (``train.src``
  next to ``train.tgt``); ``\n``, ``\r\n`` and a bare ``\r`` (old Mac files) all end a line
  (:func:`decode_lines`, which the translate command uses for stdin too). A missing file raises
  :class:`~gatezoo.train.data.images.DataNotFoundError`, a bad one (empty, not UTF-8, a blank line,
  line counts that differ) :class:`TextDataError`, whose message names the file and the 1-based
  physical line (blank lines counted).
- :func:`bible_pairs`: the 31,150 English (King James) / Spanish (Reina-Valera 1909) verse pairs
  of the Debian SWORD modules (see :mod:`gatezoo.train.data.sword`), whitespace-normalised.
- :func:`split_pairs` and :class:`Split`: a seeded train/dev/test split that keeps corpus order
  inside each part, saved to and loaded from ``{train,dev,test}.{src,tgt}``.
- :class:`Tokenizer`: a joint SentencePiece model with fixed special ids (:data:`PAD_ID` ``<pad>``,
  :data:`UNK_ID` ``<unk>``, :data:`BOS_ID` ``<s>``, :data:`EOS_ID` ``</s>``); training is
  deterministic (all sentences, no sampling or shuffling, one thread).
- :func:`collate` and :class:`Batch`: padded ``int64`` tensors ``src``, ``tgt_in`` (``<s>`` +
  target) and ``tgt_out`` (target + ``</s>``) for teacher forcing.
- :class:`TokenBatches`: batches bounded by a padded token count, formed once from examples sorted
  by length (so padding is small and the number of batches is fixed), visited in a per-epoch order
  that depends only on ``(seed, epoch)``, so a resumed run can start at any batch.
- Multi-task text: :class:`TokenBatches` and :func:`collate` take an optional task id per example
  and put a ``(B,)`` ``task_ids`` tensor into each :class:`Batch`; :func:`subsample_pairs` (a
  seeded share of a task's training pairs) and :data:`PAIR_TRANSFORMS` (``reverse_source``, ``plain_source``)
  derive tasks from a corpus.

Every error about text data is a :class:`TextDataError` (a
:class:`~gatezoo.train.data.images.DataFormatError`) or a :class:`~gatezoo.train.data.images.DataNotFoundError`,
so a command line catches the same two families as for image data. A wrong argument raises
TypeError (a wrong type: a str where a bool belongs, a float token id) or ValueError (a wrong
value: a negative token id), naming the argument.
"""

from __future__ import annotations

import io
import numbers
import os
import random
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gatezoo.blocks.checks import ArgumentTypeError, check_bool, check_int

from . import sword
from .images import DataFormatError, DataNotFoundError, derive_seed

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
"""The fixed special ids of every :class:`Tokenizer`: padding, unknown, begin and end of sentence."""
PAD_PIECE, UNK_PIECE, BOS_PIECE, EOS_PIECE = "<pad>", "<unk>", "<s>", "</s>"
"""The pieces of the special ids."""
MODEL_TYPES = ("unigram", "bpe", "char", "word")
"""The SentencePiece model types :meth:`Tokenizer.train` accepts."""
SPLIT_PARTS = ("train", "dev", "test")
"""The parts of a :class:`Split`, in the order they are saved."""

_SPACE = re.compile(r"\s+")


class TextDataError(DataFormatError):
    """Text data that is there but unusable: an empty or non-UTF-8 file, a blank line, files whose
    line counts differ, a split or vocabulary that does not fit the corpus, an over-long example."""


def _check_path(name: str, path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"{name} must be a path (str or os.PathLike), got {path!r} ({type(path).__name__})")
    return Path(path)


def _is_id(value) -> bool:
    """A Python int, or a numpy integer scalar wide enough for any token id (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and _narrow_dtype(value) is None


_ID_TENSOR_DTYPES = (torch.int64, torch.int32)
"""The tensor dtypes that hold token ids: the embedding's index types, wide enough for any vocabulary."""


def _narrow_dtype(value) -> str | None:
    """The dtype of a tensor, numpy array or numpy scalar ``value`` that cannot hold token ids (a
    float, a bool, or an integer of fewer than 32 bits, in which an id above 127, 255 or 32767 has
    already wrapped around); None when ``value`` has no dtype or a fitting one."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        return None if dtype in _ID_TENSOR_DTYPES else str(dtype)
    kind, size = getattr(dtype, "kind", None), getattr(dtype, "itemsize", 0)
    return None if kind in ("i", "u") and size >= 4 else str(dtype)


def _check_seed(seed) -> int:
    if not _is_id(seed):
        raise ArgumentTypeError(f"seed must be an int, got {seed!r} ({type(seed).__name__})")
    return int(seed)


# --------------------------------------------------------------------------------------------
# Files of sentences


_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


def decode_lines(raw: bytes, source: str) -> list[str]:
    """The lines of UTF-8 ``raw`` (read from ``source``, a file name or ``"stdin"``, named in errors):
    ``\n``, ``\r\n`` and a bare ``\r`` each end a line, a leading byte-order mark is dropped, the
    line ends are removed and nothing else (no stripping; blank lines are kept, so line ``i`` of
    the list is the ``i + 1``-th physical line). No trailing empty line for a final line end.

    Raises :class:`TextDataError` naming ``source``, the 1-based line and the byte offset (from
    the start of the input) of the first byte that is not UTF-8."""
    if not isinstance(raw, (bytes, bytearray)):
        raise ArgumentTypeError(f"raw must be bytes, got {type(raw).__name__}")
    if not isinstance(source, str):
        raise ArgumentTypeError(f"source must be a str naming the input, got {type(source).__name__}")
    offset = len(_BOM) if raw.startswith(_BOM) else 0
    lines, number = [], 0
    while offset < len(raw):
        number += 1
        end = _LINE_END.search(raw, offset)
        stop, after = (end.start(), end.end()) if end else (len(raw), len(raw))
        try:
            lines.append(bytes(raw[offset:stop]).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise TextDataError(f"{source}: line {number} is not valid UTF-8 (byte offset {offset + e.start}: "
                                f"{e.reason}); expected UTF-8 text") from None
        offset = after
    return lines


def read_lines(path: str | os.PathLike, *, allow_empty: bool = False) -> list[str]:
    """The sentences of a UTF-8 file, one per line, each stripped of its line ending (``\n``,
    ``\r\n`` or a bare ``\r``, see :func:`decode_lines`) and surrounding whitespace. A leading
    byte-order mark is dropped.

    Raises :class:`~gatezoo.train.data.images.DataNotFoundError` if the file is missing and
    :class:`TextDataError` naming the file (and the 1-based physical line) if it is empty (unless
    ``allow_empty``), holds bytes that are not UTF-8, or has a blank line.
    """
    path = _check_path("path", path)
    check_bool("allow_empty", allow_empty)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataNotFoundError(f"{path}: no such text file (expected UTF-8, one sentence per line)") from None
    except IsADirectoryError:
        raise TextDataError(f"{path}: is a directory, expected a UTF-8 text file with one sentence per line") from None
    lines = decode_lines(raw, str(path))
    if not lines:
        if allow_empty:
            return []
        raise TextDataError(f"{path}: the file is empty; expected UTF-8 text with one sentence per line")
    out = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            raise TextDataError(f"{path}: line {number} is empty; every line must hold a sentence")
        out.append(line)
    return out


def read_parallel(
    src_path: str | os.PathLike, tgt_path: str | os.PathLike, *, allow_empty: bool = False
) -> list[tuple[str, str]]:
    """``(source, target)`` sentence pairs from two files read with :func:`read_lines`, line ``i``
    of one paired with line ``i`` of the other; raises :class:`TextDataError` naming both files and
    both line counts when the counts differ."""
    _check_path("src_path", src_path)
    _check_path("tgt_path", tgt_path)
    src = read_lines(src_path, allow_empty=allow_empty)
    tgt = read_lines(tgt_path, allow_empty=allow_empty)
    if len(src) != len(tgt):
        raise TextDataError(f"parallel files differ in length: {src_path} has {len(src)} lines but {tgt_path} has "
                            f"{len(tgt)}; line i of one must translate line i of the other")
    return list(zip(src, tgt))


def normalize_space(text: str) -> str:
    """``text`` with every run of whitespace collapsed to one space and the ends stripped."""
    return _SPACE.sub(" ", text).strip()


def bible_pairs(
    kjv: str | os.PathLike | None = None, rv: str | os.PathLike | None = None
) -> list[tuple[str, str]]:
    """English → Spanish verse pairs: every verse that both the King James Version and the
    Reina-Valera 1909 have, in canonical order, each side whitespace-normalised.

    ``kjv`` and ``rv`` are passed on to :func:`gatezoo.train.data.sword.aligned_verses` (a module name
    under ``/usr/share/sword`` or the path of a zText module directory); ``None`` means the Debian
    modules ``engKJV2006eb`` (``sword-text-kjv``) and ``spaRV1909eb`` (``sword-text-sparv``). A
    missing module raises :class:`~gatezoo.train.data.images.DataNotFoundError` saying how to install it.
    """
    verses = sword.aligned_verses(sword.KJV if kjv is None else kjv, sword.RV1909 if rv is None else rv)
    pairs = []
    for _, en, es in verses:
        en, es = normalize_space(en), normalize_space(es)
        if en and es:
            pairs.append((en, es))
    return pairs


# --------------------------------------------------------------------------------------------
# Train / dev / test splits


def _check_line(text: object, where: str) -> None:
    """Raise unless ``text`` survives a write/read round trip as one line of a sentence file."""
    if not isinstance(text, str):
        raise TextDataError(f"{where}: expected a str, got {type(text).__name__}")
    if not text or text != text.strip() or "\n" in text or "\r" in text:
        raise TextDataError(f"{where}: {text!r} cannot be saved as one line: a sentence must be non-empty, "
                            "hold no line end (\\n or \\r) and have no surrounding whitespace")


@dataclass
class Split:
    """A parallel corpus split into ``train``, ``dev`` and ``test`` lists of ``(source, target)``
    pairs."""

    train: list[tuple[str, str]]
    dev: list[tuple[str, str]]
    test: list[tuple[str, str]]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``train.src train.tgt dev.src dev.tgt test.src test.tgt`` (UTF-8, one sentence per
        line, an empty file for an empty part) into ``directory``, creating it; returns its path.

        Every file is first written under a ``.tmp`` name and renamed only once all six are
        complete, so an error (such as a sentence holding a newline, a :class:`TextDataError`)
        leaves no partial file behind."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        contents = {}
        for part in SPLIT_PARTS:
            pairs = getattr(self, part)
            for side, col in (("src", 0), ("tgt", 1)):
                lines = []
                for i, pair in enumerate(pairs):
                    if not isinstance(pair, tuple | list) or len(pair) != 2:
                        raise TextDataError(f"Split.{part}[{i}]: expected a (source, target) pair, got {pair!r}")
                    _check_line(pair[col], f"Split.{part}[{i}][{col}]")
                    lines.append(pair[col] + "\n")
                contents[root / f"{part}.{side}"] = "".join(lines).encode("utf-8")
        temps = {path: path.with_name(path.name + ".tmp") for path in contents}
        try:
            for path, data in contents.items():
                temps[path].write_bytes(data)
            for path, tmp in temps.items():
                os.replace(tmp, path)
        finally:
            for tmp in temps.values():
                tmp.unlink(missing_ok=True)
        return root

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Split:
        """Read a split written by :meth:`save` (or by hand) from ``directory``; ``dev`` and
        ``test`` may be empty files, ``train`` may not."""
        root = Path(directory)
        parts = {part: read_parallel(root / f"{part}.src", root / f"{part}.tgt", allow_empty=part != "train")
                 for part in SPLIT_PARTS}
        return cls(**parts)

    def __repr__(self) -> str:
        return f"Split(train={len(self.train)} pairs, dev={len(self.dev)} pairs, test={len(self.test)} pairs)"


def _check_pairs(name: str, pairs) -> list[tuple[str, str]]:
    """``pairs`` as a list of ``(source, target)`` tuples, each checked to be a pair of two str (a
    tab-separated line, or any other single string, is not a pair: a 2-character string would
    otherwise unpack as one)."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise ArgumentTypeError(f"{name}: pairs must be a sequence of (source, target) pairs of str, got "
                                f"{type(pairs).__name__}")
    out = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, (tuple, list)) or len(pair) != 2:
            hint = (" (a line with a separator? split it into (source, target) first)"
                    if isinstance(pair, (str, bytes)) else "")
            raise ArgumentTypeError(f"{name}: pairs[{i}] must be a (source, target) pair of str, got {pair!r} "
                                    f"({type(pair).__name__}){hint}")
        for side, text in zip(("source", "target"), pair):
            if not isinstance(text, str):
                raise ArgumentTypeError(f"{name}: the {side} of pairs[{i}] must be a str, got {text!r} "
                                        f"({type(text).__name__})")
        out.append((pair[0], pair[1]))
    return out


def drop_repeated_sources(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """``pairs`` without those whose source sentence already appeared (the first one stays), so a
    split cannot put the same source in training and test. The Bible has such repeats (refrains,
    a verse quoted twice). Each pair must be a ``(source, target)`` pair of str (TypeError otherwise)."""
    seen: set[str] = set()
    out = []
    for src, tgt in _check_pairs("drop_repeated_sources", pairs):
        if src not in seen:
            seen.add(src)
            out.append((src, tgt))
    return out


def split_pairs(pairs: Sequence[tuple[str, str]], *, dev: int = 500, test: int = 1000, seed: int = 0) -> Split:
    """Split ``pairs`` into ``test`` test pairs, ``dev`` dev pairs and the rest for training.

    The indices are shuffled with ``random.Random(seed)``; the first ``test`` of them go to the test
    part, the next ``dev`` to the dev part, the others to training, and each part keeps the corpus
    order. Raises :class:`TextDataError` if ``dev + test`` leaves no training pairs, and TypeError
    naming the index of a pair that is not a ``(source, target)`` pair of str."""
    pairs = _check_pairs("split_pairs", pairs)
    for name, value in (("dev", dev), ("test", test)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ArgumentTypeError(f"split_pairs: {name} must be a non-negative integer, got {value!r} "
                                    f"({type(value).__name__})")
        if value < 0:
            raise ValueError(f"split_pairs: {name} must be a non-negative integer, got {value!r}")
    _check_seed(seed)
    n = len(pairs)
    if dev + test >= n:
        raise TextDataError(f"split_pairs: dev={dev} + test={test} = {dev + test} pairs held out of {n} leaves no "
                            "training pairs; use smaller dev/test sizes or more data")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test_idx, dev_idx, train_idx = order[:test], order[test:test + dev], order[test + dev:]
    return Split(train=[pairs[i] for i in sorted(train_idx)], dev=[pairs[i] for i in sorted(dev_idx)],
                 test=[pairs[i] for i in sorted(test_idx)])


# --------------------------------------------------------------------------------------------
# Tokenizer


def _replace_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _spm():
    """The sentencepiece module (the ``mt`` extra), imported on first use so that the package
    imports without it; an ImportError naming the extra when it is missing."""
    try:
        import sentencepiece
    except ImportError as e:
        raise ImportError("the translation tokenizer needs sentencepiece: pip install 'gatezoo[mt]' "
                          "(or pip install sentencepiece)") from e
    return sentencepiece


class Tokenizer:
    """A SentencePiece model with the fixed special ids :data:`PAD_ID` (``<pad>``), :data:`UNK_ID`
    (``<unk>``), :data:`BOS_ID` (``<s>``) and :data:`EOS_ID` (``</s>``).

    ``Tokenizer(model_path)`` loads a ``.model`` file; :meth:`train` makes one. :meth:`encode` adds
    no ``<s>``/``</s>`` (:func:`collate` does); :meth:`decode` drops padding and ``<s>`` and stops at
    the first ``</s>``, so it takes a model's raw output."""

    def __init__(self, model_path: str | os.PathLike):
        self.path = Path(model_path)
        """The ``.model`` file this tokenizer was loaded from."""
        if not self.path.is_file():
            raise DataNotFoundError(f"{self.path}: no such SentencePiece model file (train one with Tokenizer.train)")
        try:
            self._sp = _spm().SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise TextDataError(f"{self.path}: not a SentencePiece model ({e})") from e
        specials = [(self._sp.pad_id(), PAD_ID), (self._sp.unk_id(), UNK_ID), (self._sp.bos_id(), BOS_ID),
                    (self._sp.eos_id(), EOS_ID)]
        if any(got != want for got, want in specials):
            raise TextDataError(f"{self.path}: special ids pad/unk/bos/eos are {[g for g, _ in specials]}, expected "
                                f"{[w for _, w in specials]}; train the model with Tokenizer.train")

    @classmethod
    def train(
        cls,
        sentences: Iterable[str],
        model_prefix: str | os.PathLike,
        *,
        vocab_size: int = 8000,
        model_type: str = "unigram",
        character_coverage: float = 1.0,
        seed: int = 0,
    ) -> Tokenizer:
        """Train a joint SentencePiece model on ``sentences`` (pass both languages) and write
        ``<model_prefix>.model`` and ``<model_prefix>.vocab``; returns the loaded tokenizer.

        The vocabulary has exactly ``vocab_size`` pieces, the four special ones included. Training
        reads every sentence in the given order on one thread, so it is deterministic: the same
        sentences give a byte-identical model. (SentencePiece's trainer has no random seed; ``seed``
        is accepted for a uniform interface and recorded nowhere.) The files are written only after
        training succeeds, each through a temporary name, so a failure leaves nothing behind. A
        ``vocab_size`` too large (or too small) for the corpus raises :class:`TextDataError` with
        SentencePiece's message and a suggestion."""
        del seed  # sentencepiece training has no randomness once sampling and shuffling are off
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 4:
            raise ValueError(f"Tokenizer.train: vocab_size must be an integer > 4 (4 special pieces plus at least one "
                             f"more), got {vocab_size!r}")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"Tokenizer.train: model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
        if isinstance(character_coverage, bool) or not isinstance(character_coverage, numbers.Real):
            raise ArgumentTypeError(f"Tokenizer.train: character_coverage must be a number in (0, 1], got "
                                    f"{character_coverage!r} ({type(character_coverage).__name__})")
        if not 0.0 < character_coverage <= 1.0:
            raise ValueError(f"Tokenizer.train: character_coverage must be in (0, 1], got {character_coverage!r}")
        if isinstance(sentences, str):
            raise TypeError("Tokenizer.train: sentences must be an iterable of str, got a single str")
        texts = list(sentences)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"Tokenizer.train: sentences[{i}] must be a str, got {type(text).__name__}")
        if not any(text.strip() for text in texts):
            raise TextDataError("Tokenizer.train: no sentences to train on (all empty)")
        writer = io.BytesIO()
        try:
            # model_writer instead of model_prefix: the trained model comes back as bytes (so it can be written
            # atomically, and it does not record a temporary file name inside itself).
            _spm().SentencePieceTrainer.train(
                sentence_iterator=iter(texts),
                model_writer=writer,
                vocab_size=vocab_size,
                model_type=model_type,
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                pad_piece=PAD_PIECE, unk_piece=UNK_PIECE, bos_piece=BOS_PIECE, eos_piece=EOS_PIECE,
                character_coverage=character_coverage,
                input_sentence_size=0,
                shuffle_input_sentence=False,
                num_threads=1,
                minloglevel=2,
            )
        except RuntimeError as e:
            message = str(e)
            if "too high" in message:
                limit = re.search(r"<=\s*(\d+)", message)
                hint = f"at most {limit.group(1)}" if limit else "a smaller one"
                raise TextDataError(f"Tokenizer.train: vocab_size={vocab_size} is too large for this corpus "
                                    f"({len(texts)} sentences); use {hint} ({message})") from e
            if "smaller than required_chars" in message:
                raise TextDataError(f"Tokenizer.train: vocab_size={vocab_size} is too small to hold every character "
                                    f"of this corpus; use a larger one or a lower character_coverage ({message})"
                                    ) from e
            raise TextDataError(f"Tokenizer.train: SentencePiece training failed ({message})") from e
        model = writer.getvalue()
        processor = _spm().SentencePieceProcessor(model_proto=model)
        vocab = "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n"
                        for i in range(processor.get_piece_size()))
        prefix = Path(model_prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        model_path = prefix.with_name(prefix.name + ".model")
        _replace_atomically(prefix.with_name(prefix.name + ".vocab"), vocab.encode("utf-8"))
        _replace_atomically(model_path, model)
        return cls(model_path)

    @property
    def vocab_size(self) -> int:
        """The number of pieces (ids ``0 .. vocab_size - 1``), the special ones included."""
        return self._sp.get_piece_size()

    def pieces(self) -> list[str]:
        """The piece of every id, in id order (``pieces()[:4]`` are the special pieces)."""
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def encode(self, texts: Sequence[str] | str) -> list[list[int]] | list[int]:
        """The ids of each text (no ``<s>``/``</s>`` added); a single str gives a single list.
        Anything but a str or an iterable of str raises TypeError naming ``texts``."""
        if isinstance(texts, str):
            return self._sp.encode(texts, out_type=int)
        return self._sp.encode(_check_texts(texts, "Tokenizer.encode"), out_type=int)

    def encode_pieces(self, texts: Sequence[str] | str) -> list[list[str]] | list[str]:
        """The pieces of each text (``▁`` marks a preceding space); a single str gives a single list."""
        if isinstance(texts, str):
            return self._sp.encode(texts, out_type=str)
        return self._sp.encode(_check_texts(texts, "Tokenizer.encode_pieces"), out_type=str)

    def _clean(self, ids: Iterable[int]) -> list[int]:
        narrow = _narrow_dtype(ids)
        if narrow is not None:
            raise ArgumentTypeError(f"Tokenizer.decode: ids must hold int64 (or int32) token ids, got dtype {narrow}")
        if isinstance(ids, torch.Tensor):  # a row of a list of tensors
            if ids.ndim != 1:
                raise ValueError(f"Tokenizer.decode: each sequence of ids must be 1-D, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out = []
        for i in ids:
            if not _is_id(i):
                what = f"dtype {_narrow_dtype(i)}" if _narrow_dtype(i) else type(i).__name__
                raise ArgumentTypeError(f"Tokenizer.decode: ids must be int token ids (Python int, or int64/int32), "
                                        f"got {i!r} ({what})")
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"Tokenizer.decode: id {i} is outside the vocabulary (0 .. {self.vocab_size - 1})")
            out.append(i)
        return out

    def decode(self, ids: Sequence[Sequence[int]] | Sequence[int] | torch.Tensor) -> list[str] | str:
        """Text from ids: a list of id lists (or a 2-D tensor) gives a list of str, a list of ids (or a
        1-D tensor) gives one str; an empty list gives ``""``. In each sequence ``<pad>`` and ``<s>``
        are dropped and everything from the first ``</s>`` on is cut; ``<unk>`` decodes as ``" ⁇ "``."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise ArgumentTypeError(f"Tokenizer.decode: ids must be a sequence of int token ids, a sequence of such "
                                    f"sequences, or an int64 tensor, got {type(ids).__name__}")
        narrow = _narrow_dtype(ids)
        if narrow is not None:  # a narrow integer dtype has wrapped large ids around already
            raise ArgumentTypeError(f"Tokenizer.decode: ids must hold int64 (or int32) token ids, got dtype {narrow}")
        if isinstance(ids, torch.Tensor):
            if ids.ndim not in (1, 2):
                raise ValueError(f"Tokenizer.decode: expected a 1-D or 2-D tensor of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = list(ids)
        if ids and not isinstance(ids[0], (str, bytes)) and isinstance(ids[0], Iterable):
            return [self._sp.decode(self._clean(seq)) for seq in ids]
        return self._sp.decode(self._clean(ids))

    def decode_pieces(self, pieces: Sequence[str]) -> str:
        """Text from pieces, as :meth:`encode_pieces` gives them."""
        return self._sp.decode_pieces(list(pieces))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def reverse_source(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each source sentence with its words (whitespace-separated) in reverse order, the target
    unchanged: a synthetic task that shares the vocabulary of the corpus."""
    return [(" ".join(reversed(s.split())), t) for s, t in _check_pairs("pairs", pairs)]


def plain_source(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each source sentence lower-cased, without punctuation (Unicode categories ``P*``) and with
    single spaces, the target unchanged: a shifted input close to the corpus's own task."""
    out = []
    for s, t in _check_pairs("pairs", pairs):
        kept = "".join(ch for ch in s.lower() if not unicodedata.category(ch).startswith("P"))
        out.append((" ".join(kept.split()), t))
    return out


PAIR_TRANSFORMS = {"reverse_source": reverse_source, "plain_source": plain_source}
"""Named transforms of a task's pairs (the translation command's ``transform`` of a task)."""


def subsample_pairs(pairs: Sequence[tuple[str, str]], fraction: float, seed: int = 0) -> list[tuple[str, str]]:
    """A seeded share ``fraction`` in (0, 1] of ``pairs`` (at least one pair), in corpus order: the
    same ``(pairs, fraction, seed)`` always gives the same pairs."""
    pairs = list(pairs)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ArgumentTypeError(f"fraction must be a number in (0, 1], got {fraction!r} ({type(fraction).__name__})")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    seed = _check_seed(seed)
    if fraction == 1 or not pairs:
        return pairs
    keep = max(1, round(fraction * len(pairs)))
    chosen = sorted(random.Random(derive_seed(seed, len(pairs), 0x5AB5)).sample(range(len(pairs)), keep))
    return [pairs[i] for i in chosen]


# --------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """One padded batch for teacher forcing: ``src`` ``(B, S)``, ``tgt_in`` ``(B, T)`` (``<s>`` then the
    target ids) and ``tgt_out`` ``(B, T)`` (the target ids then ``</s>``), all ``int64`` padded with
    :data:`PAD_ID` on the right."""

    src: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    task_ids: torch.Tensor | None = None  # (B,) int64, each sentence's task (multi-task batches)

    @property
    def ntokens(self) -> int:
        """The number of non-padding tokens in ``tgt_out`` (the tokens a loss is averaged over)."""
        return int((self.tgt_out != PAD_ID).sum())

    def __len__(self) -> int:
        return self.src.shape[0]

    def to(self, device: str | torch.device, non_blocking: bool = False) -> Batch:
        """A copy of the batch on ``device``."""
        tasks = None if self.task_ids is None else self.task_ids.to(device, non_blocking=non_blocking)
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in (self.src, self.tgt_in, self.tgt_out)), tasks)


def _check_texts(texts, where: str = "texts") -> list[str]:
    """``texts`` (not a str) as a list of str; TypeError naming ``texts`` (or its first non-str item)."""
    if isinstance(texts, bytes) or not isinstance(texts, Iterable):
        raise ArgumentTypeError(f"{where}: texts must be a str or a sequence of str, got {texts!r} "
                                f"({type(texts).__name__})")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ArgumentTypeError(f"{where}: texts[{i}] must be a str, got {t!r} ({type(t).__name__})")
    return texts


def _check_rows(name: str, rows: Sequence[Sequence[int]]) -> None:
    """Each row of ``rows`` must be a sequence of int token ids >= 0 (float ids are not truncated)."""
    if isinstance(rows, (str, bytes)) or not hasattr(rows, "__len__"):
        raise ArgumentTypeError(f"{name} must be a sequence of token id sequences, got {type(rows).__name__}")
    for r, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not hasattr(row, "__len__"):
            raise ArgumentTypeError(f"{name}[{r}] must be a sequence of int token ids, got {type(row).__name__}")
        narrow = _narrow_dtype(row)
        if narrow is not None:  # 8- and 16-bit ids have wrapped around already; bools and floats are no ids
            raise ArgumentTypeError(f"{name}[{r}] must hold int64 (or int32) token ids, got dtype {narrow}")
        if isinstance(row, torch.Tensor):
            if row.ndim != 1:
                raise ValueError(f"{name}[{r}] must be a 1-D sequence of token ids, got shape {tuple(row.shape)}")
            if row.numel() and int(row.min()) < 0:
                raise ValueError(f"{name}[{r}] must hold token ids >= 0, got {int(row.min())}")
            continue
        for i in row:
            if not _is_id(i):
                what = f"dtype {_narrow_dtype(i)}" if _narrow_dtype(i) else type(i).__name__
                raise ArgumentTypeError(f"{name}[{r}] must hold int token ids (Python int, or int64/int32), got "
                                        f"{i!r} ({what})")
            if i < 0:
                raise ValueError(f"{name}[{r}] must hold token ids >= 0, got {i}")


def _pad(rows: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    out = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    for r, row in enumerate(rows):
        if len(row):  # not `if row`: a tensor or array row has no truth value
            out[r, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def collate(src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]], task_ids=None) -> Batch:
    """A :class:`Batch` from source and target id lists (without ``<s>``/``</s>``): each tensor is as
    wide as its longest row (at least 1) and right-padded with :data:`PAD_ID`. Every id must be an
    int >= 0. ``task_ids`` (optional): one task id (int >= 0) per sentence, the batch's ``task_ids``."""
    _check_rows("src_ids", src_ids)
    _check_rows("tgt_ids", tgt_ids)
    if task_ids is not None:
        task_ids = _check_task_ids(task_ids, len(src_ids))
    return _collate(src_ids, tgt_ids, task_ids)


def _check_task_ids(task_ids, count: int) -> list[int]:
    """``task_ids`` as a list of ``count`` ints >= 0 (TypeError / ValueError naming ``task_ids``)."""
    if isinstance(task_ids, (str, bytes)) or not hasattr(task_ids, "__len__"):
        raise ArgumentTypeError(f"task_ids must be a sequence of int task ids, got {type(task_ids).__name__}")
    out = []
    for i, t in enumerate(task_ids):
        if not _is_id(t):
            raise ArgumentTypeError(f"task_ids[{i}] must be an int, got {t!r} ({type(t).__name__})")
        if t < 0:
            raise ValueError(f"task_ids[{i}] must be >= 0, got {t}")
        out.append(int(t))
    if len(out) != count:
        raise ValueError(f"task_ids holds {len(out)} ids for {count} examples; give one per example")
    return out


def _collate(src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]],
             task_ids: Sequence[int] | None = None) -> Batch:
    """:func:`collate` without the per-id checks (for ids checked before)."""
    if len(src_ids) != len(tgt_ids):
        raise ValueError(f"collate: {len(src_ids)} source sequences but {len(tgt_ids)} target sequences")
    if not len(src_ids):
        raise ValueError("collate: no sequences to batch")
    src_width = max(1, max(len(s) for s in src_ids))
    tgt_width = max(len(t) for t in tgt_ids) + 1
    src = _pad(src_ids, src_width)
    tgt_in = _pad([[BOS_ID, *t] for t in tgt_ids], tgt_width)
    tgt_out = _pad([[*t, EOS_ID] for t in tgt_ids], tgt_width)
    tasks = None if task_ids is None else torch.tensor(list(task_ids), dtype=torch.long)
    return Batch(src, tgt_in, tgt_out, tasks)


class TokenBatches:
    """Batches of about ``max_tokens`` padded tokens, with length bucketing, for a training loop.

    An example's size is ``max(len(src), len(tgt) + 1)`` (the target gets ``<s>``/``</s>``). The
    batches are formed once, at construction: the examples sorted by ``(size, index)`` are cut
    greedily so that ``number of sentences × largest size <= max_tokens``; an example larger than
    ``max_tokens`` gets a batch of its own. So ``len(self)`` and each batch's members are fixed;
    with ``shuffle`` an epoch visits the batches in a permutation that depends only on
    ``(seed, epoch)``, so a resumed run gets the same batches (``epoch(e, start=k)``).

    With ``max_len`` an example whose source, or target plus one, is longer raises
    :class:`TextDataError` naming it (the caller passes its model's position limit).

    ``task_ids`` (optional, one int >= 0 per example) makes multi-task batches: each
    :class:`Batch` carries its sentences' task ids; the batching itself ignores them (a batch
    mixes tasks).
    """

    def __init__(
        self,
        src_ids: Sequence[Sequence[int]],
        tgt_ids: Sequence[Sequence[int]],
        *,
        max_tokens: int = 2500,
        seed: int = 0,
        shuffle: bool = True,
        max_len: int | None = None,
        task_ids: Sequence[int] | None = None,
    ):
        _check_rows("src_ids", src_ids)
        _check_rows("tgt_ids", tgt_ids)
        if len(src_ids) != len(tgt_ids):
            raise ValueError(f"TokenBatches: {len(src_ids)} source sequences but {len(tgt_ids)} target sequences")
        if not len(src_ids):
            raise TextDataError("TokenBatches: no examples to batch")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"TokenBatches: max_tokens must be a positive integer, got {max_tokens!r}")
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"TokenBatches: max_len must be a positive integer or None, got {max_len!r}")
        check_bool("shuffle", shuffle)
        _check_seed(seed)
        self.src_ids = [list(s) for s in src_ids]
        """The source ids of every example."""
        self.tgt_ids = [list(t) for t in tgt_ids]
        """The target ids of every example (without ``<s>``/``</s>``)."""
        self.max_tokens, self.seed, self.shuffle, self.max_len = max_tokens, seed, shuffle, max_len
        self.task_ids = None if task_ids is None else _check_task_ids(task_ids, len(self.src_ids))
        """Each example's task id (None: single-task batches without ``task_ids``)."""
        sizes = []
        for i, (s, t) in enumerate(zip(self.src_ids, self.tgt_ids)):
            if max_len is not None and (len(s) > max_len or len(t) + 1 > max_len):
                raise TextDataError(f"TokenBatches: example {i} is too long for max_len={max_len}: source has "
                                    f"{len(s)} tokens, target {len(t)} + 1; filter or truncate it, or raise max_len")
            sizes.append(max(len(s), len(t) + 1))
        self.sizes = sizes
        """Each example's size, ``max(len(src), len(tgt) + 1)``."""
        self.batches: list[list[int]] = []
        """The example indices of each batch, in the fixed (unshuffled) batch order."""
        current: list[int] = []
        for i in sorted(range(len(sizes)), key=lambda i: (sizes[i], i)):
            if current and (len(current) + 1) * sizes[i] > max_tokens:
                self.batches.append(current)
                current = []
            current.append(i)
        self.batches.append(current)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def tokens(self) -> int:
        """The number of target tokens of all examples, ``</s>`` included (an epoch's loss tokens)."""
        return sum(len(t) + 1 for t in self.tgt_ids)

    def order(self, epoch: int) -> list[int]:
        """The batch numbers in the order ``epoch`` visits them (a seeded permutation when
        shuffling, else ``0 .. len - 1``)."""
        order = list(range(len(self.batches)))
        if self.shuffle:
            random.Random(derive_seed(self.seed, epoch, 0x7E47)).shuffle(order)
        return order

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        """The :class:`Batch` objects of ``epoch``, beginning at its batch number ``start``
        (0 <= start <= len; checked here, not at the first batch)."""
        check_int("epoch", epoch, 0)
        if isinstance(start, bool) or not isinstance(start, numbers.Integral):
            raise ArgumentTypeError(f"TokenBatches.epoch: start must be an int in 0 .. {len(self)}, got {start!r} "
                                    f"({type(start).__name__})")
        if not 0 <= start <= len(self):
            raise ValueError(f"TokenBatches.epoch: start must be in 0 .. {len(self)}, got {start}")
        return self._batches(epoch, start)

    def _batches(self, epoch: int, start: int) -> Iterator[Batch]:
        for b in self.order(epoch)[start:]:
            members = self.batches[b]
            tasks = None if self.task_ids is None else [self.task_ids[i] for i in members]
            yield _collate([self.src_ids[i] for i in members], [self.tgt_ids[i] for i in members], tasks)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def __repr__(self) -> str:
        return (f"TokenBatches({len(self.src_ids)} examples, {len(self)} batches, max_tokens={self.max_tokens}, "
                f"shuffle={self.shuffle}, seed={self.seed})")
