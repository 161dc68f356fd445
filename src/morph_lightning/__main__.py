"""`python -m morph_lightning COMMAND ...`: the training commands (LightningCLI) and the project's own."""

from __future__ import annotations

import importlib
import sys

PROG = "python -m morph_lightning"
# LightningCLI's subcommands, described for this project (their own --help is LightningCLI's).
TRAINING = {
    "fit": "train a stage: --config tiny/stage1.yaml (a bare name is looked up in configs/)",
    "validate": "one pass over the validation set: --config FILE --ckpt_path CKPT",
    "test": "one pass over the test set: --config FILE --ckpt_path CKPT",
    "predict": "answer the data's prompts; writes predictions.jsonl + PNGs under <run>/predict/",
}
# Subcommands with their own argument parser, imported only when run: name -> (module, one line of help).
SUBCOMMANDS = {
    "demo": ("morph_lightning.demo", "the whole method on the embedded world, on one CPU, with a report"),
    "ablations": ("morph_lightning.ablations", "Tables 7-8's ablation rows on the world, per seed, tabled"),
    "generate": ("morph_lightning.generate", "answer prompts with a trained model: text and images"),
    "chat": ("morph_lightning.chat", "a multi-turn session in the terminal; image edits chain"),
    "evaluate": ("morph_lightning.evaluate", "score a trained model on a benchmark's items"),
    "export": ("morph_lightning.export", "export a trained model into files other tools read"),
    "precompute-codes": ("morph_lightning.precompute", "encode pair shards' images once with the VQGAN"),
    "world-towers": ("morph_lightning.world_towers", "train the world's stage-0 towers and score them"),
}


def usage() -> str:
    """Every command with one line each, then where each command's own help is."""

    def table(rows: dict[str, str]) -> list[str]:
        return [f"  {name:<18}{text}" for name, text in rows.items()]

    return "\n".join(
        [
            f"usage: {PROG} COMMAND [ARGS]",
            "",
            "training (LightningCLI):",
            *table(TRAINING),
            "",
            "project commands:",
            *table({name: text for name, (_, text) in SUBCOMMANDS.items()}),
            "",
            f"Run `{PROG} COMMAND --help` for a command's own options.",
            "A config error ends in one line naming the key or file; add --verbose for the full message.",
        ]
    )


def run(argv: list[str] | None = None) -> None:
    """Dispatch `argv` (the command line when None) to its command."""
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else ""
    if command in ("-h", "--help"):
        print(usage())
    elif not args:
        print(usage(), file=sys.stderr)
        raise SystemExit(2)
    elif command in SUBCOMMANDS:
        importlib.import_module(SUBCOMMANDS[command][0]).main(args[1:])
    elif command in TRAINING or command.startswith("-"):  # LightningCLI also takes options before its command
        from morph_lightning.cli import main  # here: --help stays quick without Lightning's import

        main(None if argv is None else args)
    else:
        print(f"error: unknown command '{command}'; `{PROG} --help` lists them", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    run()
