"""Each kernel op has one name in every tier (docs/architecture.md, "One name per op"): its
kernel package ``gatezoo/kernels/<op>/``, its block module ``gatezoo/blocks/<op>.py``, its docs page
``docs/<op>.md`` (which names the other tiers) and its test file ``tests/test_<op>_kernels.py``."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPS = sorted(p.name for p in (ROOT / "gatezoo/kernels").iterdir() if (p / "__init__.py").is_file())


def test_the_ops_are_found():
    assert {"activation", "mixing", "norm", "rela", "routing"} <= set(OPS), OPS


@pytest.mark.parametrize("op", OPS)
def test_op_has_one_name_in_every_tier(op):
    block = ROOT / f"gatezoo/blocks/{op}.py"
    page = ROOT / f"docs/{op}.md"
    tests = ROOT / f"tests/test_{op}_kernels.py"
    missing = [str(p.relative_to(ROOT)) for p in (block, page, tests) if not p.is_file()]
    assert not missing, f"op {op!r} (gatezoo/kernels/{op}/) lacks {missing}"
    text = page.read_text(encoding="utf-8")
    for name in (f"gatezoo/kernels/{op}/", f"gatezoo/blocks/{op}.py", f"tests/test_{op}_kernels.py"):
        assert name in text, f"docs/{op}.md does not name {name}"
