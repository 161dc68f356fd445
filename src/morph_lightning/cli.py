"""`python -m morph_lightning fit|validate|test|predict --config FILE` through LightningCLI.

A bare config name (`--config stage2.yaml`, `--config tiny/stage1.yaml`) that is not a file here is
looked up in `./configs/`, then in the source checkout's `configs/` (an editable install's; a regular
install carries no configs). OmegaConf interpolation is on (`${...}`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def resolve_config(value: str) -> str:
    """A path that exists as given wins; otherwise the first `configs/<value>` that exists."""
    if Path(value).exists():
        return value
    for root in (Path.cwd() / "configs", CONFIG_DIR):
        if (root / value).exists():
            return str(root / value)
    return value


def _resolve_args(args: list[str]) -> list[str]:
    out, it = [], iter(args)
    for arg in it:
        if arg == "--config":
            out += [arg, resolve_config(next(it, ""))]
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


def main(args: list[str] | None = None) -> LightningCLI:
    """Run from the command line (`args=None`, reads sys.argv) or from Python with a list of args."""
    if args is None:
        sys.argv[1:] = _resolve_args(sys.argv[1:])
    else:
        args = _resolve_args(list(args))
    return LightningCLI(
        None,  # any LightningModule: the stages and the stage-0 towers
        None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
    )
