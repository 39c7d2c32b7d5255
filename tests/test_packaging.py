"""The package as pip sees it: the core install pulls neither the translation tools nor the plotting
library, every module imports without them, each missing extra is named in a clear ImportError,
and the console scripts point at real command-line entry points."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11 on")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OPTIONAL = ("sentencepiece", "sacrebleu", "matplotlib", "PIL", "timm", "x_transformers", "ctranslate2", "flwr", "ray",
            "river", "peft")


def _requirement_name(req: str) -> str:
    for sep in "<>=!~;[ ":
        req = req.split(sep)[0]
    return req.strip().lower()


def test_core_dependencies_are_lean():
    core = {_requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    for heavy in ("sentencepiece", "sacrebleu", "matplotlib", "pillow", "timm", "x-transformers", "ctranslate2"):
        assert heavy not in core, f"{heavy} must be an extra, not a core dependency"
    assert "numpy" in core and "torch" in core  # numpy is imported by the data readers and the export


def test_every_optional_library_is_in_an_extra():
    extras = PYPROJECT["project"]["optional-dependencies"]
    listed = {_requirement_name(r) for reqs in extras.values() for r in reqs}
    for name in ("sentencepiece", "sacrebleu", "matplotlib", "pillow", "timm", "x-transformers", "ctranslate2",
                 "flash-attn", "xformers", "flwr", "river", "peft", "scikit-learn"):
        assert name in listed, f"{name} is in no extra"


@pytest.mark.parametrize("script", sorted(PYPROJECT["project"]["scripts"]))
def test_console_scripts_name_command_entry_points(script):
    target = PYPROJECT["project"]["scripts"][script]
    module, _, attr = target.partition(":")
    fn = getattr(importlib.import_module(module), attr)
    assert callable(fn) and fn.__name__ == "main"
    with pytest.raises(SystemExit) as info:  # every command answers --help and exits 0
        fn(["--help"])
    assert info.value.code == 0


def test_modules_import_without_the_optional_libraries():
    """In a fresh interpreter where the optional libraries cannot be imported, every gatezoo module
    still imports, and using a missing one raises an ImportError that names its extra."""
    code = textwrap.dedent(f"""
        import importlib, importlib.abc, pkgutil, sys
        BLOCKED = {OPTIONAL!r}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked for the test: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        import gatezoo
        for info in pkgutil.walk_packages(gatezoo.__path__, "gatezoo."):
            importlib.import_module(info.name)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        import tempfile, pathlib
        from gatezoo.train.data.text import Tokenizer
        model = pathlib.Path(tempfile.mkdtemp()) / "spm.model"
        model.write_bytes(b"not read: sentencepiece is missing")
        try:
            Tokenizer(model)
        except ImportError as e:
            assert "gatezoo[mt]" in str(e), e
        else:
            raise AssertionError("no ImportError without sentencepiece")
        from gatezoo.eval.plots import pyplot
        try:
            pyplot()
        except ImportError as e:
            assert "gatezoo[plots]" in str(e), e
        else:
            raise AssertionError("no ImportError without matplotlib")
        from gatezoo.eval.translate import score
        try:
            score(["a"], ["a"])
        except ImportError as e:
            assert "gatezoo[mt]" in str(e), e
        else:
            raise AssertionError("no ImportError without sacrebleu")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
