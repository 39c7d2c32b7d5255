"""CTranslate2 export: the exported model translates (greedy) and scores like the gatezoo model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gatezoo.eval.decode import greedy_search
from gatezoo.models import EOS_ID, EncoderDecoder, TranslationConfig
from gatezoo.models.export import ctranslate2_available, export_ctranslate2

ctranslate2 = pytest.importorskip("ctranslate2")

V = 40
VOCAB = ["<pad>", "<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(4, V)]
LIMIT = 20  # gatezoo's length limit (generated tokens, EOS included) = CTranslate2's max_decoding_length + 1
CT2_OPTIONS = {"beam_size": 1, "max_decoding_length": LIMIT - 1, "min_decoding_length": 0,
               "suppress_sequences": [["<pad>"], ["<s>"]]}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one thread is faster and does not fight other work for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(ffn: str = "mlp-relu", *, bias: bool = True, steps: int = 0, seed: int = 0,
               norm_eps: float = 1e-5, norm_position: str = "pre", **fields) -> EncoderDecoder:
    """A 2+2 layer, dim 32 model, trained ``steps`` Adam steps to reverse random token sequences;
    ``fields``: more TranslationConfig fields."""
    torch.manual_seed(seed)
    model = EncoderDecoder(TranslationConfig(vocab_size=V, dim=32, enc_layers=2, dec_layers=2, heads=4, ffn_hidden=64,
                                             dropout=0.0, max_len=64, ffn=ffn, bias=bias,
                                             norm_eps=norm_eps, norm_position=norm_position, **fields))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        src = torch.randint(4, V, (32, int(torch.randint(3, 11, (1,), generator=g))), generator=g)
        tgt = src.flip(1)
        bos, eos = torch.full((32, 1), 2), torch.full((32, 1), EOS_ID)
        logits = model(src, torch.cat([bos, tgt], 1))
        loss = F.cross_entropy(logits.reshape(-1, V), torch.cat([tgt, eos], 1).reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def sample_sentences(n: int = 48, seed: int = 123) -> tuple[list[list[int]], torch.Tensor]:
    """``n`` random sentences of 1 to 12 tokens, as id lists and as a padded batch."""
    g = torch.Generator().manual_seed(seed)
    sents = [torch.randint(4, V, (int(torch.randint(1, 13, (1,), generator=g)),), generator=g).tolist()
             for _ in range(n)]
    src = torch.zeros(n, max(map(len, sents)), dtype=torch.long)
    for i, s in enumerate(sents):
        src[i, :len(s)] = torch.tensor(s)
    return sents, src


def ct2_translate(path, sents: list[list[int]], **options) -> list[list[int]]:
    translator = ctranslate2.Translator(str(path), device="cpu", compute_type="float32", intra_threads=1)
    results = translator.translate_batch([[VOCAB[i] for i in s] for s in sents], **{**CT2_OPTIONS, **options})
    return [[VOCAB.index(t) for t in r.hypotheses[0]] for r in results]


@pytest.mark.parametrize("ffn, bias, norm_position", [("mlp-relu", True, "pre"), ("mlp-gelu", True, "pre"),
                                                     ("swiglu", False, "pre"), ("mlp-relu", True, "post")])
def test_ctranslate2_greedy_and_scores_match(tmp_path, ffn, bias, norm_position):
    model = tiny_model(ffn, bias=bias, steps=100, norm_position=norm_position)
    path = export_ctranslate2(model, tmp_path / "ct2", VOCAB)
    assert path == tmp_path / "ct2" and (path / "model.bin").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2"]  # no temporary directory left
    _assert_ct2_matches(model, path)


def test_untied_source_embedding_and_attention_dropout_export(tmp_path):
    """A model with its own source embedding, trained with attention dropout, exports: the
    encoder gets src_embed, the decoder and the output projection embed, and CTranslate2 then
    translates and scores as the model does (attention dropout is training-only, nothing to export)."""
    model = tiny_model(steps=100, tie_source_embedding=False, attn_dropout=0.1)
    assert not torch.equal(model.src_embed.weight, model.embed.weight)
    path = export_ctranslate2(model, tmp_path / "ct2", VOCAB)
    _assert_ct2_matches(model, path)
    with torch.no_grad():  # swapping the two tables changes the translations: CT2 read each one
        model.src_embed.weight.copy_(model.embed.weight)
    swapped = export_ctranslate2(model, tmp_path / "tied", VOCAB)
    sents, _ = sample_sentences()
    assert ct2_translate(swapped, sents) != ct2_translate(path, sents)
    assert (swapped / "model.bin").stat().st_size < (path / "model.bin").stat().st_size  # one table, aliased


def _assert_ct2_matches(model, path):
    """CTranslate2's greedy translations of sample sentences are the model's, token by token, and
    its scores of them are the model's log-probabilities."""
    sents, src = sample_sentences()
    ours = greedy_search(model, src, max_len_a=0, max_len_b=LIMIT)
    theirs = ct2_translate(path, sents)
    assert len({len(o) for o in ours}) >= 4, "degenerate outputs: the comparison would say little"
    assert ours == theirs  # every sentence, token by token

    translator = ctranslate2.Translator(str(path), device="cpu", compute_type="float32", intra_threads=1)
    scored = translator.score_batch([[VOCAB[i] for i in s] for s in sents[:16]],
                                    [[VOCAB[i] for i in t] for t in ours[:16]])
    with torch.no_grad():
        for s, t, res in zip(sents, ours, scored):
            assert res.tokens == [VOCAB[i] for i in t] + ["</s>"]
            logp = F.log_softmax(model(torch.tensor([s]), torch.tensor([[2, *t]])), -1)[0]
            ref = logp[torch.arange(len(t) + 1), torch.tensor([*t, EOS_ID])]
            torch.testing.assert_close(torch.tensor(res.log_probs), ref, atol=1e-4, rtol=0)


def test_config_and_vocabulary(tmp_path):
    model = tiny_model(norm_eps=1e-6)
    path = export_ctranslate2(model, tmp_path / "ct2", VOCAB)
    config = json.loads((path / "config.json").read_text())
    assert config["layer_norm_epsilon"] == pytest.approx(1e-6)
    assert (config["unk_token"], config["bos_token"], config["eos_token"], config["decoder_start_token"]) == \
        ("<unk>", "<s>", "</s>", "<s>")
    assert config["add_source_bos"] is False and config["add_source_eos"] is False
    assert json.loads((path / "shared_vocabulary.json").read_text()) == VOCAB
    assert ctranslate2_available()


def test_ctranslate2_length_quirks(tmp_path):
    """CTranslate2 asks for one token before EOS unless min_decoding_length=0, and stops without EOS after
    max_decoding_length tokens, where gatezoo forces EOS at its limit: LIMIT - 1 tokens either way."""
    model = tiny_model()
    sents, src = sample_sentences(8)
    with torch.no_grad():  # every position's argmax is EOS
        model.dec_norm.weight.zero_()
        model.dec_norm.bias.copy_(50 * model.embed.weight[EOS_ID])
    path = export_ctranslate2(model, tmp_path / "eos", VOCAB)
    assert greedy_search(model, src) == [[]] * 8 == ct2_translate(path, sents)
    assert all(len(t) == 1 for t in ct2_translate(path, sents, min_decoding_length=1))  # CT2's default
    with torch.no_grad():  # EOS never wins: the length limit binds
        model.dec_norm.bias.copy_(-50 * model.embed.weight[EOS_ID])
    path = export_ctranslate2(model, tmp_path / "no_eos", VOCAB)
    ours = greedy_search(model, src, max_len_a=0, max_len_b=LIMIT)
    assert [len(t) for t in ours] == [LIMIT - 1] * 8
    assert ct2_translate(path, sents) == ours


@pytest.mark.parametrize("ffn", ["mlp-xgelu", "mlp-atlu", "atglu", "xswiglu2", "geglu1"])
def test_unsupported_feedforward_is_refused(tmp_path, ffn):
    with pytest.raises(ValueError, match="CTranslate2 has no"):
        export_ctranslate2(tiny_model(ffn), tmp_path / "out", VOCAB)
    assert not any(tmp_path.iterdir())


def test_rela_and_other_models_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"no rectified linear attention \(ReLA\), which this model uses in its "
                                         r"encoder, decoder, cross attention; only softmax"):
        export_ctranslate2(EncoderDecoder(vocab_size=V, dim=32, heads=4, ffn_hidden=64, attention="rela"),
                           tmp_path / "out", VOCAB)
    with pytest.raises(ValueError, match=r"\(ReLA\), which this model uses in its cross attention; only softmax"):
        export_ctranslate2(EncoderDecoder(vocab_size=V, dim=32, heads=4, ffn_hidden=64, cross_attention="rela"),
                           tmp_path / "out", VOCAB)
    with pytest.raises(ValueError, match="takes a gatezoo EncoderDecoder, got Linear"):
        export_ctranslate2(torch.nn.Linear(2, 2), tmp_path / "out", VOCAB)
    assert not any(tmp_path.iterdir())


def test_vocabulary_must_fit(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="vocabulary has 39 pieces but the model's vocab_size is 40"):
        export_ctranslate2(model, tmp_path / "out", VOCAB[:-1])
    with pytest.raises(ValueError, match="must start with the special pieces"):
        export_ctranslate2(model, tmp_path / "out", ["<unk>", "<pad>", *VOCAB[2:]])
    with pytest.raises(ValueError, match="unique"):
        export_ctranslate2(model, tmp_path / "out", [*VOCAB[:-1], "t4"])
    assert not any(tmp_path.iterdir())


def test_existing_directory_needs_force_and_failures_write_nothing(tmp_path, monkeypatch):
    model = tiny_model()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ValueError, match="not empty; pass force=True"):
        export_ctranslate2(model, out, VOCAB)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    from ctranslate2.specs import transformer_spec

    def broken_save(self, output_dir):
        (Path(output_dir) / "model.bin").write_bytes(b"half")
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(transformer_spec.TransformerSpec, "save", broken_save, raising=False)
        with pytest.raises(OSError, match="disk full"):
            export_ctranslate2(model, out, VOCAB, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the temporary directory is gone
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the old directory is untouched

    export_ctranslate2(model, out, VOCAB, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.bin", "shared_vocabulary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_ctranslate2(model, empty, VOCAB) / "model.bin").is_file()  # an empty directory needs no force


def test_missing_ctranslate2_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)
    assert not ctranslate2_available()
    with pytest.raises(ImportError, match="pip install ctranslate2"):
        export_ctranslate2(tiny_model(), tmp_path / "out", VOCAB)
    assert not any(tmp_path.iterdir())
