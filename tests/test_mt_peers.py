"""The translation peers of gatezoo.train.peers.translation: shapes, step-by-step decoding, padding, size, search."""

from __future__ import annotations

import warnings

import pytest
import torch

from gatezoo.eval.decode import beam_search, greedy_search
from gatezoo.models import create_model
from gatezoo.models.translation import BOS_ID, EOS_ID, Memory
from gatezoo.train.peers.translation import PrefixCache, create_mt_peer, list_mt_peers

VOCAB = 40
TINY = dict(dim=32, enc_layers=2, dec_layers=2, heads=2, ffn_hidden=64, max_len=24)
TORCH_PEER, X_PEER = "torch_transformer_mt_tiny", "xtransformer_mt_tiny"


@pytest.fixture(params=[TORCH_PEER, X_PEER])
def peer_name(request) -> str:
    if request.param == X_PEER:
        pytest.importorskip("x_transformers")
    return request.param


def tiny(name: str, **overrides) -> torch.nn.Module:
    return create_mt_peer(name, vocab_size=VOCAB, **{**TINY, **overrides})


def ids(b: int, t: int, *, bos: bool = False) -> torch.Tensor:
    x = torch.randint(EOS_ID + 1, VOCAB, (b, t))
    if bos:
        x[:, 0] = BOS_ID
    return x


def test_list_mt_peers():
    assert list_mt_peers() == sorted([TORCH_PEER, X_PEER])


def test_forward_shape_and_interface(peer_name):
    model = tiny(peer_name)
    assert model.max_len == 24 and model.vocab_size == VOCAB and model.model_name == peer_name
    src, tgt = ids(3, 7), ids(3, 5, bos=True)
    src[1, 4:] = 0
    logits = model(src, tgt)
    assert logits.shape == (3, 5, VOCAB) and torch.isfinite(logits).all()
    logits.sum().backward()  # trains end to end
    memory = model.encode(src)
    assert isinstance(memory, Memory) and memory.states.shape == (3, 7, 32)
    assert torch.equal(memory.mask, src != 0)
    step, cache = model.decode_step(tgt[:, :1], memory)
    assert step.shape == (3, VOCAB) and isinstance(cache, PrefixCache) and cache.length == 1


def test_no_warnings_and_no_nan_for_fully_padded_rows(peer_name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = tiny(peer_name)
        src, tgt = ids(3, 6), ids(3, 4, bos=True)
        src[2] = 0  # a sentence of padding only
        for train in (True, False):
            model.train(train)
            with torch.set_grad_enabled(train):
                out = model(src, tgt)
                step, _ = model.decode_step(tgt[:, :1], model.encode(src))
            assert torch.isfinite(out).all() and torch.isfinite(step).all()


def test_decode_step_matches_forward_with_reorder(peer_name):
    model = tiny(peer_name).double().eval()
    src, tgt = ids(3, 6), ids(3, 6, bos=True)
    src[0, 3:] = 0
    order = torch.arange(3)
    with torch.no_grad():
        memory, cache = model.encode(src), None
        for t in range(tgt.shape[1]):
            if t == 3:  # beams reorder: cache and memory follow the same permutation
                perm = torch.tensor([2, 0, 1])
                cache.reorder(perm)
                memory = memory.select(perm)
                order = order[perm]
            step, cache = model.decode_step(tgt[order, t:t + 1], memory, cache)
            full = model(src[order], tgt[order, :t + 1])[:, -1]
            torch.testing.assert_close(step, full, atol=1e-9, rtol=1e-9)
    assert cache.length == tgt.shape[1]


def test_source_padding_does_not_change_real_outputs(peer_name):
    model = tiny(peer_name).eval()
    sentence, tgt = ids(1, 5), ids(2, 4, bos=True)
    other = ids(1, 9)
    padded = torch.cat([torch.cat([sentence, torch.zeros(1, 4, dtype=torch.long)], 1), other])
    with torch.no_grad():
        alone = model(sentence, tgt[:1])
        batched = model(padded, tgt)
        memory = model.encode(padded)
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(memory.states[0, :5], model.encode(sentence).states[0], atol=1e-5, rtol=1e-5)


def test_parameter_count_close_to_preset(peer_name):
    def count(m):
        return sum(p.numel() for p in m.parameters())  # shared tensors once

    reference = count(create_model("transformer_mt_tiny", vocab_size=8000))
    peer = create_mt_peer(peer_name, vocab_size=8000)
    assert peer.max_len == 256
    n = count(peer)
    print(f"{peer_name}: {n} parameters, transformer_mt_tiny: {reference}")
    assert abs(n - reference) <= 0.2 * reference
    if peer_name == TORCH_PEER:
        assert n == reference  # same layers, biases and tying as the preset


def test_xtransformer_ties_embeddings_and_output():
    pytest.importorskip("x_transformers")
    model = tiny(X_PEER).model
    emb = model.encoder.token_emb.emb.weight
    assert model.decoder.net.token_emb.emb.weight is emb
    assert model.decoder.net.to_logits.weight is emb
    untied = tiny(X_PEER, tie_output=False).model
    assert untied.decoder.net.to_logits.weight is not untied.encoder.token_emb.emb.weight
    assert untied.decoder.net.token_emb is untied.encoder.token_emb


def test_greedy_and_beam_search_run(peer_name):
    model = tiny(peer_name).eval()
    src = ids(3, 5)
    src[1, 3:] = 0
    greedy = greedy_search(model, src, max_len_a=1.0, max_len_b=3)
    beams = beam_search(model, src, beam_size=3, max_len_a=1.0, max_len_b=3)
    assert len(greedy) == len(beams) == 3
    for seq in greedy + [hyps[0].tokens for hyps in beams]:
        assert isinstance(seq, list) and all(isinstance(t, int) for t in seq)
        assert len(seq) <= 7 and EOS_ID not in seq and BOS_ID not in seq


def test_length_and_shape_errors(peer_name):
    model = tiny(peer_name, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        model(ids(1, 9), ids(1, 3, bos=True))
    with pytest.raises(ValueError, match="max_len"):
        model(ids(1, 3), ids(1, 9, bos=True))
    with pytest.raises(ValueError, match="integer"):
        model(torch.rand(1, 3), ids(1, 3, bos=True))
    with pytest.raises(ValueError, match="batch, length"):
        model(ids(1, 3)[0], ids(1, 3, bos=True))
    memory, cache = model.encode(ids(1, 3)), None
    for _ in range(8):
        _, cache = model.decode_step(torch.full((1, 1), BOS_ID), memory, cache)
    with pytest.raises(ValueError, match="max_len"):
        model.decode_step(torch.full((1, 1), BOS_ID), memory, cache)


def test_unknown_name_and_override_errors():
    with pytest.raises(ValueError, match="torch_transformer_mt_tiny"):
        create_mt_peer("nope", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="'attention'"):
        create_mt_peer(TORCH_PEER, vocab_size=VOCAB, attention="rela")
    with pytest.raises(ValueError, match="'tie_output'"):
        create_mt_peer(TORCH_PEER, vocab_size=VOCAB, tie_output=False)
    with pytest.raises(ValueError, match="heads"):
        create_mt_peer(TORCH_PEER, vocab_size=VOCAB, dim=30, heads=4)
    with pytest.raises(TypeError):
        create_mt_peer(TORCH_PEER)  # vocab_size is required


def test_xtransformer_override_errors():
    pytest.importorskip("x_transformers")
    with pytest.raises(ValueError, match="'norm_eps'"):
        create_mt_peer(X_PEER, vocab_size=VOCAB, norm_eps=1e-6)
    with pytest.raises(ValueError, match="dropout"):
        create_mt_peer(X_PEER, vocab_size=VOCAB, dropout=1.5)
