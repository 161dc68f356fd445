"""The package layout: `data_modules/` and `callbacks/` sit at the repository's top level and are mapped
into `morph_lightning` by setup.cfg's `package_dir`. The editable install is what the rest of the suite
imports; here a regular (non-editable) wheel is built, installed into a temporary folder and used from
outside the repository: import paths, a data module, and a tiny fit through the CLI."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import morph_lightning.callbacks
import morph_lightning.data_modules

ROOT = Path(__file__).resolve().parents[1]


def setup_cfg_packages() -> tuple[set[str], dict[str, str]]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    packages = {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}
    mapping = {}
    for line in cfg["options"]["package_dir"].strip().splitlines():
        name, _, folder = (part.strip() for part in line.partition("="))
        mapping[name] = folder
    return packages, mapping


def packages_in_tree(mapping: dict[str, str]) -> set[str]:
    """Every folder with an `__init__.py`, named as it is imported."""
    found = set()
    for name, folder in mapping.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            if not name:  # the src/ root: its folders are top-level names
                found.add(".".join(rel))
            else:
                found.add(".".join((name, *rel)))
    return found


def test_layout_folders_are_at_the_top_level_and_import_by_package_name():
    assert (ROOT / "data_modules" / "__init__.py").is_file()
    assert (ROOT / "callbacks" / "__init__.py").is_file()
    assert not (ROOT / "src" / "morph_lightning" / "data_modules").exists()
    assert Path(morph_lightning.data_modules.__file__).resolve().parent == ROOT / "data_modules"
    assert Path(morph_lightning.callbacks.__file__).resolve().parent == ROOT / "callbacks"


def test_setup_cfg_lists_every_package_in_the_tree():
    packages, mapping = setup_cfg_packages()
    assert mapping["morph_lightning.data_modules"] == "data_modules"
    assert mapping["morph_lightning.callbacks"] == "callbacks"
    assert packages == packages_in_tree(mapping)


USE_INSTALLED = """
import sys
from pathlib import Path
site = Path(sys.argv[1]).resolve()
import morph_lightning.data_modules.toy as toy
import morph_lightning.data_modules.world.writer
import morph_lightning.callbacks
for mod in (toy, morph_lightning.data_modules.world.writer, morph_lightning.callbacks):
    assert site in Path(mod.__file__).resolve().parents, mod.__file__
dm = toy.ToyDataModule(batch_size=2)
dm.setup("fit")
batch = next(iter(dm.train_dataloader()))
print("batch keys:", sorted(batch))
"""


def test_regular_install_imports_and_fits_from_outside_the_repo(tmp_path):
    python = sys.executable
    source, wheels, site = tmp_path / "source", tmp_path / "wheels", tmp_path / "site"
    # A copy of what the build reads, so the build's own folders (build/, *.egg-info) stay out of the repo.
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("src", "data_modules", "callbacks"):
        shutil.copytree(ROOT / folder, source / folder, ignore=skip)
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    # No build isolation and no dependencies: builds with the setuptools installed here, offline.
    build = [python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    # pip writes caches (and probes tools that write settings) under HOME: keep those in tmp_path too
    pip_env = {**os.environ, "HOME": str(tmp_path), "PIP_NO_CACHE_DIR": "1"}
    subprocess.run([*build, str(source)], check=True, capture_output=True, cwd=tmp_path, env=pip_env)
    (wheel,) = wheels.glob("morph_lightning-*.whl")
    install = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site)]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True, cwd=tmp_path, env=pip_env)
    assert (site / "morph_lightning" / "data_modules" / "world" / "writer.py").is_file()
    assert (site / "morph_lightning" / "callbacks" / "__init__.py").is_file()

    # PYTHONPATH comes before site-packages and the editable install's finder, so the wheel's copy wins.
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True)
    proc = subprocess.run([python, "-c", USE_INSTALLED, str(site)], **run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch keys:" in proc.stdout

    config = ROOT / "configs" / "tiny" / "stage1.yaml"
    fit = ["fit", "--config", str(config), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]
    proc = subprocess.run([python, "-m", "morph_lightning", *fit], **run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "tiny" / "stage1" / "last.ckpt").is_file()  # relative to where it ran
