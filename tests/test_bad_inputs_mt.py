"""Bad inputs of the translation commands, the text readers and the decoder are answered clearly
(TypeError/ValueError naming the argument, or ``error:`` and exit status 2), and a refused
command never changes a run directory: every file is hashed before and after each refusal."""

import hashlib
import io
import shutil
import sys

import numpy as np
import pytest
import torch

from gatezoo.eval import translate as etranslate
from gatezoo.eval.decode import beam_search, check_search_options, greedy_search, translate_ids
from gatezoo.models import EncoderDecoder, TranslationConfig
from gatezoo.train import classify, evaluate, translate, translate_eval
from gatezoo.train.core.checkpoint import list_snapshots
from gatezoo.train.data import text
from gatezoo.train.data.text import TextDataError, Tokenizer

MT = ["--model_args", "{dim: 32, enc_layers: 1, dec_layers: 1, heads: 2, ffn_hidden: 64}", "--vocab_size", "40",
      "--dev_size", "10", "--test_size", "10", "--max_tokens", "200", "--warmup_steps", "2", "--eval_every", "3",
      "--dev_sentences", "5", "--beam_size", "2", "--average_last", "0", "--final_test", "false",
      "--progress", "false", "--threads", "1"]
IMAGE = ["--model", "vit_tiny", "--model_args.dim", "32", "--model_args.depth", "1", "--batch_size", "16",
         "--epochs", "2", "--progress", "false", "--threads", "1"]


BAD_BYTE = b"\xff"  # never valid in UTF-8


def _tree(root):
    """Every path under ``root`` -> the SHA-256 of its bytes ("dir" for a folder)."""
    return {str(p.relative_to(root)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))}


def _only_dir(out):
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


@pytest.fixture(scope="module")
def mt_run(corpus, tmp_path_factory):
    """A translation run of 4 steps on the tiny corpus (snapshots at steps 3 and 4)."""
    out = tmp_path_factory.mktemp("mt")
    assert translate.main(["--src", str(corpus / "train.en"), "--tgt", str(corpus / "train.es"), "--out", str(out),
                           *MT, "--max_steps", "4"]) == 0
    return _only_dir(out)


@pytest.fixture(scope="module")
def image_run(tiny_npz, tmp_path_factory):
    """A classification run of 3 steps (4 per epoch) on the tiny image set."""
    out = tmp_path_factory.mktemp("img")
    assert classify.main(["--data", str(tiny_npz), "--out", str(out), *IMAGE, "--max_steps", "3"]) == 0
    return _only_dir(out)


@pytest.fixture(scope="module")
def tokenizer(mt_run):
    return Tokenizer(mt_run / "spm.model")


def _refused(main, argv, capsys, expected, run_dir):
    """Run a command that must refuse: exit 2, an ``error:`` line holding ``expected``, no
    traceback, and ``run_dir`` byte for byte as it was."""
    before = _tree(run_dir)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert ("\n" + err).count("\nerror: ") == 1 and "Traceback" not in err, err  # warnings may come first
    assert expected in err, err
    assert _tree(run_dir) == before
    return err


def _corrupt_snapshots(run_dir):
    """Flip a byte in the weights of every snapshot, so that none verifies."""
    snapshots = list_snapshots(run_dir)
    assert snapshots
    for _, folder in snapshots:
        path = folder / "model.safetensors"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------
# 1. a refused command leaves the run directory byte-identical


RESUME_CASES = {
    "the reported case: model_args": (["--model_args.dim", "48"], "model_args.dim is fixed by the run"),
    "another model": (["--model", "transformer_mt_tiny_rela"], "model is fixed by the run"),
    "other training files": (["--src", "{es}", "--tgt", "{en}"], "src is fixed by the run"),
    "lr the optimizer state overrides": (["--lr", "0.5"], "lr is fixed by the run"),
    "other batches": (["--max_tokens", "100"], "max_tokens is fixed by the run"),
    "another seed": (["--seed", "7"], "seed is fixed by the run"),
    "threads 0": (["--threads", "0"], "'threads' must be >= 1"),
    "negative threads": (["--threads", "-1"], "'threads' must be >= 1"),
    "eval_every 0": (["--eval_every", "0"], "'eval_every' must be >= 1"),
    "unknown key": (["--no_such_key", "1"], "no_such_key"),
    "models": (["--models", "transformer_mt_tiny", "torch_transformer_mt_tiny"], "--models"),
    "config too": (["--config", "{en}"], "not both"),
    "warmup_epochs under warmup_steps": (["--warmup_epochs", "1"], "--warmup_steps null"),
    "length_penalty with greedy": (["--beam_size", "1", "--length_penalty", "0.6"], "beam_size 1"),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_refused_translation_resume_changes_nothing(case, mt_run, corpus, capsys):
    extra, expected = RESUME_CASES[case]
    extra = [a.replace("{en}", str(corpus / "train.en")).replace("{es}", str(corpus / "train.es")) for a in extra]
    _refused(translate.main, ["--resume", str(mt_run), *extra], capsys, expected, mt_run)


def test_a_resume_refused_after_loading_changes_nothing_and_the_run_still_resumes(mt_run, tmp_path, capsys):
    intact, damaged = tmp_path / "intact", tmp_path / "damaged"
    shutil.copytree(mt_run, intact)
    shutil.copytree(mt_run, damaged)
    _corrupt_snapshots(damaged)
    # an accepted override with snapshots that do not verify: refused only once fit tries to load
    # them, after the config was read, so config.yaml must not have been rewritten by then
    err = _refused(translate.main, ["--resume", str(damaged), "--max_steps", "6"], capsys, "no snapshot", damaged)
    assert "corrupt" in err
    # the refusals of the other tests left the shared run resumable: a copy continues to step 6
    assert translate.main(["--resume", str(intact), "--max_steps", "6"]) == 0
    steps = [row.split(",")[1] for row in (intact / "metrics.csv").read_text().splitlines()[1:]]
    assert steps[-1] == "6" and "max_steps: 6" in (intact / "config.yaml").read_text()


IMAGE_RESUME_CASES = {
    "model_args": (["--model_args.dim", "16"], "model_args.dim is fixed by the run"),
    "batch_size": (["--batch_size", "8"], "batch_size is fixed by the run"),
    "other data": (["--data", "{other}"], "data is fixed by the run"),
    "lr": (["--lr", "0.5"], "lr is fixed by the run"),
    "negative threads": (["--threads", "-1"], "'threads' must be >= 1"),
    "threads 0": (["--threads", "0"], "'threads' must be >= 1"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_RESUME_CASES))
def test_refused_classify_resume_changes_nothing(case, image_run, tmp_path, capsys):
    extra, expected = IMAGE_RESUME_CASES[case]
    extra = [a.replace("{other}", str(tmp_path / "other.npz")) for a in extra]
    _refused(classify.main, ["--resume", str(image_run), *extra], capsys, expected, image_run)


def test_classify_resume_refused_after_loading_changes_nothing(image_run, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(image_run, damaged)
    _corrupt_snapshots(damaged)
    _refused(classify.main, ["--resume", str(damaged), "--max_steps", "null"], capsys, "no snapshot", damaged)


@pytest.mark.parametrize("extra, expected", [(["--eval_batch_size", "0"], "'eval_batch_size' must be >= 1"),
                                             (["--data", "missing.npz"], "missing.npz"),
                                             (["--threads", "-2"], "'threads' must be >= 1")])
def test_refused_image_evaluate_changes_nothing(extra, expected, image_run, capsys):
    _refused(evaluate.main, [str(image_run), *extra], capsys, expected, image_run)


EVAL_CASES = {
    "ctranslate2 without evaluate": (["--ctranslate2"], "--ctranslate2 needs --evaluate"),
    "output without evaluate": (["--output", "{run}/out.txt"], "--output needs --evaluate"),
    "json without evaluate": (["--json", "{run}/scores.json"], "--json needs --evaluate"),
    "split without evaluate": (["--split", "dev"], "--split needs --evaluate"),
    "src without evaluate": (["--src", "{en}", "--ref", "{es}"], "--src needs --evaluate"),
    "split with src": (["--evaluate", "--split", "dev", "--src", "{en}", "--ref", "{es}"],
                       "--split dev does nothing with --src"),
    "src without ref": (["--evaluate", "--src", "{en}"], "--src and --ref go together"),
    "NaN length penalty": (["--evaluate", "--length_penalty", "nan"], "--length_penalty must be a finite number"),
    "infinite length penalty": (["--evaluate", "--length_penalty", "inf"], "--length_penalty must be a finite"),
    "negative length penalty": (["--evaluate", "--length_penalty", "-1"], "--length_penalty must be a finite"),
    "length penalty with greedy": (["--evaluate", "--beam_size", "1", "--length_penalty", "0.6"],
                                   "--length_penalty does nothing with --beam_size 1"),
    "infinite max_len_a": (["--evaluate", "--max_len_a", "inf"], "--max_len_a must be a finite number"),
    "NaN max_len_a": (["--evaluate", "--max_len_a", "nan"], "--max_len_a must be a finite number"),
    "negative max_len_b": (["--evaluate", "--max_len_b", "-1"], "--max_len_b must be >= 0"),
    "negative threads": (["--evaluate", "--threads", "-1"], "--threads must be >= 1"),
    "threads 0": (["--threads", "0"], "--threads must be >= 1"),
    "beam 0 with a json in the run": (["--evaluate", "--beam_size", "0", "--json", "{run}/scores.json"],
                                      "--beam_size must be >= 1"),
    "output is a directory": (["--evaluate", "--output", "{run}"], "is a directory"),
    "output in a missing folder": (["--evaluate", "--output", "{run}/nope/out.txt"], "does not exist"),
    "no averaged weights": (["--evaluate", "--checkpoint", "averaged", "--json", "{run}/s.json"],
                            "averaged.safetensors"),
    "no such device": (["--evaluate", "--device", "abacus"], "device"),
    "source file not UTF-8": (["--evaluate", "--src", "{bad}", "--ref", "{es2}", "--output", "{run}/o.txt"],
                              "line 2 is not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_refused_translate_eval_changes_nothing(case, mt_run, tmp_path, capsys):
    (tmp_path / "bad.en").write_bytes(b"the king\nthe \xff man\n")
    (tmp_path / "ok.es").write_text("el rey\nel hombre\n")
    fill = {"{run}": str(mt_run), "{en}": str(tmp_path / "bad.en"), "{es}": str(tmp_path / "ok.es"),
            "{bad}": str(tmp_path / "bad.en"), "{es2}": str(tmp_path / "ok.es")}
    extra, expected = EVAL_CASES[case]
    argv = [str(mt_run)]
    for a in extra:
        for key, value in fill.items():
            a = a.replace(key, value)
        argv.append(a)
    _refused(translate_eval.main, argv, capsys, expected, mt_run)


def test_the_export_refuses_a_rela_model_before_decoding_and_changes_nothing(corpus, tmp_path, capsys):
    pytest.importorskip("ctranslate2")
    out = tmp_path / "rela"
    assert translate.main(["--src", str(corpus / "train.en"), "--tgt", str(corpus / "train.es"), "--out", str(out),
                           *MT, "--model", "transformer_mt_tiny_rela", "--max_steps", "1"]) == 0
    run = _only_dir(out)
    _refused(translate_eval.main, [str(run), "--evaluate", "--ctranslate2", "--checkpoint", "last", "--json",
                                   str(run / "scores.json")], capsys, "ReLA", run)
    assert "BLEU" not in capsys.readouterr().out  # refused before the decoding, not after


# ---------------------------------------------------------------------------------------------
# 4. options that would do nothing, on a fresh training run


def test_training_options_that_would_do_nothing_are_refused(corpus, mt_run, tmp_path, capsys):
    en, es = str(corpus / "train.en"), str(corpus / "train.es")
    out = tmp_path / "runs"
    files = ["--src", en, "--tgt", es, "--out", str(out), "--max_steps", "1", "--progress", "false"]
    cases = [
        (["--dev_src", en, "--dev_tgt", es, "--dev_size", "5"], "--dev_size does nothing with dev_src"),
        (["--test_src", en, "--test_tgt", es, "--test_size", "5"], "--test_size does nothing with test_src"),
        (["--dev_src", en, "--dev_tgt", es, "--test_src", en, "--test_tgt", es, "--split_seed", "3"],
         "--split_seed does nothing"),
        (["--tokenizer", str(mt_run / "spm.model"), "--vocab_size", "50"], "--vocab_size does nothing"),
        (["--data", "bible"], "--data bible does nothing"),
        (["--warmup_epochs", "1"], "--warmup_steps null"),
        (["--beam_size", "1", "--length_penalty", "0.5"], "--length_penalty does nothing with beam_size 1"),
        (["--threads", "0"], "'threads' must be >= 1"),
    ]
    for extra, expected in cases:
        capsys.readouterr()
        assert translate.main(files + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err, err
    capsys.readouterr()
    assert translate.main(files + ["--models", "transformer_mt_tiny", "--model", "transformer_mt_tiny"]) == 2
    assert "--model does nothing with --models" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_classify_refuses_warmup_epochs_under_warmup_steps(tiny_npz, tmp_path, capsys):
    out = tmp_path / "runs"
    code = classify.main(["--data", str(tiny_npz), "--out", str(out), *IMAGE, "--warmup_steps", "3",
                          "--warmup_epochs", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "--warmup_epochs does nothing while warmup_steps is set" in err
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------------------------
# 2. text files and stdin


def test_the_three_line_ends_are_read_alike(tmp_path):
    lines = ["the king", "the woman", "a house"]
    for end in (b"\n", b"\r\n", b"\r"):
        path = tmp_path / "f.txt"
        path.write_bytes(end.join(s.encode() for s in lines) + end)
        assert text.read_lines(path) == lines, end
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(b"\xef\xbb\xbfone\rtwo\r\nthree\nfour")
    assert text.read_lines(mixed) == ["one", "two", "three", "four"]
    assert text.decode_lines(b"a\r\rb\r\n\nc", "x") == ["a", "", "b", "", "c"]
    # an old Mac file pairs line by line with a Unix one
    (tmp_path / "mac.en").write_bytes(b"the king\rthe woman\r")
    (tmp_path / "unix.es").write_bytes(b"el rey\nla mujer\n")
    assert text.read_parallel(tmp_path / "mac.en", tmp_path / "unix.es") == [("the king", "el rey"),
                                                                            ("the woman", "la mujer")]


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
def test_errors_name_the_file_and_the_physical_line(end, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_bytes(end.join([b"one", b"two", b"", b"four"]) + end)
    with pytest.raises(TextDataError, match=r"blank\.txt: line 3 is empty"):
        text.read_lines(blank)
    raw = end.join([b"one", b"   ", b"three", b"fo\xffur"]) + end
    bad = tmp_path / "bad.txt"
    bad.write_bytes(raw)
    offset = raw.index(BAD_BYTE)
    with pytest.raises(TextDataError, match=rf"bad\.txt: line 4 is not valid UTF-8 \(byte offset {offset}:"):
        text.read_lines(bad)


def test_split_pairs_takes_pairs_only():
    with pytest.raises(TypeError, match=r"pairs\[1\] must be a \(source, target\) pair.*separator"):
        text.split_pairs([("a", "b"), "c\td", ("e", "f")], dev=0, test=0)
    with pytest.raises(TypeError, match=r"pairs\[0\] must be a \(source, target\) pair"):
        text.split_pairs(["ab", "cd"], dev=0, test=0)  # would unpack as ("a", "b") and ("c", "d")
    with pytest.raises(TypeError, match=r"pairs\[0\] must be a \(source, target\) pair"):
        text.split_pairs([("a", "b", "c")], dev=0, test=0)
    with pytest.raises(TypeError, match=r"the target of pairs\[0\] must be a str"):
        text.split_pairs([("a", 3)], dev=0, test=0)
    with pytest.raises(TypeError, match="pairs must be a sequence"):
        text.split_pairs("a\tb", dev=0, test=0)
    with pytest.raises(TypeError, match=r"pairs\[0\]"):
        text.drop_repeated_sources(["ab"])
    assert text.split_pairs([["a", "b"], ("c", "d")], dev=0, test=1, seed=0).train in ([("a", "b")], [("c", "d")])


def test_a_sentence_with_a_carriage_return_is_not_saved_as_one_line(tmp_path):
    with pytest.raises(TextDataError, match="line end"):
        text.Split(train=[("a\rb", "c")], dev=[], test=[]).save(tmp_path / "data")
    assert not (tmp_path / "data" / "train.src").exists()


def _stdin(monkeypatch, raw: bytes):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))


def test_stdin_line_ends_blank_lines_and_bad_bytes(mt_run, monkeypatch, capsys):
    _stdin(monkeypatch, b"the king\rthe woman\r\n\nthe man\n")
    assert translate_eval.main([str(mt_run), "--checkpoint", "last", "--beam_size", "1"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert len(lines) == 5 and lines[2] == "" and lines[4] == "" and all(lines[i] for i in (0, 1, 3))
    raw = b"the king\n\nthe \xff man\n"
    _stdin(monkeypatch, raw)
    err = _refused(translate_eval.main, [str(mt_run), "--checkpoint", "last"], capsys, "stdin: line 3", mt_run)
    assert f"byte offset {raw.index(BAD_BYTE)}:" in err
    # a sentence too long for the model: named by its physical line, blank lines counted
    _stdin(monkeypatch, b"the king\n\n" + b"the king " * 300 + b"\n")
    err = _refused(translate_eval.main, [str(mt_run), "--checkpoint", "last"], capsys, "stdin line 3", mt_run)
    assert "max_len" in err


def test_a_too_long_training_line_is_named_by_file_and_line(corpus, tmp_path, capsys):
    lines = (corpus / "train.en").read_text().splitlines()
    at = len(lines) // 3
    lines[at] = " ".join(["the king"] * 40)
    src = tmp_path / "long.en"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "runs"
    argv = ["--src", str(src), "--tgt", str(corpus / "train.es"), "--out", str(out), *MT, "--max_steps", "1",
            "--model_args.max_len", "40"]
    assert translate.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{src} / {corpus / 'train.es'} line {at + 1}" in err and "max_len" in err, err
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------------------------
# 3. decoding options and token ids


def _model():
    torch.manual_seed(0)
    cfg = TranslationConfig(vocab_size=30, dim=16, heads=2, ffn_hidden=24, enc_layers=1, dec_layers=1, dropout=0.0)
    return EncoderDecoder(cfg).eval()


def _src():
    return torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])


@pytest.mark.parametrize("options, error, name", [
    (dict(length_penalty=float("nan")), ValueError, "length_penalty"),
    (dict(length_penalty=float("inf")), ValueError, "length_penalty"),
    (dict(length_penalty=-0.5), ValueError, "length_penalty"),
    (dict(length_penalty="1.0"), TypeError, "length_penalty"),
    (dict(length_penalty=True), TypeError, "length_penalty"),
    (dict(max_len_a=float("inf")), ValueError, "max_len_a"),
    (dict(max_len_a=float("nan")), ValueError, "max_len_a"),
    (dict(max_len_a="1.2"), TypeError, "max_len_a"),
    (dict(max_len_b=float("inf")), TypeError, "max_len_b"),
    (dict(max_len_b=float("nan")), TypeError, "max_len_b"),
    (dict(max_len_b=2.5), TypeError, "max_len_b"),
    (dict(max_len_b=-1), ValueError, "max_len_b"),
    (dict(beam_size=True), TypeError, "beam_size"),
    (dict(beam_size=2.0), TypeError, "beam_size"),
    (dict(beam_size=0), ValueError, "beam_size"),
    (dict(n_best=True), TypeError, "n_best"),
    (dict(beam_size=2, n_best=3), ValueError, "n_best"),
])
def test_beam_search_options_are_checked(options, error, name):
    with pytest.raises(error, match=name):
        beam_search(_model(), _src(), **{"beam_size": 2, **options})


def test_greedy_and_translate_ids_check_their_options_too():
    model = _model()
    with pytest.raises(ValueError, match="max_len_a"):
        greedy_search(model, _src(), max_len_a=float("nan"))
    with pytest.raises(TypeError, match="max_len_b"):
        greedy_search(model, _src(), max_len_b=float("inf"))
    with pytest.raises(ValueError, match="length_penalty"):  # unused by greedy search, still not NaN
        translate_ids(model, _src(), beam_size=1, length_penalty=float("nan"))
    with pytest.raises(TypeError, match="beam_size"):
        translate_ids(model, _src(), beam_size=True)


def test_valid_options_keep_working():
    model, src = _model(), _src()
    plain = beam_search(model, src, beam_size=2, length_penalty=0, max_len_a=1, max_len_b=3)
    numpy = beam_search(model, src, beam_size=np.int64(2), length_penalty=np.float64(0.0), max_len_a=np.float32(1),
                        max_len_b=np.int64(3))
    assert [[h.tokens for h in hs] for hs in plain] == [[h.tokens for h in hs] for hs in numpy]
    assert greedy_search(model, src, max_len_a=0, max_len_b=2) == greedy_search(model, src.int(), max_len_a=0,
                                                                                 max_len_b=np.int32(2))
    huge = greedy_search(model, src, max_len_a=1e308, max_len_b=0)  # capped at the model's max_len, no overflow
    assert all(len(h) < model.config.max_len for h in huge)
    assert check_search_options(beam_size=np.int64(3), max_len_b=np.int16(4)) == {
        "beam_size": 3, "length_penalty": 1.0, "max_len_a": 1.2, "max_len_b": 4, "n_best": 1}


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.bool, torch.float32])
def test_source_ids_of_an_odd_dtype_are_refused(dtype):
    for search in (greedy_search, beam_search):
        with pytest.raises(TypeError, match=rf"src must be .*int64.*{str(dtype).split('.')[-1]}"):
            search(_model(), _src().to(dtype))


def test_translate_texts_checks_its_batches_and_names(mt_run, tokenizer):
    model, _, _ = translate_eval.load_run(mt_run, "last")
    for bad, error in ((0, ValueError), (True, TypeError), (2.0, TypeError)):
        with pytest.raises(error, match="batch_sentences"):
            etranslate.translate_texts(model, tokenizer, ["the king"], batch_sentences=bad)
    with pytest.raises(TypeError, match="texts must be a sequence"):
        etranslate.translate_texts(model, tokenizer, "the king")
    with pytest.raises(ValueError, match="names"):
        etranslate.translate_texts(model, tokenizer, ["the king"], names=["a", "b"])
    with pytest.raises(ValueError, match="length_penalty"):
        etranslate.evaluate_translation(model, tokenizer, [("the king", "el rey")], length_penalty=float("nan"))
    with pytest.raises(TypeError, match=r"pairs\[0\]"):
        etranslate.evaluate_translation(model, tokenizer, ["the king\tel rey"])


@pytest.mark.parametrize("texts", [5, None, b"the king", 2.5])
def test_encode_refuses_what_is_not_text(texts, tokenizer):
    for method in (tokenizer.encode, tokenizer.encode_pieces):
        with pytest.raises(TypeError, match="texts must be a str or a sequence of str"):
            method(texts)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        tokenizer.encode(["the king", 5])


def test_decode_refuses_ids_of_an_odd_dtype(tokenizer):
    ids = tokenizer.encode("the king said")
    want = tokenizer.decode(ids)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.bool, torch.float32):
        with pytest.raises(TypeError, match="ids must"):
            tokenizer.decode(torch.tensor(ids).to(dtype))
        with pytest.raises(TypeError, match="ids must"):
            tokenizer.decode(torch.tensor([ids]).to(dtype))
    for dtype in (np.uint8, np.int16, np.bool_, np.float64):
        with pytest.raises(TypeError, match="ids must"):
            tokenizer.decode(np.array(ids).astype(dtype))
        with pytest.raises(TypeError, match="ids must"):
            tokenizer.decode([dtype(i) for i in ids])
    for bad in ("abc", 5, None):
        with pytest.raises(TypeError, match="ids must"):
            tokenizer.decode(bad)
    # what worked keeps working: int64/int32 tensors, numpy int64 arrays and scalars, lists of tensors
    assert tokenizer.decode(torch.tensor(ids)) == want == tokenizer.decode(torch.tensor(ids, dtype=torch.int32))
    assert tokenizer.decode(np.array(ids)) == want == tokenizer.decode([np.int64(i) for i in ids])
    assert tokenizer.decode([torch.tensor(ids)]) == [want]


def test_collate_and_token_batches_refuse_ids_of_an_odd_dtype():
    good = [[5, 6], [7]]
    for dtype in (torch.uint8, torch.int16, torch.bool, torch.float16):
        rows = [torch.tensor(r).to(dtype) for r in good]
        with pytest.raises(TypeError, match=r"src_ids\[0\] must hold int64"):
            text.collate(rows, good)
        with pytest.raises(TypeError, match=r"tgt_ids\[0\] must hold int64"):
            text.TokenBatches(good, rows, max_tokens=10)
    for dtype in (np.uint8, np.int16, np.bool_):
        with pytest.raises(TypeError, match=r"src_ids\[0\] must hold"):
            text.collate([np.array(r).astype(dtype) for r in good], good)
        with pytest.raises(TypeError, match=r"src_ids\[0\] must hold"):
            text.collate([[dtype(i) for i in r] for r in good], good)
    for bad in (5, "ab"):
        with pytest.raises(TypeError, match="src_ids must be a sequence"):
            text.collate(bad, good)
    want = text.collate(good, good)
    for rows in ([torch.tensor(r) for r in good], [torch.tensor(r, dtype=torch.int32) for r in good],
                 [np.array(r) for r in good], [[np.int64(i) for i in r] for r in good]):
        got = text.collate(rows, good)
        assert torch.equal(got.src, want.src) and got.src.dtype == torch.long


def test_pair_origins_name_a_file_line_or_the_sentence(mt_run, tmp_path):
    split = text.Split(train=[("the king", "el rey"), ("a house " * 20, "una casa")], dev=[("the man", "el hombre")],
                       test=[])
    cfg = translate.load_mt_config(None)  # the Bible: no file to name
    origins = translate.PairOrigins(cfg, tmp_path, True, split)
    assert origins("train", 0) == "source 'the king'" and origins("train", 1).endswith("...'")
    resumed = translate.PairOrigins(cfg, mt_run, False, split)  # a resumed run reads RUN_DIR/data
    assert resumed("dev", 0) == f"{mt_run / 'data' / 'dev.src'} / dev.tgt line 1"
    (tmp_path / "d.en").write_text("the man\n")
    (tmp_path / "d.es").write_text("el hombre\n")
    files = {**cfg, "src": str(tmp_path / "t.en"), "tgt": str(tmp_path / "t.es"), "dev_src": str(tmp_path / "d.en"),
             "dev_tgt": str(tmp_path / "d.es")}
    (tmp_path / "t.en").write_text("a house\nthe king\nthe king\n")
    (tmp_path / "t.es").write_text("una casa\nel rey\nel rey\n")
    fresh = translate.PairOrigins(files, tmp_path, True, split)
    assert fresh("train", 0) == f"{tmp_path / 't.en'} / {tmp_path / 't.es'} line 2"  # its first appearance
    assert fresh("dev", 0) == f"{tmp_path / 'd.en'} / {tmp_path / 'd.es'} line 1"


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.bool, torch.float32])
def test_model_encode_and_decode_refuse_odd_id_dtypes(dtype):
    model = EncoderDecoder(TranslationConfig(vocab_size=16, dim=16, heads=2, ffn_hidden=32, enc_layers=1,
                                             dec_layers=1, dropout=0.0))
    ids = torch.ones(2, 3).to(dtype)
    with pytest.raises(TypeError, match=r"src must be .*integer tensor .*\(int64 or int32\)"):
        model.encode(ids)
    memory = model.encode(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"tgt_in must be .*\(int64 or int32\)"):
        model.decode(ids, memory)
    assert model.encode(torch.ones(2, 3, dtype=torch.int32)).states.shape[0] == 2  # int32 still works
