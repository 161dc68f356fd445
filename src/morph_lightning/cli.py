"""`python -m morph_lightning fit|validate|test|predict --config FILE` through LightningCLI.

A bare config name (`--config stage2.yaml`, `--config tiny/stage1.yaml`) that is not a file here is
looked up in `./configs/`, then in the source checkout's `configs/` (an editable install's; a regular
install carries no configs). OmegaConf interpolation is on (`${...}`).

What this adds to LightningCLI:
- a config error ends in one line naming the key and where it was given (the command line or a config
  file): `error: bad.yaml: unknown key 'trainer.max_stepz'`; `--verbose` prints jsonargparse's full
  message or the traceback above it;
- loggers without a `save_dir` and ModelCheckpoints without a `dirpath` write into
  `trainer.default_root_dir` (checkpoints at its top, logs in the logger's `name` folder);
- `predict` writes its predictions (callbacks/prediction_writer.py) into a fresh folder under the run
  folder and runs without the training logger, which would wipe the run's `metrics.csv`; `validate` and
  `test` log into a version of their own (`logs/validate-<time>/`) for the same reason;
- a `fit` that opens a CSV log folder again (a resumed run) first moves the earlier `metrics.csv` aside,
  which Lightning's CSVLogger would delete.
"""

from __future__ import annotations

import importlib
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from morph_lightning.keep import aside_name

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
PREDICTION_WRITER = "morph_lightning.callbacks.prediction_writer.PredictionWriter"


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
        if arg in ("--config", "-c"):
            out += [arg, resolve_config(next(it, ""))]
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


class ConfigError(ValueError):
    """A config value that stops the run before it starts: the message names `key` (dotted) if known."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(message)
        self.key = key


# ---- jsonargparse's messages, reduced to (key, problem) --------------------------------------------
_PARSER_KEY = re.compile(r'Parser key "(?P<key>[^"]+)":\s*(?P<rest>.*)')
_UNKNOWN = (
    re.compile(r"Group '(?P<group>[^']+)' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"does not accept option '(?P<key>[^']+)'"),
    re.compile(r"Option '(?P<key>[^']+)' is not accepted"),
    re.compile(r"unrecognized arguments: --(?P<key>[^\s=]+)"),
)
_WRONG_TYPE = re.compile(r"Expected a <class '(?P<type>\w+)'>\. Got value: (?P<value>.*)")
_NO_FILE = re.compile(r"File does not exist: '?(?P<path>[^']+)'?")
# What a Union's other alternatives (None, bool, a path) say when the value was meant for another one.
_NOISE = re.compile(
    r"Does not validate|Subtypes:|Errors:|Given value|Expected a path but|Expected a <[^>]*>$"
)


def summarize_parse_error(message: str) -> tuple[str | None, str]:
    """jsonargparse's nested message as (dotted key, one line naming it): the key from its `Parser key`
    and class (`init_args`) levels, by indentation, down to the first line that says what is wrong."""
    path: list[tuple[int, str]] = []
    for line in message.splitlines():
        text = line.strip().removeprefix("- ")
        if not text:
            continue
        indent = len(line) - len(line.lstrip())
        while path and path[-1][0] >= indent:
            path.pop()
        if m := _PARSER_KEY.match(text):
            path.append((indent, m["key"]))
            text = m["rest"]
        elif text.startswith("Problem with given class_path"):
            path.append((indent, "init_args"))
            continue
        if not text or _NOISE.match(text):
            continue
        prefix = [p for _, p in path]
        for pattern in _UNKNOWN:
            if m := pattern.search(text):
                key = ".".join([*prefix, *filter(None, [m.groupdict().get("group"), m["key"]])])
                return key, f"unknown key '{key}'"
        if prefix and prefix[-1] == "init_args":
            prefix.pop()  # a problem with the class itself (its import), not with one of its arguments
        key = ".".join(prefix) or None
        if m := _WRONG_TYPE.search(text):
            text = f"expected {m['type']}, got '{m['value']}'"
        elif m := _NO_FILE.search(text):
            text = f"no file at {m['path']}"
        return key, f"{key}: {text}" if key else text
    return None, message.strip().splitlines()[0] if message.strip() else "invalid arguments"


def _without_init_args(key: str) -> list[str]:
    return [p for p in key.split(".") if p != "init_args"]


def _in_yaml(tree: Any, parts: list[str]) -> bool:
    if not parts:
        return True
    if not isinstance(tree, dict):
        return False
    if parts[0] in tree:
        return _in_yaml(tree[parts[0]], parts[1:])
    return "init_args" in tree and _in_yaml(tree["init_args"], parts)


def error_source(key: str | None, args: list[str]) -> str | None:
    """Where `key` was given: "command line", or the last `--config` file that sets it (as the user
    named it), or None when neither says."""
    if key is None:
        return None
    parts = _without_init_args(key)
    options = [a[2:].split("=", 1)[0].rstrip("+") for a in args if a.startswith("--")]
    if any(_without_init_args(o) == parts for o in options):
        return "command line"
    configs = [v for a, v in zip(args, args[1:], strict=False) if a in ("--config", "-c")]
    configs += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for name in reversed(configs):
        try:
            tree = yaml.safe_load(Path(resolve_config(name)).read_text())
        except (OSError, yaml.YAMLError):
            continue
        if _in_yaml(tree, parts):
            return name
    return None


def _key_holding(tree: Any, value: str, prefix: str = "") -> str | None:
    """The dotted key (list items as `[i]`) whose value is `value`, if any."""
    if isinstance(tree, dict):
        items = ((f"{prefix}.{k}" if prefix else str(k), v) for k, v in tree.items())
    elif isinstance(tree, list):
        items = ((f"{prefix}[{i}]", v) for i, v in enumerate(tree))
    else:
        return prefix if str(tree) == value else None
    return next((k for key, v in items if (k := _key_holding(v, value, key))), None)


def describe_failure(err: BaseException, config: dict[str, Any]) -> ConfigError:
    """An error raised while building the model, data or trainer, as the key it comes from when a missing
    file names one, else as its innermost cause's first line."""
    root = err
    while (cause := root.__cause__ or (None if root.__suppress_context__ else root.__context__)) is not None:
        root = cause
    if isinstance(root, FileNotFoundError) and root.filename:
        key = _key_holding(config, str(root.filename))
        if key:
            return ConfigError(key, f"{key}: no file at {root.filename}")
    first = str(root).strip().splitlines()[0] if str(root).strip() else ""
    return ConfigError(None, f"{type(root).__name__}: {first}".rstrip(": "))


# ---- the CLI ---------------------------------------------------------------------------------------
def _as_list(value: Any) -> list[Any]:
    if value is None or value is False:
        return []
    return list(value) if isinstance(value, list) else [value]


def _is_subclass(class_path: str, base: type) -> bool:
    module, _, name = class_path.rpartition(".")
    try:
        return issubclass(getattr(importlib.import_module(module), name), base)
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


def follow_root_dir(trainer: Namespace) -> None:
    """Point the loggers without a save_dir and the ModelCheckpoints without a dirpath at
    `trainer.default_root_dir`. The configs leave them unset for this, so that outputs follow
    `--trainer.default_root_dir` given anywhere (an interpolation is resolved per file, before it)."""
    root = trainer.get("default_root_dir") or "."
    for logger in _as_list(trainer.get("logger")):
        init = logger.get("init_args") if isinstance(logger, Namespace) else None
        if init is not None and "save_dir" in init and init.save_dir is None:
            init.save_dir = root
    for callback in _as_list(trainer.get("callbacks")):
        init = callback.get("init_args") if isinstance(callback, Namespace) else None
        if (
            init is not None
            and init.get("dirpath") is None
            and _is_subclass(callback.class_path, ModelCheckpoint)
        ):
            init.dirpath = root


def keep_reopened_csv_log(trainer: Namespace) -> None:
    """Lightning's CSVLogger deletes the `metrics.csv` of a log folder it opens again, which a fixed
    version ('' in the configs) does on every resumed or repeated fit: move it aside first, named with its
    time (`metrics.<time>.csv`)."""
    for logger in _as_list(trainer.get("logger")):
        init = logger.get("init_args") if isinstance(logger, Namespace) else None
        if init is None or init.get("version") != "" or not _is_subclass(logger.class_path, CSVLogger):
            continue
        metrics = Path(init.save_dir or ".") / (init.get("name") or "lightning_logs") / "metrics.csv"
        if metrics.is_file():
            metrics.rename(aside_name(metrics))


class MorphArgumentParser(LightningArgumentParser):
    def validate(self, namespace: Namespace, *args: Any, **kwargs: Any) -> None:
        # before the check, which refuses a logger without save_dir (CSVLogger and TensorBoard require one)
        subcommand = namespace.get("subcommand")
        trainer = namespace.get(f"{subcommand}.trainer" if subcommand else "trainer")
        if isinstance(trainer, Namespace):
            follow_root_dir(trainer)
        super().validate(namespace, *args, **kwargs)


class MorphCLI(LightningCLI):
    def before_instantiate_classes(self) -> None:
        if self.subcommand in ("validate", "test"):
            # Their metrics go to a version of their own: the run's fixed version '' would wipe its
            # training metrics.csv.
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for logger in _as_list(self.config[self.subcommand].trainer.logger):
                init = logger.get("init_args") if isinstance(logger, Namespace) else None
                if init is not None and init.get("version") == "":
                    init.version = f"{self.subcommand}-{stamp}"
        if self.subcommand == "fit":
            keep_reopened_csv_log(self.config.fit.trainer)
        if self.subcommand == "predict":
            trainer = self.config.predict.trainer
            # No training logger: with its fixed version '' it would reuse (and wipe) the run's logs; and
            # no config.yaml over the run's. What predict makes goes to a fresh folder (PredictionWriter).
            trainer.logger = False
            self.save_config_callback = None
            callbacks = _as_list(trainer.callbacks)
            if not any(getattr(c, "class_path", None) == PREDICTION_WRITER for c in callbacks):
                callbacks.append(Namespace(class_path=PREDICTION_WRITER, init_args=Namespace()))
            trainer.callbacks = callbacks

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            config = self.config[self.subcommand] if self.subcommand else self.config
            raise describe_failure(err, config.as_dict()) from err


def _fail(err: BaseException, key: str | None, message: str, args: list[str], verbose: bool) -> None:
    if verbose:
        if isinstance(err, ArgumentError):
            print(str(err), file=sys.stderr)
        else:
            traceback.print_exception(err.__cause__ or err)  # the original error, not its ConfigError
    else:
        print("(add --verbose for the full message)", file=sys.stderr)
    source = error_source(key, args)
    print(f"error: {source}: {message}" if source else f"error: {message}", file=sys.stderr)


def main(args: list[str] | None = None) -> MorphCLI:
    """Run from the command line (`args=None`, reads sys.argv) or from Python with a list of args.

    A parse error prints one line and exits 2 either way. An error while building the model, data or
    trainer prints one line and exits 1 from the command line; from Python it raises ConfigError.
    `--verbose` (anywhere) prints the full message first."""
    given = sys.argv[1:] if args is None else list(args)
    verbose = "--verbose" in given
    given = [a for a in given if a != "--verbose"]
    resolved = _resolve_args(given)
    parser_kwargs = {"parser_mode": "omegaconf", "exit_on_error": False}  # main() reports parse errors
    if args is None:
        sys.argv[1:] = resolved
        if sys.argv[0].endswith("__main__.py"):
            parser_kwargs["prog"] = "python -m morph_lightning"  # not "__main__.py" in usage lines
    try:
        return MorphCLI(
            None,  # any LightningModule: the stages and the stage-0 towers
            None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs=parser_kwargs,
            parser_class=MorphArgumentParser,
            save_config_kwargs={"overwrite": True},
            args=None if args is None else resolved,
        )
    except ArgumentError as err:
        _fail(err, *summarize_parse_error(str(err)), given, verbose)
        raise SystemExit(2) from None
    except ConfigError as err:
        if args is not None:
            raise
        _fail(err, err.key, str(err), given, verbose)
        raise SystemExit(1) from None
