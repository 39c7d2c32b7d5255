"""Multi-task translation: an EncoderDecoder with a task-aware MoE router takes task ids on
``forward``/``encode``, its Memory keeps them aligned with the batch rows through cached decoding
and beam regrouping, and bad task ids are refused."""

import pytest
import torch

from gatezoo.eval.decode import beam_search, greedy_search, translate_ids
from gatezoo.models import BOS_ID, PAD_ID, EncoderDecoder, TranslationConfig

MODES = ("embed", "per_task", "task")
TASKS = 3
SMALL = dict(vocab_size=40, dim=32, heads=4, ffn_hidden=48, enc_layers=2, dec_layers=2, dropout=0.0)


def _model(mode="embed", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = TranslationConfig(**SMALL, ffn="moe", num_experts=4, router="task_aware",
                            router_args={"num_tasks": TASKS, "mode": mode}, **kw)
    model = EncoderDecoder(cfg).double().eval()
    with torch.no_grad():  # sharper next-token distributions than the initialisation's
        model.embed.weight.mul_(4.0)
        for m in model.modules():  # distinct tasks route differently enough to change the outputs
            if hasattr(m, "task_embed"):
                m.task_embed.weight.mul_(8.0)
            if hasattr(m, "gate_weight"):
                m.gate_weight.mul_(8.0)
    return model


def _src(b=4, s=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, SMALL["vocab_size"], (b, s), generator=g)
    for i in range(b):
        src[i, s - i:] = PAD_ID
    return src


@pytest.mark.parametrize("mode", MODES)
def test_cached_decoding_equals_the_full_forward_with_task_ids(mode):
    model = _model(mode)
    src = _src()
    tasks = torch.tensor([0, 2, 1, 2])
    tgt = torch.randint(4, SMALL["vocab_size"], (src.shape[0], 6), generator=torch.Generator().manual_seed(2))
    tgt[:, 0] = BOS_ID
    full = model(src, tgt, task_ids=tasks)
    memory, cache, steps = model.encode(src, task_ids=tasks), None, []
    assert torch.equal(memory.task_ids, tasks)
    for i in range(tgt.shape[1]):
        logits, cache = model.decode_step(tgt[:, i:i + 1], memory, cache)
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-6, atol=1e-6)
    # the task changes the output (else the ids would not be reaching the layers)
    other = model(src, tgt, task_ids=(tasks + 1) % TASKS)
    assert not torch.allclose(other, full, atol=1e-4)
    # an int is every row's task
    torch.testing.assert_close(model(src, tgt, task_ids=1), model(src, tgt, task_ids=torch.ones(4, dtype=torch.long)))


@pytest.mark.parametrize("mode", MODES)
def test_task_ids_follow_beam_regrouping(mode):
    """Two sentences of different tasks decoded together with beam 3 give what each gives alone."""
    model = _model(mode)
    src = _src(b=2)
    tasks = torch.tensor([2, 0])
    both = beam_search(model, src, beam_size=3, n_best=3, task_ids=tasks)
    for i in range(2):
        alone = beam_search(model, src[i:i + 1], beam_size=3, n_best=3, task_ids=int(tasks[i]))
        assert [h.tokens for h in both[i]] == [h.tokens for h in alone[0]]
        for a, b in zip(both[i], alone[0]):
            assert a.score == pytest.approx(b.score, abs=1e-6)
    greedy = greedy_search(model, src, task_ids=tasks)
    assert greedy == [greedy_search(model, src[i:i + 1], task_ids=int(tasks[i]))[0] for i in range(2)]
    assert translate_ids(model, src, beam_size=3, task_ids=tasks) == [h[0].tokens for h in both]


def test_memory_select_keeps_task_ids_with_their_rows():
    model = _model()
    memory = model.encode(_src(b=3), task_ids=torch.tensor([0, 1, 2]))
    picked = memory.select(torch.tensor([2, 2, 0]))
    assert picked.task_ids.tolist() == [2, 2, 0]
    assert picked.select(torch.tensor([1])).task_ids.tolist() == [2]


def test_bad_task_ids_are_refused():
    model = _model()
    src = _src(b=2)
    tgt = torch.full((2, 3), BOS_ID)
    with pytest.raises(ValueError, match=r"pass task_ids"):
        model(src, tgt)
    with pytest.raises(ValueError, match=r"pass task_ids"):
        greedy_search(model, src)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, num_tasks=3\)"):
        model(src, tgt, task_ids=3)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, num_tasks=3\)"):
        model(src, tgt, task_ids=torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=r"task_ids must be an int or hold one id per sentence, shape \(2,\)"):
        model(src, tgt, task_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match=r"task_ids must be an int or a \(batch,\) integer tensor"):
        model(src, tgt, task_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match=r"task_ids must be an int"):
        model(src, tgt, task_ids="en-es")
    with pytest.raises(TypeError, match=r"task_ids must be an int"):
        model(src, tgt, task_ids=True)
    # a memory without task ids (built by hand) cannot feed a task-aware decoder
    memory = model.encode(src, task_ids=0)
    memory.task_ids = None
    with pytest.raises(ValueError, match=r"memory.task_ids must be set"):
        model.decode_step(tgt[:, :1], memory)


def test_a_model_without_tasks_refuses_task_ids():
    torch.manual_seed(0)
    model = EncoderDecoder(TranslationConfig(**SMALL, ffn="moe", num_experts=4)).eval()
    assert model.num_tasks is None and _model().num_tasks == TASKS
    src = _src(b=2)
    with pytest.raises(ValueError, match=r"task_ids were given, but this model has no task-aware router"):
        model.encode(src, task_ids=0)
    with pytest.raises(ValueError, match=r"task_ids were given"):
        greedy_search(model, src, task_ids=torch.tensor([0, 1]))
    assert len(greedy_search(model, src)) == 2  # and decodes as before without them
