"""Translation: the EncoderDecoder's decoding interface, greedy and beam search, the training
command end to end on a tiny corpus (train, save, resume, decode, evaluate) and its errors."""

import io
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from gatezoo.eval import translate as etranslate
from gatezoo.eval.decode import beam_search, greedy_search, translate_ids
from gatezoo.models import BOS_ID, EOS_ID, PAD_ID, EncoderDecoder, TranslationConfig, create_model, list_models
from gatezoo.train import translate, translate_eval
from gatezoo.train.core.config import ConfigError

SMALL = dict(vocab_size=40, dim=32, heads=4, ffn_hidden=48, enc_layers=2, dec_layers=2, dropout=0.0)


def _model(attention="softmax", ffn="mlp-relu", seed=0, **kw):
    torch.manual_seed(seed)
    model = EncoderDecoder(TranslationConfig(**{**SMALL, "attention": attention, "ffn": ffn, **kw})).double().eval()
    with torch.no_grad():  # sharper, non-degenerate next-token distributions than the initialisation's
        model.embed.weight.mul_(4.0)
    return model


def _src(b=5, s=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, SMALL["vocab_size"], (b, s), generator=g)
    for i in range(b):  # ragged lengths, padded with 0
        src[i, s - i:] = PAD_ID
    return src


def _check_stepwise_decoding(model, length, tol):
    """Decode random targets of ``length`` tokens one step at a time through the caches and check
    the logits against the full forward; returns (src, tgt, full logits)."""
    src = _src()
    tgt = torch.randint(4, SMALL["vocab_size"], (src.shape[0], length))
    tgt[:, 0] = BOS_ID
    full = model(src, tgt)
    memory, cache, steps = model.encode(src), None, []
    for i in range(tgt.shape[1]):
        logits, cache = model.decode_step(tgt[:, i:i + 1], memory, cache)
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=tol, atol=tol)
    return src, tgt, full


# ---------------------------------------------------------------------------------------------
# model and decoding interface


def test_presets_in_the_registry():
    assert {"transformer_mt_tiny", "transformer_mt_tiny_rela"} <= set(list_models())
    model = create_model("transformer_mt_tiny_rela", vocab_size=500)
    cfg = model.config
    assert (cfg.dim, cfg.enc_layers, cfg.dec_layers, cfg.heads, cfg.ffn_hidden) == (256, 3, 3, 4, 1024)
    assert cfg.attention == "rela" and create_model("transformer_mt_tiny", vocab_size=500).config.attention == "softmax"
    logits = model(torch.randint(4, 500, (2, 7)), torch.randint(4, 500, (2, 5)))
    assert logits.shape == (2, 5, 500)


@pytest.mark.parametrize("attention", ["softmax", "rela"])
@pytest.mark.parametrize("ffn", ["mlp-relu", "swiglu", "moe"])
def test_cached_decoding_equals_the_full_forward(attention, ffn):
    model = _model(attention, ffn)
    # a mixture of experts computes its routing weights in float32, whatever the model's dtype
    tol = 1e-6 if ffn == "moe" else 1e-10
    src, tgt, full = _check_stepwise_decoding(model, 7, tol)
    # several tokens at once after a cached prefix
    memory, cache = model.encode(src), None
    _, cache = model.decode_step(tgt[:, :3], memory, cache)
    logits, _ = model.decode_step(tgt[:, 3:], memory, cache)
    torch.testing.assert_close(logits, full[:, -1], rtol=tol, atol=tol)


@pytest.mark.parametrize("attention", ["softmax", "rela"])
def test_post_norm_layers_and_cached_decoding(attention):
    model = _model(attention, norm_position="post")
    assert isinstance(model.enc_norm, torch.nn.Identity) and isinstance(model.dec_norm, torch.nn.Identity)
    layer, x = model.encoder[0], torch.randn(3, 6, SMALL["dim"], dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    h = layer.norm1(x + layer.attn(x, key_padding_mask=mask))
    torch.testing.assert_close(layer(x, mask), layer.norm2(h + layer.ffn(h)), rtol=0, atol=0)
    pre = _model(attention)  # same seed, same weights: only the norm placement differs
    pre.load_state_dict(model.state_dict(), strict=False)
    src, tgt, full = _check_stepwise_decoding(model, 6, 1e-10)
    assert not torch.allclose(full, pre(src, tgt))


@pytest.mark.parametrize("place, other", [("encoder", "softmax"), ("decoder", "softmax"), ("cross", "softmax"),
                                          ("cross", "rela")])
def test_attention_per_place(place, other):
    from gatezoo.blocks import ReLAAttention, SoftmaxAttention

    flip = "rela" if other == "softmax" else "softmax"
    model = _model(other, **{f"{place}_attention": flip})
    kinds = {"encoder": [layer.attn for layer in model.encoder],
             "decoder": [layer.self_attn for layer in model.decoder],
             "cross": [layer.cross_attn for layer in model.decoder]}
    cls = {"softmax": SoftmaxAttention, "rela": ReLAAttention}
    for where, blocks in kinds.items():
        want = flip if where == place else other
        assert model.config.attention_at(where) == want
        assert all(type(b) is cls[want] for b in blocks), (where, [type(b).__name__ for b in blocks])
    _check_stepwise_decoding(model, 6, 1e-10)  # a mixed model decodes through its caches too
    with pytest.raises(ValueError, match=r"place must be one of \('encoder', 'decoder', 'cross'\), got 'self'"):
        model.config.attention_at("self")


@pytest.mark.parametrize("attention", ["softmax", "rela"])
def test_attn_dropout_field(attention):
    """attn_dropout reaches every attention block; it acts in training only, so an eval model equals
    the same weights without it and still decodes through its caches."""
    model = _model(attention, attn_dropout=0.3)
    blocks = [m for layer in (*model.encoder, *model.decoder) for m in layer.modules()
              if hasattr(m, "_attn_p")]
    assert len(blocks) == SMALL["enc_layers"] + 2 * SMALL["dec_layers"]
    assert all(b.attn_dropout == 0.3 for b in blocks)
    plain = _model(attention)
    plain.load_state_dict(model.state_dict())
    src, tgt, full = _check_stepwise_decoding(model, 6, 1e-10)
    torch.testing.assert_close(full, plain(src, tgt), rtol=0, atol=0)
    torch.manual_seed(0)
    trained = model.train()(src, tgt)
    assert torch.isfinite(trained).all() and not torch.allclose(trained, full)
    assert _model(attention).encoder[0].attn.attn_dropout == 0.0  # the default: no attention dropout


@pytest.mark.parametrize("attention", ["softmax", "rela"])
def test_untied_source_embedding(attention):
    """tie_source_embedding=False: the encoder reads its own table (src_embed), the target
    embedding and the output projection stay one matrix, and cached decoding equals the full
    forward. The default keeps today's state dict (no src_embed)."""
    tied = _model(attention)
    assert tied.src_embed is None and tied.source_embedding is tied.embed
    assert not any(k.startswith("src_embed") for k in tied.state_dict())
    model = _model(attention, tie_source_embedding=False)
    assert isinstance(model.src_embed, torch.nn.Embedding) and model.source_embedding is model.src_embed
    assert model.src_embed.weight.data_ptr() != model.embed.weight.data_ptr()
    assert torch.equal(model.src_embed.weight[PAD_ID], torch.zeros(SMALL["dim"], dtype=torch.float64))
    n = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in tied.parameters())
    assert n == SMALL["vocab_size"] * SMALL["dim"]
    src, tgt, full = _check_stepwise_decoding(model, 6, 1e-10)
    states = model.encode(src).states
    with torch.no_grad():  # the target table no longer reaches the encoder; the source table does
        model.embed.weight[4:].add_(torch.randn(SMALL["vocab_size"] - 4, SMALL["dim"], dtype=torch.float64))
        torch.testing.assert_close(model.encode(src).states, states, rtol=0, atol=0)
        assert not torch.allclose(model(src, tgt), full)  # it still embeds the target and projects
        model.src_embed.weight[4:].add_(torch.randn(SMALL["vocab_size"] - 4, SMALL["dim"], dtype=torch.float64))
        assert not torch.allclose(model.encode(src).states, states)
    logits = model(src, tgt)
    torch.testing.assert_close(logits, model.dec_norm(_decoder_states(model, src, tgt)) @ model.embed.weight.t())


def _decoder_states(model, src, tgt):
    memory = model.encode(src)
    x = model._embed(tgt)
    for layer in model.decoder:
        x = layer(x, memory.states, memory.mask)
    return x


@pytest.mark.parametrize("attention", ["softmax", "rela"])
def test_new_fields_trace_without_graph_breaks(attention):
    """In training, with attention dropout (a ReLA seed drawn inside the trace) and an untied source
    embedding, the model still compiles as one graph, and the compiled model trains."""
    model = EncoderDecoder(**{**SMALL, "attention": attention, "attn_dropout": 0.1, "tie_source_embedding": False})
    src, tgt = _src(2, 5), torch.randint(4, SMALL["vocab_size"], (2, 4))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.train())(src, tgt)
    assert explained.graph_count == 1 and not explained.break_reasons
    torch._dynamo.reset()
    logits = torch.compile(model, backend="aot_eager", fullgraph=True)(src, tgt)
    logits.square().mean().backward()
    assert torch.isfinite(logits).all() and model.src_embed.weight.grad is not None


@pytest.mark.parametrize("field, value, exc, match", [
    ("attn_dropout", 1.0, ValueError, r"attn_dropout must be in \[0, 1\)"),
    ("attn_dropout", -0.1, ValueError, "attn_dropout must be in"),
    ("attn_dropout", float("nan"), ValueError, "attn_dropout must be in"),
    ("attn_dropout", "0.1", TypeError, "attn_dropout must be a number"),
    ("tie_source_embedding", "false", TypeError, "tie_source_embedding must be true or false"),
    ("tie_source_embedding", 0, TypeError, "tie_source_embedding must be true or false"),
])
def test_new_fields_refuse_bad_values(field, value, exc, match):
    with pytest.raises(exc, match=match):
        TranslationConfig(**{field: value}).validate()
    with pytest.raises(exc, match=match):
        EncoderDecoder(**SMALL, **{field: value})


def test_reorder_permutes_every_cache():
    model = _model("rela")
    src = _src()
    tgt = torch.randint(4, SMALL["vocab_size"], (src.shape[0], 5))
    tgt[:, 0] = BOS_ID
    perm = torch.tensor([3, 0, 4, 1, 2])
    memory, cache = model.encode(src), None
    for i in range(3):
        _, cache = model.decode_step(tgt[:, i:i + 1], memory, cache)
    before = [(c.k.clone(), c.v.clone()) for c in (*cache.self_attn, *cache.cross_attn)]
    cache.reorder(perm)
    for (k, v), c in zip(before, (*cache.self_attn, *cache.cross_attn)):
        assert torch.equal(c.k, k[perm]) and torch.equal(c.v, v[perm])
    # decoding on from the permuted state equals decoding the permuted batch from scratch
    memory = memory.select(perm)
    out = [model.decode_step(tgt[perm, i:i + 1], memory, cache)[0] for i in range(3, 5)][-1]
    torch.testing.assert_close(out, model(src[perm], tgt[perm])[:, -1], rtol=1e-10, atol=1e-10)
    # dropping rows (finished sentences) works the same way
    cache.reorder(torch.tensor([1, 3]))
    assert all(c.k.shape[0] == 2 for c in (*cache.self_attn, *cache.cross_attn))


def test_reorder_within_sentences_keeps_the_cross_attention_cache():
    # beams of one sentence share their cross-attention keys/values and memory: reordering beams
    # within their sentences leaves them in place (no copy), and decoding stays exact
    model = _model("softmax")
    src = _src(b=3)
    expand = torch.arange(3).repeat_interleave(2)  # 2 beams per sentence
    memory = model.encode(src).select(expand)
    tgt = torch.randint(4, SMALL["vocab_size"], (6, 4))
    tgt[:, 0] = BOS_ID
    _, cache = model.decode_step(tgt[:, :2], memory, None)
    cross = [c.k for c in cache.cross_attn]
    swap = torch.tensor([1, 1, 2, 3, 5, 4])  # rows stay within their sentence
    cache.reorder(swap)
    assert memory.select(swap) is memory
    assert all(c.k is k for c, k in zip(cache.cross_attn, cross))
    logits, _ = model.decode_step(tgt[swap, 2:4], memory, cache)
    torch.testing.assert_close(logits, model(src[expand[swap]], tgt[swap])[:, -1], rtol=1e-10, atol=1e-10)
    # a sentence leaving the batch copies them
    drop = torch.tensor([0, 1, 4, 5])
    cache.reorder(drop)
    assert cache.cross_attn[0].k.shape[0] == 4 and memory.select(drop).states.shape[0] == 4


@pytest.mark.parametrize("attention", ["softmax", "rela"])
def test_beam_size_one_equals_greedy(attention):
    model = _model(attention)
    src = _src(b=6)
    greedy = greedy_search(model, src)
    beam = beam_search(model, src, beam_size=1)
    assert greedy == [h[0].tokens for h in beam]
    assert translate_ids(model, src, beam_size=1) == greedy
    assert len({len(g) for g in greedy}) > 1  # the outputs are not all one degenerate length


def test_greedy_equals_step_by_step_argmax_of_the_full_forward():
    model = _model()
    src = _src(b=3)
    for i, tokens in enumerate(greedy_search(model, src, max_len_a=0, max_len_b=6)):
        n, prefix = int((src[i] != 0).sum()), [BOS_ID]
        for _ in range(5):  # the 6th generated token is a forced EOS
            logits = model(src[i:i + 1, :n], torch.tensor([prefix]))[0, -1]
            logits[PAD_ID] = logits[BOS_ID] = -float("inf")
            nxt = int(logits.argmax())
            if nxt == EOS_ID:
                break
            prefix.append(nxt)
        assert tokens == prefix[1:]


def test_beam_search_finds_at_least_the_greedy_score_and_respects_limits():
    model = _model(seed=3)
    src = _src(b=4)
    greedy = greedy_search(model, src)
    beams = beam_search(model, src, beam_size=4, n_best=4, length_penalty=0.0)

    def logprob(i, tokens):
        n = int((src[i] != 0).sum())
        tgt = torch.tensor([[BOS_ID, *tokens]])
        with torch.no_grad():
            logp = torch.log_softmax(model(src[i:i + 1, :n], tgt)[0].float(), -1)
        return float(sum(logp[j, t] for j, t in enumerate([*tokens, EOS_ID])))

    for i, hyps in enumerate(beams):
        assert 1 <= len(hyps) <= 4
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        assert hyps[0].logprob == pytest.approx(logprob(i, hyps[0].tokens), abs=1e-6)
        if len(greedy[i]) + 1 < 1.2 * int((src[i] != 0).sum()) + 10:  # greedy ended by EOS, not by the limit
            assert hyps[0].logprob >= logprob(i, greedy[i]) - 1e-9
    limited = beam_search(model, src, beam_size=3, max_len_a=0.0, max_len_b=3)
    assert all(len(h[0].tokens) <= 2 for h in limited)  # 3 generated tokens, EOS included


def test_non_finite_logits_raise_instead_of_decoding_garbage():
    model = _model()
    with torch.no_grad():
        model.dec_norm.weight.fill_(float("nan"))
    for search in (greedy_search, lambda m, s: beam_search(m, s, beam_size=3)):
        with pytest.raises(FloatingPointError, match="non-finite logits"):
            search(model, _src())


def test_the_length_limit_reaches_max_len():
    model = _model(max_len=12)
    with torch.no_grad():  # a model that never ends: EOS never wins
        model.embed.weight[EOS_ID].fill_(-10.0)
    src = _src(b=2, s=6)
    assert all(len(t) == 11 for t in greedy_search(model, src, max_len_a=0, max_len_b=100))  # 11 + EOS = 12
    assert all(len(h[0].tokens) == 11 for h in beam_search(model, src, beam_size=2, max_len_a=0, max_len_b=100))


def test_decoding_errors():
    model = _model()
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, _src(), beam_size=0)
    with pytest.raises(ValueError, match="max_len"):
        model.encode(torch.ones(1, model.config.max_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="src"):
        model.encode(torch.ones(2, 3))
    with pytest.raises(ValueError, match="vocab_size"):
        model.encode(torch.full((1, 3), 999))
    with pytest.raises(ValueError, match="attention"):
        TranslationConfig(attention="linear").validate()
    with pytest.raises(ValueError, match="ffn"):
        TranslationConfig(ffn="mlp-tanh").validate()


# ---------------------------------------------------------------------------------------------
# the training command on a tiny corpus


TINY_MT = ["--model_args", "{dim: 32, enc_layers: 1, dec_layers: 1, heads: 2, ffn_hidden: 64}", "--vocab_size", "40",
           "--dev_size", "10", "--test_size", "10", "--max_tokens", "200", "--warmup_steps", "2", "--eval_every", "3",
           "--dev_sentences", "5", "--beam_size", "2", "--average_last", "3", "--progress", "false", "--threads", "1"]


def _train(corpus, out, *extra):
    argv = ["--src", str(corpus / "train.en"), "--tgt", str(corpus / "train.es"), "--out", str(out), *TINY_MT, *extra]
    assert translate.main(argv) == 0
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def test_train_resume_decode_evaluate(corpus, tmp_path, capsys, monkeypatch):
    full = _train(corpus, tmp_path / "full", "--max_steps", "8")
    part = _train(corpus, tmp_path / "part", "--max_steps", "4")
    for name in ("config.yaml", "spm.model", "metrics.csv", "last.safetensors", "best.safetensors", "state.pt",
                 "averaged.safetensors", "test.json", "test.hyp", "data/train.src", "data/test.tgt"):
        assert (full / name).is_file(), name
    assert translate.main(["--resume", str(part), "--max_steps", "8"]) == 0
    for name in ("last", "best", "averaged"):  # resume == uninterrupted, the averaged weights included
        a, b = load_file(str(full / f"{name}.safetensors")), load_file(str(part / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((full / "test.json").read_text())["bleu"] == json.loads((part / "test.json").read_text())["bleu"]
    rows = (part / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[:6] == ["epoch", "step", "train_loss", "train_acc", "dev_loss", "dev_bleu"]
    full_rows = (full / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in full_rows[1:]] == ["3", "6", "8"]
    assert [r.split(",")[1] for r in rows[1:]] == ["3", "4", "6", "8"]  # plus the row where the first part stopped
    assert [r.split(",")[2:6] for r in rows[1:] if r.split(",")[1] != "4"] == [r.split(",")[2:6] for r in full_rows[1:]]
    test = json.loads((full / "test.json").read_text())
    assert test["checkpoint"] == "averaged" and 0 <= test["bleu"] <= 100 and "nrefs:1" in test["bleu_signature"]
    # the translate command: stdin -> stdout, one line per input line
    monkeypatch.setattr(sys, "stdin", io.StringIO("the king said\n\nthe woman\n"))
    capsys.readouterr()
    assert translate_eval.main([str(full), "--beam_size", "2", "--checkpoint", "last"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""
    # the evaluate command on the run's test split
    assert translate_eval.main([str(full), "--evaluate", "--beam_size", "1", "--json", str(tmp_path / "ev.json")]) == 0
    out = capsys.readouterr().out
    assert "BLEU" in out and "chrF" in out and "nrefs:1" in out
    assert json.loads((tmp_path / "ev.json").read_text())["sentences"] == 10


def test_ctranslate2_comparison(corpus, tmp_path, capsys):
    pytest.importorskip("ctranslate2")
    run = _train(corpus, tmp_path / "runs", "--max_steps", "6", "--final_test", "false", "--lr", "0.01")
    capsys.readouterr()
    assert translate_eval.main([str(run), "--evaluate", "--ctranslate2", "--beam_size", "2", "--threads", "1",
                            "--checkpoint", "last", "--json", str(tmp_path / "ev.json")]) == 0
    assert "CTranslate2" in capsys.readouterr().out
    c = json.loads((tmp_path / "ev.json").read_text())["ctranslate2"]
    assert c["sentences"] == 10 and c["greedy_identical"] == 1.0 and c["speed_ratio"] > 0


def test_rela_run_prints_sparsity(corpus, tmp_path, capsys):
    run = _train(corpus, tmp_path / "rela", "--model", "transformer_mt_tiny_rela", "--max_steps", "3",
                 "--final_test", "false", "--average_last", "0")
    assert not (run / "test.json").exists()
    capsys.readouterr()
    assert translate_eval.main([str(run), "--evaluate", "--beam_size", "1", "--checkpoint", "last"]) == 0
    out = capsys.readouterr().out
    assert "ReLA sparsity" in out
    assert out.count("encoder self") == 1 and out.count("decoder self") == 1 and out.count("cross") == 1
    model, tokenizer, _ = translate_eval.load_run(run, "last")
    rows = etranslate.rela_sparsity(model, tokenizer, [("the king", "el rey")])
    assert len(rows) == 3
    for r in rows:
        assert set(r) == {"layer", "kind", "zero_share", "null_row_share", "full_row_share", "offset_share"}
        assert all(0 <= r[k] <= 1 for k in ("zero_share", "null_row_share", "full_row_share", "offset_share"))
        assert r["null_row_share"] + r["full_row_share"] <= 1


@pytest.mark.parametrize("causal, masked", [(False, True), (True, False)])
def test_rela_statistics_count_what_they_say(causal, masked):
    from gatezoo.blocks import ReLAAttention

    torch.manual_seed(3)
    attn = ReLAAttention(6, 2, bias=True).double().eval()
    x = torch.randn(1, 7, 6, dtype=torch.float64)
    x[0, 2] = 0.0  # a query whose scores are its bias term's alone
    mask = torch.tensor([[True] * 5 + [False] * 2]) if masked else None
    with etranslate.record_rela_sparsity(attn) as stats, torch.no_grad():
        attn(x, key_padding_mask=mask, causal=causal)
        q = attn.q(x)[0].view(7, 2, 3).transpose(0, 1)
        k = attn.kv(x)[0, :, :6].view(7, 2, 3).transpose(0, 1)
    (zeros, total, null, rows, full, offset, energy), = stats.values()
    want = [0, 0, 0, 0, 0, 0.0, 0.0]
    for h in range(2):
        for i in range(7):
            keys = [j for j in range(7) if (not causal or j <= i) and (mask is None or mask[0, j])]
            sc = [float(q[h, i] @ k[h, j]) / 3 ** 0.5 for j in keys]
            pos = sum(v > 0 for v in sc)
            want[0] += len(sc) - pos
            want[1] += len(sc)
            want[2] += pos == 0
            want[3] += 1
            want[4] += pos == len(sc)
            want[5] += len(sc) * (sum(sc) / len(sc)) ** 2
            want[6] += sum(v * v for v in sc)
    assert [zeros, total, null, rows, full] == want[:5]
    assert 0 < want[0] < want[1] and want[2] + want[4] > 0  # the case is not trivial
    assert offset == pytest.approx(want[5], rel=1e-9) and energy == pytest.approx(want[6], rel=1e-9)


def test_side_by_side_with_the_peers(corpus, tmp_path):
    pytest.importorskip("x_transformers")
    out = tmp_path / "sbs"
    argv = ["--src", str(corpus / "train.en"), "--tgt", str(corpus / "train.es"), "--out", str(out), *TINY_MT,
            "--max_steps", "3", "--beam_size", "1", "--models", "transformer_mt_tiny", "torch_transformer_mt_tiny",
            "xtransformer_mt_tiny"]
    assert translate.main(argv) == 0
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    rows = (run_dir / "sidebyside.csv").read_text().splitlines()
    assert rows[0].split(",") == list(translate.SIDEBYSIDE)
    assert [r.split(",")[0] for r in rows[1:]] == ["transformer_mt_tiny", "torch_transformer_mt_tiny",
                                                 "xtransformer_mt_tiny"]
    for name in ("transformer_mt_tiny", "torch_transformer_mt_tiny", "xtransformer_mt_tiny"):
        model, _, meta = translate_eval.load_run(run_dir / name, "last")  # each subdirectory is a complete run
        assert meta["model"] == name and meta["step"] == 3
        assert json.loads((run_dir / name / "test.json").read_text())["sentences"] == 10


def _error(capsys, argv):
    assert translate.main(argv) == 2
    return capsys.readouterr().err


def test_bad_input_errors_and_nothing_half_done(corpus, tmp_path, capsys):
    out = tmp_path / "runs"
    base = ["--out", str(out), *TINY_MT, "--max_steps", "1"]
    blank = tmp_path / "blank.en"
    blank.write_text("the king\n\nthe man\n")
    (tmp_path / "three.es").write_text("el rey\nla casa\nel hombre\n")
    (tmp_path / "two.es").write_text("el rey\nla casa\n")
    err = _error(capsys, ["--src", str(blank), "--tgt", str(tmp_path / "three.es"), *base])
    assert "blank.en" in err and "line 2" in err
    err = _error(capsys, ["--src", str(corpus / "train.en"), "--tgt", str(tmp_path / "two.es"), *base])
    assert "two.es" in err and "160" in err
    assert "unknown config key" in _error(capsys, ["--src", str(corpus / "train.en"), "--tgt",
                                                   str(corpus / "train.es"), "--no_such_key", "1", *base])
    assert "src and tgt" in _error(capsys, ["--src", str(corpus / "train.en"), *base])
    # a pair longer than the model allows
    err = _error(capsys, ["--src", str(corpus / "train.en"), "--tgt", str(corpus / "train.es"), *base,
                          "--model_args.max_len", "4"])
    assert "max_len" in err
    # a test sentence longer than the model allows stops the run before training
    long = tmp_path / "long.en"
    long.write_text(" ".join(["the king"] * 30) + "\n" + "the man\n")
    (tmp_path / "long.es").write_text("el rey\nel hombre\n")
    at = base.index("--test_size")  # test files replace the split-off test pairs: a size would do nothing
    err = _error(capsys, ["--src", str(corpus / "train.en"), "--tgt", str(corpus / "train.es"), *base[:at],
                          *base[at + 2:], "--test_src", str(long), "--test_tgt", str(tmp_path / "long.es"),
                          "--model_args.max_len", "40"])
    assert "test pair 1" in err and "max_len" in err
    assert not out.exists() or not any(out.iterdir())  # no half-made run directories


def test_long_input_to_the_translate_command(corpus, tmp_path, capsys, monkeypatch):
    run = _train(corpus, tmp_path / "runs", "--max_steps", "1", "--final_test", "false", "--model_args.max_len", "40")
    monkeypatch.setattr(sys, "stdin", io.StringIO(" ".join(["the king"] * 30) + "\n"))
    assert translate_eval.main([str(run), "--checkpoint", "last"]) == 2
    assert "max_len" in capsys.readouterr().err


def test_shipped_configs_load():
    import pathlib

    from gatezoo.train.core.factory import model_names

    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.stem for p in root.glob("transformer_mt*.yaml"))
    assert names == ["transformer_mt_multitask", "transformer_mt_quick", "transformer_mt_tiny"]
    for name in names:
        cfg = translate.load_mt_config(root / f"{name}.yaml")
        assert cfg["model"] in model_names() and cfg["data"] == "bible" and cfg["schedule"] == "inverse_sqrt"
        assert (cfg["vocab_size"], cfg["adam_beta2"], cfg["label_smoothing"]) == (8000, 0.98, 0.1)


def test_config_schema():
    cfg = translate.load_mt_config(None, ["--model", "transformer_mt_tiny_rela", "--beam_size", "4"])
    assert cfg["schedule"] == "inverse_sqrt" and cfg["adam_beta2"] == 0.98 and cfg["beam_size"] == 4
    with pytest.raises(ConfigError, match="did you mean --max_tokens"):
        translate.load_mt_config(None, ["--max-tokens", "100"])
    with pytest.raises(ConfigError, match="unknown config key"):
        translate.load_mt_config(None, ["--augment", "true"])  # an image key
