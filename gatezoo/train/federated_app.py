"""The federated command's Flower apps for a real deployment: a SuperLink, SuperNodes on any
machines, and ``flwr run``.

    python -m gatezoo.train.federated_app APP_DIR [--key value ...]   # writes APP_DIR/pyproject.toml

writes a Flower App whose components are :data:`server_app` and :data:`client_app` and whose
run config holds the keys of :data:`gatezoo.train.federated.FEDERATED_KEYS` (defaults, with the
given overrides). Then, with gatezoo installed on every machine (docs/federated.md):

    flower-superlink --insecure                                     # the server machine
    flower-supernode --insecure --superlink SERVER:9092 \\
        --clientappio-api-address 127.0.0.1:9094 \\
        --node-config "partition-id=0 num-partitions=50"            # one per client machine
    flwr run APP_DIR CONNECTION --stream                            # CONNECTION: SuperLink address

Each SuperNode's ``partition-id`` names its client; every machine reads its own copy of the data
(``data``). The ServerApp writes the run directory (``out``) on the machine where the SuperLink
runs it. ``flwr run ... --run-config "rounds=5"`` overrides a key for one run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core.config import ConfigError, load_config, parse_overrides
from .core.runs import new_run_dir
from .federated import FEDERATED_KEYS, make_client_app, server_run

__all__ = ["client_app", "server_app", "write_app"]


def _server():
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def _main(grid, context) -> None:
        cfg = load_config(None, [(k, v) for k, v in context.run_config.items() if k in FEDERATED_KEYS],
                          keys=FEDERATED_KEYS)
        from .core.checkpoint import write_text
        from .core.config import dump_config

        run_dir = new_run_dir(cfg["out"], cfg["name"] or cfg["method"])
        write_text(run_dir / "config.yaml", dump_config(cfg, FEDERATED_KEYS))
        server_run(grid, cfg, run_dir)

    return app


try:  # the module imports without Flower; the apps need it
    server_app = _server()
    """The ServerApp: the config from the run config, then :func:`gatezoo.train.federated.server_run`."""
    client_app = make_client_app()
    """The ClientApp: :func:`gatezoo.train.federated.client_step` on every train and query message."""
except ImportError:  # pip install 'gatezoo[federated]'
    server_app = client_app = None


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_app(directory: str | Path, overrides: list[tuple[str, object]] = ()) -> Path:
    """Write a Flower App (``pyproject.toml``) for the gatezoo apps into ``directory``, its run
    config the federated command's keys with ``overrides``; returns the file. Keys without a
    value (the optional ones left at None) are left out."""
    cfg = load_config(None, list(overrides), keys=FEDERATED_KEYS)
    lines = [
        "# A Flower App that runs gatezoo's federated command (written by python -m gatezoo.train.federated_app)",
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", 'name = "gatezoo-federated"', 'version = "1.0.0"', 'dependencies = []', "",
        "[tool.hatch.build.targets.wheel]", 'packages = ["."]', "",
        "[tool.flwr.app]", 'publisher = "gatezoo"', "",
        "[tool.flwr.app.components]", 'serverapp = "gatezoo.train.federated_app:server_app"',
        'clientapp = "gatezoo.train.federated_app:client_app"', "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{k} = {_toml(v)}" for k, v in cfg.items() if v is not None and k in FEDERATED_KEYS]
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    out = path / "pyproject.toml"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: write the Flower App; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m gatezoo.train.federated_app",
                                     description="Write a Flower App directory for gatezoo's federated command.",
                                     allow_abbrev=False)
    parser.add_argument("directory", help="where to write pyproject.toml")
    args, rest = parser.parse_known_args(argv)
    try:
        out = write_app(args.directory, parse_overrides(rest, FEDERATED_KEYS))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}; run it with: flwr run {args.directory} <superlink connection> --stream")
    return 0


if __name__ == "__main__":
    sys.exit(main())
