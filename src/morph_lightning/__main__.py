import importlib
import sys

from morph_lightning.cli import main

# Subcommands with their own argument parser; everything else is LightningCLI.
SUBCOMMANDS = {
    "demo": "morph_lightning.demo",
    "evaluate": "morph_lightning.evaluate",
    "export": "morph_lightning.export",
    "precompute-codes": "morph_lightning.precompute",
    "world-towers": "morph_lightning.world_towers",
}

if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command in SUBCOMMANDS:
        importlib.import_module(SUBCOMMANDS[command]).main(sys.argv[2:])
    else:
        main()
