"""Bible texts from SWORD zText modules, read with the standard library.

Debian packages such as ``sword-text-kjv`` (King James Version, module ``engKJV2006eb``) and
``sword-text-sparv`` (Reina-Valera 1909, ``spaRV1909eb``) install modules under
``/usr/share/sword/modules/texts/ztext/<module>/``. A zText module stores each testament
(``ot``, ``nt``) as three files:

- ``<t>.bzs``: the block index, one ``<III`` record per block (offset in ``.bzz``, compressed
  size, uncompressed size);
- ``<t>.bzv``: the verse index, one ``<IIH`` record per verse slot (block number, offset in the
  uncompressed block, length); slots with length 0 are empty (chapter and book headings that
  carry no text, verses a translation lacks);
- ``<t>.bzz``: the zlib-compressed blocks, whose text is OSIS markup in UTF-8.

Modules of the same versification number their slots alike, so two translations align slot by
slot: :func:`aligned_verses` pairs them. :func:`osis_text` turns a slot's markup into plain text
(footnotes dropped, tags stripped, entities decoded, whitespace collapsed).
"""

from __future__ import annotations

import html
import os
import re
import struct
import zlib
from pathlib import Path

from .images import DataFormatError, DataNotFoundError

SWORD_ROOT = Path("/usr/share/sword")
KJV, RV1909 = "engKJV2006eb", "spaRV1909eb"
HOW_TO_GET = ("Install the Bibles with `sudo apt-get install sword-text-kjv sword-text-sparv`, or pass the path "
              "of a zText module directory (holding ot.bzs/.bzv/.bzz and nt.bzs/.bzv/.bzz).")
TESTAMENTS = ("ot", "nt")

_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_TAG = re.compile(r"<[^>]*>")


def module_dir(module: str | os.PathLike) -> Path:
    """The directory of a module: a path as given, or a module name under the SWORD library."""
    path = Path(module)
    if path.is_dir():
        return path
    if os.sep not in str(module):
        for name in (str(module), str(module).lower()):
            path = SWORD_ROOT / "modules" / "texts" / "ztext" / name
            if path.is_dir():
                return path
    raise DataNotFoundError(f"SWORD module {str(module)!r} not found. {HOW_TO_GET}")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataNotFoundError(f"{path}: missing file of a zText module. {HOW_TO_GET}") from None


def read_ztext(module: str | os.PathLike) -> list[str]:
    """The raw OSIS markup of every verse slot of a module, Old then New Testament ('' for an
    empty slot)."""
    root = module_dir(module)
    slots = []
    for part in TESTAMENTS:
        bzs, bzv, bzz = (_read(root / f"{part}.{ext}") for ext in ("bzs", "bzv", "bzz"))
        for name, data, size in ((f"{part}.bzs", bzs, 12), (f"{part}.bzv", bzv, 10)):
            if len(data) % size:
                raise DataFormatError(f"{root / name}: {len(data)} bytes is not a whole number of {size}-byte records")
        blocks: dict[int, bytes] = {}
        for i in range(len(bzv) // 10):
            block, offset, length = struct.unpack_from("<IIH", bzv, 10 * i)
            if length == 0:
                slots.append("")
                continue
            if block not in blocks:
                if 12 * (block + 1) > len(bzs):
                    raise DataFormatError(f"{root / f'{part}.bzv'}: slot {i} names block {block}, "
                                          f"but {part}.bzs has {len(bzs) // 12}")
                start, csize, _ = struct.unpack_from("<III", bzs, 12 * block)
                try:
                    blocks[block] = zlib.decompress(bzz[start:start + csize])
                except zlib.error as e:
                    raise DataFormatError(f"{root / f'{part}.bzz'}: block {block} does not decompress ({e})") from e
            text = blocks[block][offset:offset + length]
            if len(text) != length:
                raise DataFormatError(f"{root / f'{part}.bzv'}: slot {i} runs past the end of block {block}")
            try:
                slots.append(text.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{root / f'{part}.bzz'}: slot {i} is not UTF-8 ({e})") from e
    return slots


def osis_text(markup: str) -> str:
    """Plain text of OSIS markup: footnotes dropped, tags stripped (their text kept), entities
    decoded, the paragraph sign removed, whitespace collapsed."""
    text = html.unescape(_TAG.sub("", _NOTE.sub("", markup))).replace("\u00b6", " ")
    return " ".join(text.split())


def aligned_verses(source: str | os.PathLike = KJV, target: str | os.PathLike = RV1909) -> list[tuple[int, str, str]]:
    """``(slot, source text, target text)`` for every slot where both modules have text."""
    src, tgt = read_ztext(source), read_ztext(target)
    if len(src) != len(tgt):
        raise DataFormatError(f"modules {str(source)!r} and {str(target)!r} number their verses differently "
                              f"({len(src)} and {len(tgt)} slots)")
    pairs = []
    for i, (a, b) in enumerate(zip(src, tgt)):
        a, b = osis_text(a), osis_text(b)
        if a and b:
            pairs.append((i, a, b))
    return pairs


def write_ztext(directory: str | os.PathLike, testaments: dict[str, list[str]], verses_per_block: int = 4) -> Path:
    """Write a zText module (for tests and small corpora): ``testaments`` maps ``"ot"``/``"nt"``
    to the markup of each slot ('' for an empty one). Returns the directory."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    for part in TESTAMENTS:
        slots = testaments.get(part, [])
        bzs, bzv, bzz = bytearray(), bytearray(), bytearray()
        for first in range(0, max(len(slots), 1), verses_per_block):
            block_no, raw = len(bzs) // 12, bytearray()
            for text in slots[first:first + verses_per_block]:
                data = text.encode("utf-8")
                bzv += struct.pack("<IIH", block_no if data else 0, len(raw) if data else 0, len(data))
                raw += data
            packed = zlib.compress(bytes(raw))
            bzs += struct.pack("<III", len(bzz), len(packed), len(raw))
            bzz += packed
        for ext, data in (("bzs", bzs), ("bzv", bzv), ("bzz", bzz)):
            (root / f"{part}.{ext}").write_bytes(bytes(data))
    return root
