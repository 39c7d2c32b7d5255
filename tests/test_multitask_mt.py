"""Multi-task translation: an EncoderDecoder with a task-aware MoE router takes task ids on
``forward``/``encode``, its Memory keeps them aligned with the batch rows through cached decoding
and beam regrouping, and bad task ids are refused; the training command's ``tasks:`` (per-task
data, dev and test scores, resume) and translate_eval's ``--task``."""

import csv
import io
import json
import pathlib
import re

import pytest
import torch
import yaml

from gatezoo.eval.decode import beam_search, greedy_search, translate_ids
from gatezoo.models import BOS_ID, PAD_ID, EncoderDecoder, TranslationConfig
from gatezoo.train import translate, translate_eval
from gatezoo.train.core.checkpoint import load_checkpoint, read_checkpoint_metadata
from gatezoo.train.data.text import Split, TokenBatches, collate, subsample_pairs

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


@pytest.mark.parametrize("mode, pregated", [*((m, False) for m in MODES), ("embed", True)])
def test_cached_decoding_equals_the_full_forward_with_task_ids(mode, pregated):
    model = _model(mode, pregated=pregated)
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


# ---------------------------------------------------------------------------------------------
# the training command with tasks, translate_eval --task


TINY = ["--vocab_size", "40", "--dev_size", "8", "--test_size", "6", "--max_tokens", "200", "--warmup_steps", "2",
        "--eval_every", "3", "--dev_sentences", "4", "--beam_size", "2", "--average_last", "0", "--progress", "false",
        "--threads", "1"]


def _config(tmp_path, corpus, mode="embed", **extra):
    """A 3-task config: en-es, es-en on a tenth of the training pairs, reversed-English -> es."""
    files = {"data": "files", "src": str(corpus / "train.en"), "tgt": str(corpus / "train.es")}
    cfg = {
        "model": "transformer_mt_tiny_moe",
        "model_args": {"dim": 32, "enc_layers": 1, "dec_layers": 1, "heads": 2, "ffn_hidden": 64, "num_experts": 4,
                       "router": "task_aware", "router_args": {"mode": mode}},
        "tasks": [{"name": "en-es", **files}, {"name": "es-en", **files, "reverse": True, "fraction": 0.1},
                  {"name": "en-rev", **files, "transform": "reverse_source"}],
        "out": str(tmp_path / "runs"), **extra,
    }
    path = tmp_path / "mt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run_dir(tmp_path):
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    return run_dir


@pytest.mark.parametrize("mode", MODES)
def test_three_tasks_train_from_the_command(mode, corpus, tmp_path):
    cfg = _config(tmp_path, corpus, mode)
    assert translate.main(["--config", str(cfg), *TINY, "--max_steps", "3"]) == 0
    run_dir = _run_dir(tmp_path)
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    names = ("en-es", "es-en", "en-rev")
    for row in rows:
        per = [float(row[f"dev_bleu_{n}"]) for n in names]
        assert float(row["dev_bleu"]) == pytest.approx(sum(per) / 3, abs=1e-3)
    test = json.loads((run_dir / "test.json").read_text())
    assert set(test["tasks"]) == set(names)
    assert test["bleu"] == pytest.approx(sum(test["tasks"][n]["bleu"] for n in names) / 3)
    for n in names:
        assert (run_dir / "data" / n / "train.src").is_file() and (run_dir / f"test-{n}.hyp").is_file()
    # fraction keeps a tenth of the training pairs; the tasks of one corpus share its split
    en_es, es_en = (Split.load(run_dir / "data" / n) for n in ("en-es", "es-en"))
    assert len(es_en.train) == round(0.1 * len(en_es.train))
    assert set(es_en.train) <= {(t, s) for s, t in en_es.train}
    assert es_en.test == [(t, s) for s, t in en_es.test]
    rev = Split.load(run_dir / "data" / "en-rev")
    assert rev.dev[0] == (" ".join(reversed(en_es.dev[0][0].split())), en_es.dev[0][1])
    meta = read_checkpoint_metadata(run_dir / "last.safetensors")
    assert meta["task"]["tasks"] == list(names) and meta["model_args"]["router_args"]["num_tasks"] == 3
    model, _ = load_checkpoint(run_dir / "last.safetensors")
    assert model.config.router_args["mode"] == mode and model.num_tasks == 3


def test_multitask_resume_and_translate_eval(corpus, tmp_path, capsys, monkeypatch):
    cfg = _config(tmp_path, corpus, "task")
    assert translate.main(["--config", str(cfg), *TINY, "--max_steps", "3", "--final_test", "false"]) == 0
    run_dir = _run_dir(tmp_path)
    assert translate.main(["--resume", str(run_dir), "--max_steps", "6", "--final_test", "false"]) == 0
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert int(rows[-1]["step"]) == 6 and "dev_bleu_en-rev" in rows[-1]
    capsys.readouterr()
    # --task evaluates that task's split
    assert translate_eval.main([str(run_dir), "--checkpoint", "last", "--evaluate", "--task", "es-en",
                                "--beam_size", "1"]) == 0
    out = capsys.readouterr().out
    assert "of task es-en" in out and "6 sentences" in out
    monkeypatch.setattr("sys.stdin", io.StringIO("rey casa\n\nagua\n"))
    assert translate_eval.main([str(run_dir), "--checkpoint", "last", "--task", "es-en", "--beam_size", "2"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""
    # refused: no task, an unknown task
    for argv, match in ((["--evaluate"], "multi-task run: choose the task with --task"),
                        (["--evaluate", "--task", "fr-de"], "'fr-de' is not a task of this run")):
        assert translate_eval.main([str(run_dir), "--checkpoint", "last", *argv]) == 2
        assert match in capsys.readouterr().err


def test_translate_eval_refuses_task_for_a_single_task_run(corpus, tmp_path, capsys):
    argv = ["--src", str(corpus / "train.en"), "--tgt", str(corpus / "train.es"), "--out", str(tmp_path / "runs"),
            "--model_args", "{dim: 32, enc_layers: 1, dec_layers: 1, heads: 2, ffn_hidden: 64}", *TINY,
            "--max_steps", "1", "--final_test", "false"]
    assert translate.main(argv) == 0
    capsys.readouterr()
    assert translate_eval.main([str(_run_dir(tmp_path)), "--checkpoint", "last", "--evaluate", "--task", "x"]) == 2
    assert "--task x does nothing: this run has a single task" in capsys.readouterr().err


@pytest.mark.parametrize("change, match", [
    (lambda c: c["tasks"].append({**c["tasks"][0]}), "duplicate task name 'en-es'"),
    (lambda c: c["tasks"][1].update(fraction=0), r"fraction must be a number in \(0, 1\]"),
    (lambda c: c["tasks"][1].update(fraction=1.5), r"fraction must be a number in \(0, 1\]"),
    (lambda c: c["tasks"][2].update(transform="shuffle"), "transform must be null or one of"),
    (lambda c: c["tasks"][0].update(colour="red"), r"unknown field\(s\) \['colour'\]"),
    (lambda c: c["tasks"][0].update(name="a/b"), "name must be letters"),
    (lambda c: c["tasks"][0].pop("src"), "data: files needs src and tgt"),
    (lambda c: c.update(src="x.en", tgt="x.es"), "src, tgt do nothing in a multi-task run"),
    (lambda c: c.update(tasks=[]), "tasks must be a non-empty list"),
    (lambda c: c["model_args"]["router_args"].update(num_tasks=2), "num_tasks=2, but the run has 3 tasks"),
    (lambda c: c.pop("tasks"), r"routes by task.* needs a multi-task run"),
])
def test_bad_task_configs_are_refused(change, match, corpus, tmp_path, capsys):
    path = _config(tmp_path, corpus)
    cfg = yaml.safe_load(path.read_text())
    change(cfg)
    if "tasks" not in cfg:  # a single-task run of the task-aware model
        cfg.update(src=str(corpus / "train.en"), tgt=str(corpus / "train.es"))
    path.write_text(yaml.safe_dump(cfg))
    assert translate.main(["--config", str(path), *TINY, "--max_steps", "1"]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_data_option_is_refused_with_tasks(corpus, tmp_path, capsys):
    path = _config(tmp_path, corpus)
    assert translate.main(["--config", str(path), *TINY, "--data", "bible"]) == 2
    assert "--data does nothing with tasks" in capsys.readouterr().err


def test_batches_carry_task_ids():
    batches = TokenBatches([[4, 5], [6], [7, 8, 9]], [[5], [6, 7], [8]], max_tokens=100, shuffle=False,
                           task_ids=[2, 0, 1])
    (batch,) = list(batches.epoch(0))
    order = batches.batches[0]
    assert batch.task_ids.tolist() == [[2, 0, 1][i] for i in order] and batch.task_ids.dtype == torch.long
    assert batch.to("cpu").task_ids is not None
    assert list(TokenBatches([[4]], [[5]]).epoch(0))[0].task_ids is None
    assert collate([[4]], [[5]], task_ids=[3]).task_ids.tolist() == [3]
    with pytest.raises(ValueError, match=r"task_ids holds 1 ids for 2 examples"):
        TokenBatches([[4], [5]], [[5], [6]], task_ids=[0])
    with pytest.raises(TypeError, match=r"task_ids\[0\] must be an int"):
        collate([[4]], [[5]], task_ids=[0.5])
    pairs = [(f"s{i}", f"t{i}") for i in range(50)]
    sub = subsample_pairs(pairs, 0.2, seed=3)
    assert sub == subsample_pairs(pairs, 0.2, seed=3) and len(sub) == 10 and sub == sorted(sub, key=pairs.index)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        subsample_pairs(pairs, 0.0)


def test_shipped_multitask_config_loads():
    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    cfg = translate.load_mt_config(root / "transformer_mt_multitask.yaml")
    assert [t["name"] for t in cfg["tasks"]] == ["en-es", "es-en", "en-rev"]
    assert cfg["model_args"]["router"] == "task_aware" and cfg["tasks"][1]["fraction"] == 0.1


def test_side_by_side_specs_choose_their_own_router(corpus, tmp_path, capsys):
    # a dense model and task-aware models that pick their router in the spec: num_tasks is filled in
    # for the task-aware ones only, and each model directory's config rebuilds its own model
    cfg = _config(tmp_path, corpus)
    dense = "transformer_mt_tiny:ffn=swiglu"
    specs = [dense, "transformer_mt_tiny_moe:router=topk",
             "transformer_mt_tiny_moe:router=task_aware,router_args={mode: task}"]
    small = "{dim: 32, enc_layers: 1, dec_layers: 1, heads: 2, ffn_hidden: 64}"
    assert translate.main(["--config", str(cfg), *TINY, "--max_steps", "2", "--final_test", "false",
                           "--model_args", small, "--models", *specs]) == 0
    run_dir = _run_dir(tmp_path)
    dirs = sorted(p for p in run_dir.iterdir() if (p / "config.yaml").is_file())
    assert len(dirs) == 3
    seen = {}
    for d in dirs:
        saved = yaml.safe_load((d / "config.yaml").read_text())
        model, _ = load_checkpoint(d / "last.safetensors")
        seen[saved["model"]] = (saved["model_args"], getattr(model, "num_tasks", None))
    assert seen[dense] == ({**yaml.safe_load(small), "vocab_size": seen[dense][0]["vocab_size"]}, None)
    assert seen[specs[1]][1] is None and "router_args" not in seen[specs[1]][0]
    args, num_tasks = seen[specs[2]]
    assert args["router_args"] == {"num_tasks": 3} and num_tasks == 3
    model, _ = load_checkpoint(run_dir / [p.name for p in dirs if "task_aware" in p.name][0] / "last.safetensors")
    assert model.config.router_args == {"num_tasks": 3, "mode": "task"}


def test_build_model_merges_mapping_overrides():
    from gatezoo.train.core.factory import build_model

    model = build_model("transformer_mt_tiny_moe:router=task_aware,router_args={mode: per_task}", vocab_size=40,
                        dim=32, heads=2, ffn_hidden=32, enc_layers=1, dec_layers=1, router_args={"num_tasks": 2})
    assert model.config.router_args == {"num_tasks": 2, "mode": "per_task"}
    # a non-mapping override of a mapping is replaced, as before
    model = build_model("transformer_mt_tiny_moe:router_args={noisy: true}", vocab_size=40, dim=32, heads=2,
                        ffn_hidden=32, enc_layers=1, dec_layers=1, router_args=None)
    assert model.config.router_args == {"noisy": True}


def test_mt_summary_over_seeds(corpus, tmp_path, capsys):
    from gatezoo.train import mt_summary

    cfg = _config(tmp_path, corpus)
    small = "{dim: 32, enc_layers: 1, dec_layers: 1, heads: 2, ffn_hidden: 64}"
    specs = ["transformer_mt_tiny:ffn=swiglu", "transformer_mt_tiny_moe:router=task_aware,router_args={mode: embed}"]
    for seed in (0, 1):
        assert translate.main(["--config", str(cfg), *TINY, "--max_steps", "2", "--model_args", small, "--seed",
                               str(seed), "--out", str(tmp_path / f"seed{seed}"), "--models", *specs]) == 0
    runs = [str(next((tmp_path / f"seed{s}").iterdir())) for s in (0, 1)]
    capsys.readouterr()
    out = tmp_path / "bench" / "mt.csv"
    assert mt_summary.main([*runs, "--baseline", specs[0], "--out", str(out)]) == 0
    table = capsys.readouterr().out
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 2 * 2 * 3 and out.with_suffix(".png").stat().st_size > 0
    # the table's figures are the runs' own test.json scores, mean ± sd over the seeds
    for spec in specs:
        scores = []
        for run in runs:
            d = next(p for p in pathlib.Path(run).iterdir() if (p / "config.yaml").is_file()
                     and yaml.safe_load((p / "config.yaml").read_text())["model"] == spec)
            scores.append(json.loads((d / "test.json").read_text())["tasks"]["es-en"]["bleu"])
        mean = sum(scores) / 2
        sd = abs(scores[0] - scores[1]) / 2 ** 0.5
        line = next(t for t in table.splitlines() if t.startswith(f"| `{spec}`"))
        assert f"{mean:.2f} ± {sd:.2f}" in line and "| 0, 1 |" in line
    # refused: a run given twice, an unknown baseline, a directory that is no run
    assert mt_summary.main([runs[0], runs[0]]) == 2
    assert "appears twice" in capsys.readouterr().err
    assert mt_summary.main([runs[0], "--baseline", "nope"]) == 2
    assert "--baseline 'nope' is not one of the models" in capsys.readouterr().err
    assert mt_summary.main([str(tmp_path / "bench")]) == 2
    assert "not a translation run directory" in capsys.readouterr().err
    # --dev: the last evaluation's dev BLEU per task; --label tells runs of one model apart
    assert mt_summary.main([*runs, "--dev", "--label", runs[1], "again", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    rows = list(csv.DictReader(open(out)))
    assert {r["model"] for r in rows} == {*specs, *(f"{s} [again]" for s in specs)}
    for r in rows:
        last = list(csv.DictReader(open(pathlib.Path(r["run_dir"]) / "metrics.csv")))[-1]
        assert float(r["dev_bleu"]) == pytest.approx(float(last[f"dev_bleu_{r['task']}"]))
    assert "chrF" not in table and "es-en BLEU" in table
    assert mt_summary.main([runs[0], "--label", runs[1], "x"]) == 2
    assert "--label names run directories that are not given" in capsys.readouterr().err


def test_plain_source_lowercases_and_drops_punctuation():
    from gatezoo.train.data.text import PAIR_TRANSFORMS, plain_source

    assert PAIR_TRANSFORMS["plain_source"] is plain_source
    pairs = [("And God said, Let there be light:  the LORD's «word».", "Y dijo Dios: Sea la luz.")]
    assert plain_source(pairs) == [("and god said let there be light the lords word", pairs[0][1])]
    with pytest.raises(TypeError, match="pairs"):
        plain_source("not pairs")


def test_mt_unseen_scores_each_routing_like_translate_eval(corpus, tmp_path, capsys):
    # the unseen task is a seen task's test split under a transform; a task-aware model is scored once
    # per seen task's id, a dense one once, and each score is translate_eval's on the same files
    from gatezoo.train import mt_unseen
    from gatezoo.train.data.text import plain_source

    cfg = _config(tmp_path, corpus)
    small = "{dim: 32, enc_layers: 1, dec_layers: 1, heads: 2, ffn_hidden: 64}"
    specs = ["transformer_mt_tiny:ffn=swiglu", "transformer_mt_tiny_moe:router=task_aware,router_args={mode: per_task}"]
    assert translate.main(["--config", str(cfg), *TINY, "--max_steps", "2", "--model_args", small,
                           "--final_test", "false", "--models", *specs]) == 0
    run_dir = _run_dir(tmp_path)
    capsys.readouterr()
    out = tmp_path / "bench" / "unseen.csv"
    assert mt_unseen.main([str(run_dir), "--task", "en-es", "--transform", "plain_source", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    rows = list(csv.DictReader(open(out)))
    assert [(r["model"], r["routed_as"]) for r in rows] == [
        (specs[0], "-"), (specs[1], "en-es"), (specs[1], "es-en"), (specs[1], "en-rev")]
    assert {r["unseen"] for r in rows} == {"en-es+plain_source"} and out.with_suffix(".png").stat().st_size > 0
    assert "routed as es-en BLEU" in table and "no task routing BLEU" in table
    pairs = plain_source(Split.load(run_dir / rows[0]["run_dir"].split("/")[-1] / "data" / "en-es").test)
    (tmp_path / "u.src").write_text("".join(s + "\n" for s, _ in pairs))
    (tmp_path / "u.ref").write_text("".join(t + "\n" for _, t in pairs))
    for r in rows:
        task = ["--task", "en-es" if r["routed_as"] == "-" else r["routed_as"]]  # the dense model ignores it
        js = tmp_path / "eval.json"
        assert translate_eval.main([r["run_dir"], "--checkpoint", "last", "--evaluate", "--src",
                                    str(tmp_path / "u.src"), "--ref", str(tmp_path / "u.ref"), "--beam_size", "1",
                                    "--json", str(js), *task]) == 0
        assert float(r["bleu"]) == pytest.approx(json.loads(js.read_text())["bleu"], abs=1e-4)
    # refused: an unknown transform or task, a split cut to nothing, a single-task run
    for argv, match in ((["--task", "en-es", "--transform", "shuffle"], "--transform must be one of"),
                        (["--task", "fr-de", "--transform", "plain_source"], "'fr-de' is not a task of"),
                        (["--task", "en-es", "--transform", "plain_source", "--limit", "0"], "--limit must be")):
        assert mt_unseen.main([str(run_dir), *argv]) == 2
        assert match in capsys.readouterr().err
    single = tmp_path / "single"
    assert translate.main(["--src", str(corpus / "train.en"), "--tgt", str(corpus / "train.es"), "--out", str(single),
                           "--model_args", small, *TINY, "--max_steps", "1", "--final_test", "false"]) == 0
    capsys.readouterr()
    assert mt_unseen.main([str(next(single.iterdir())), "--task", "en-es", "--transform", "plain_source"]) == 2
    assert "single-task run" in capsys.readouterr().err
