"""SWORD zText modules: reading slots, OSIS to text, alignment of two translations, bad files."""

import pytest

from gatezoo.train.data import sword
from gatezoo.train.data.images import DataFormatError, DataNotFoundError

EN = {"ot": ["", "In the <w lemma=\"strong:H7225\">beginning</w> God created.", "",
             "\u00b6 And God saw the light.<note placement=\"foot\"><reference>1.4 </reference>Heb. between</note> ",
             "A &amp; B"],
      "nt": ["<title type=\"main\">Matthew</title>", "The book   of the generation."]}
ES = {"ot": ["", "En el principio creó Dios.", "Solo en español.", "Y vió Dios la luz.", ""],
      "nt": ["Mateo", "Libro de la generación."]}


def test_roundtrip_and_alignment(tmp_path):
    en = sword.write_ztext(tmp_path / "en", EN, verses_per_block=2)
    es = sword.write_ztext(tmp_path / "es", ES, verses_per_block=3)
    assert sword.read_ztext(en) == EN["ot"] + EN["nt"]
    assert sword.osis_text(EN["ot"][3]) == "And God saw the light."  # footnote and paragraph sign dropped
    assert sword.osis_text(EN["ot"][4]) == "A & B"
    pairs = sword.aligned_verses(en, es)
    assert pairs == [(1, "In the beginning God created.", "En el principio creó Dios."),
                     (3, "And God saw the light.", "Y vió Dios la luz."), (5, "Matthew", "Mateo"),
                     (6, "The book of the generation.", "Libro de la generación.")]


def test_bad_modules_name_the_file(tmp_path):
    with pytest.raises(DataNotFoundError, match="apt-get install sword-text-kjv sword-text-sparv"):
        sword.read_ztext("noSuchModule")
    en = sword.write_ztext(tmp_path / "en", EN)
    short = sword.write_ztext(tmp_path / "short", {"ot": EN["ot"][:3], "nt": EN["nt"]})
    with pytest.raises(DataFormatError, match="number their verses differently"):
        sword.aligned_verses(en, short)
    (en / "nt.bzv").write_bytes((en / "nt.bzv").read_bytes()[:-3])
    with pytest.raises(DataFormatError, match=r"nt\.bzv: .* not a whole number of 10-byte records"):
        sword.read_ztext(en)
    en = sword.write_ztext(tmp_path / "en2", EN)
    data = bytearray((en / "ot.bzz").read_bytes())
    data[:4] = b"junk"
    (en / "ot.bzz").write_bytes(bytes(data))
    with pytest.raises(DataFormatError, match=r"ot\.bzz: block 0 does not decompress"):
        sword.read_ztext(en)
    (en / "ot.bzs").unlink()
    with pytest.raises(DataNotFoundError, match=r"ot\.bzs: missing file"):
        sword.read_ztext(en)


def test_kjv_and_reina_valera_align():
    try:
        pairs = sword.aligned_verses(sword.KJV, sword.RV1909)
    except DataNotFoundError:
        pytest.skip("sword-text-kjv / sword-text-sparv not installed")
    assert len(pairs) == 31150
    assert pairs[-1][1:] == ("The grace of our Lord Jesus Christ be with you all. Amen.",
                             "La gracia de nuestro Señor Jesucristo sea con todos vosotros. Amén.")
    assert not any("<" in a or "<" in b for _, a, b in pairs)
