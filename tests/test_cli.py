"""The CLI and the paper-scale configs: values, config lookup, start-up errors.

Fast: the paper configs are only parsed (`--print_config` exits before anything is built), so the
7B model is never loaded. Start-up errors on the paper configs also pass `--print_config`, so a parse
that wrongly succeeded would print and exit 0 (and fail the test) rather than build anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from morph_lightning.cli import CONFIG_DIR, main, resolve_config
from morph_lightning.modeling.model import MorphModel

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """`python -m morph_lightning ARGS` in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else code), out, err


def print_config(config: str, capsys, *extra: str) -> dict:
    code, out, err = run_cli(["fit", "--config", config, *extra, "--print_config"], capsys)
    assert code == 0, err
    return yaml.safe_load(out)


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    """Run from an empty folder: bare config names must come from configs/, and nothing is written here."""
    monkeypatch.chdir(tmp_path)


# ---- the paper's values ---------------------------------------------------------------------------
def check_shared_paper_values(cfg: dict) -> None:
    """Values every stage shares (Section 3.4, Appendix C.2, DESIGN.md's paper hyper-parameters)."""
    t = cfg["trainer"]
    assert t["accelerator"] == "gpu"
    assert (t["devices"], t["num_nodes"]) == (8, 2)  # 16 GPUs
    assert t["precision"] == "bf16-mixed"
    (ckpt,) = [c for c in t["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert ckpt["init_args"]["every_n_train_steps"] == 5000
    assert ckpt["init_args"]["save_last"] is True
    assert t["logger"]["class_path"].endswith("TensorBoardLogger")

    h = cfg["model"]["init_args"]
    assert h["betas"] == [0.9, 0.999]
    assert h["weight_decay"] == 0.05
    assert h["warmup_steps"] == 2000
    assert h["max_text_tokens"] == 512  # |Y| <= 512

    m = h["model"]
    assert m["llm"]["name_or_path"] == "lmsys/vicuna-7b-v1.1"
    assert m["llm"]["dtype"] == "bfloat16"
    assert m["llm"]["lora_r"] == 64
    assert m["llm"]["lora_target_modules"] == ["q_proj", "v_proj"]
    assert (m["llm"]["lora_alpha"], m["llm"]["lora_dropout"]) == (16, 0.05)
    assert m["llm"]["train_base"] is False  # LoRA only (Appendix C.2)
    assert m["vision"]["name"] == "eva_giant_patch14_clip_224.laion400m"
    assert m["vision"]["pretrained"] is True
    assert m["vision"]["image_size"] == 224
    paper_qformer = {"num_queries": 32, "dim": 768, "depth": 12, "num_heads": 12, "deconfound": True}
    # BLIP-2's Q-former layout, so BLIP-2 / SEED weights fit; causal queries and slot attention (App. B)
    paper_qformer |= {"intermediate_size": 3072, "cross_attention_frequency": 2, "causal": True}
    assert paper_qformer.items() <= m["qformer"].items()
    assert m["qformer"]["slot_attention"] == "replace"
    assert (m["quantizer"]["codebook_size"], m["quantizer"]["dim"]) == (8192, 32)  # SEED's codebook
    assert {"n_layer": 48, "n_head": 24, "n_embd": 1536}.items() <= m["decoder"].items()
    assert "prefix_dim" not in m["decoder"]  # derived from the LLM, not a config key
    assert m["vqgan"]["n_embed"] == 16384
    assert m["vqgan"]["resolution"] == 256
    assert m["vqgan"]["ch_mult"] == [1, 1, 2, 2, 4]  # f16: 256 px -> 16 x 16 codes
    assert m["vqgan_checkpoint"] == "checkpoints/vqgan_imagenet_f16_16384/last.ckpt"

    d = cfg["data"]["init_args"]
    assert (d["vision_size"], d["vqgan_size"]) == (224, 256)


def test_stage2_print_config_has_the_paper_values(capsys):
    cfg = print_config("stage2.yaml", capsys)  # a bare name, found in configs/
    check_shared_paper_values(cfg)
    assert cfg["model"]["class_path"] == "morph_lightning.stages.Stage2AutoEncode"
    assert cfg["model"]["init_args"]["lr"] == 0.0001
    assert cfg["trainer"]["max_steps"] == 200000
    assert cfg["model"]["init_args"]["init_from"] == "runs/stage1/last.ckpt"
    assert cfg["trainer"]["logger"]["init_args"]["save_dir"] == "runs/stage2"  # default_root_dir's
    assert cfg["data"]["class_path"] == "morph_lightning.data_modules.pairs.ImageTextPairsDataModule"
    assert cfg["data"]["init_args"]["vision_size"] == 224 and cfg["data"]["init_args"]["vqgan_size"] == 256
    assert cfg["model"]["init_args"]["pack_length"] == 1024


def test_stage2_print_config_text(capsys):
    """The same values as they read in the printed YAML."""
    code, out, err = run_cli(["fit", "--config", "stage2.yaml", "--print_config"], capsys)
    assert code == 0, err
    for text in (
        "lr: 0.0001",
        "max_steps: 200000",
        "lora_r: 64",
        "num_queries: 32",
        "lmsys/vicuna-7b-v1.1",
        "eva_giant",
        "n_embed: 16384",
        "codebook_size: 8192",
        "max_text_tokens: 512",
        "weight_decay: 0.05",
        "- 0.9\n    - 0.999",
    ):
        assert text in out, text


def test_stage3_print_config(capsys):
    cfg = print_config("stage3.yaml", capsys)
    check_shared_paper_values(cfg)
    assert cfg["model"]["class_path"] == "morph_lightning.stages.Stage3Instruct"
    assert cfg["model"]["init_args"]["lr"] == 1e-05
    assert cfg["trainer"]["max_steps"] == 100000
    assert cfg["model"]["init_args"]["init_from"] == "runs/stage2/last.ckpt"
    assert cfg["model"]["init_args"]["morph_ar_weight"] == 1.0
    assert cfg["data"]["init_args"]["instruct"] is True


def test_stage1_print_config_through_python_m(tmp_path):
    """`python -m morph_lightning` itself (the __main__ entry), with `--config=NAME` from another folder."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "morph_lightning", "fit", "--config=stage1.yaml", "--print_config"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    check_shared_paper_values(cfg)
    assert cfg["model"]["class_path"] == "morph_lightning.stages.Stage1AR"
    # stage 1 names the encoder's initial weights (SEED's tokenizer); later stages start from stage 1
    assert (
        cfg["model"]["init_args"]["model"]["encoder_init"] == "checkpoints/seed_tokenizer/seed_quantizer.pt"
    )
    assert cfg["model"]["init_args"]["lr"] == 0.0001
    assert cfg["trainer"]["max_steps"] == 200000
    assert cfg["model"]["init_args"]["init_from"] is None


@pytest.mark.parametrize(
    "config", ["stage1.yaml", "tiny/stage2.yaml", "world/stage3.yaml", "world/stage0_lm.yaml"]
)
def test_output_folders_follow_default_root_dir(config, capsys):
    """The loggers' save_dir and the checkpoints' dirpath are the run folder, wherever it is moved."""
    for extra, root in (([], None), (["--trainer.default_root_dir", "elsewhere/run"], "elsewhere/run")):
        t = print_config(config, capsys, *extra)["trainer"]
        root = root or t["default_root_dir"]
        assert root.startswith("runs/") or extra
        loggers = t["logger"] if isinstance(t["logger"], list) else [t["logger"]]
        assert [lg["init_args"]["save_dir"] for lg in loggers] == [root] * len(loggers)
        (ckpt,) = [c for c in t["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
        assert ckpt["init_args"]["dirpath"] == root


# ---- start-up errors: top level (the parser) ------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--model.init_args.lrr", "0.1"], ["lrr"]),
        (["--trainer.max_stepz", "10"], ["max_stepz"]),
    ],
)
def test_unknown_key_on_the_command_line_stops_naming_it(capsys, args, names):
    code, out, err = run_cli(["fit", "--config", "stage2.yaml", *args, "--print_config"], capsys)
    assert code != 0
    assert out == ""
    for name in names:
        assert name in err


@pytest.mark.parametrize(
    "override",
    [
        "model:\n  init_args:\n    weight_decy: 0.1\n",
        "trainer:\n  max_stepz: 10\n",
        "dta:\n  init_args:\n    batch_size: 4\n",
    ],
)
def test_misspelled_key_in_a_yaml_stops_naming_it(tmp_path, capsys, override):
    bad = tmp_path / "bad.yaml"
    bad.write_text(override)
    key = override.strip().splitlines()[-1].split(":")[0].strip()
    code, out, err = run_cli(
        ["fit", "--config", "stage2.yaml", "--config", str(bad), "--print_config"], capsys
    )
    assert code != 0
    assert out == ""
    assert key in err


@pytest.mark.parametrize(
    ("args", "last_line"),
    [
        (["--trainer.max_steps", "abc"], "command line: trainer.max_steps: expected int, got 'abc'"),
        (["--model.init_args.lr", "abc"], "command line: model.init_args.lr: expected float, got 'abc'"),
        (["--model.init_args.warmup_steps", "1.5"], "model.init_args.warmup_steps: expected int, got '1.5'"),
    ],
)
def test_wrong_type_stops_naming_the_key(capsys, args, last_line):
    code, out, err = run_cli(["fit", "--config", "stage2.yaml", *args, "--print_config"], capsys)
    assert code != 0
    assert out == ""
    assert err.splitlines()[-1].endswith(last_line)


# ---- start-up errors: inside the model section (checked when MorphModel is built) ----------------
def test_wrong_key_inside_model_stops_at_parse_time_naming_it(tmp_path, capsys):
    text = (CONFIG_DIR / "tiny" / "stage1.yaml").read_text()
    assert "decoder: {n_layer: 2" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("decoder: {n_layer: 2", "decoder: {n_layers: 2"))
    code, out, err = run_cli(["fit", "--config", str(bad), "--trainer.max_steps", "1"], capsys)
    assert code != 0 and "n_layers" in err
    assert not list(tmp_path.rglob("*.ckpt"))  # stopped at start-up: no step was taken


def test_one_key_inside_the_model_section_overrides_and_merges(capsys):
    code, out, _ = run_cli(
        ["fit", "--config", "stage2.yaml", "--model.init_args.model.llm.lora_r", "8", "--print_config"],
        capsys,
    )
    assert code == 0
    llm = yaml.safe_load(out)["model"]["init_args"]["model"]["llm"]
    assert llm["lora_r"] == 8
    assert llm["dtype"] == "bfloat16" and llm["name_or_path"] == "lmsys/vicuna-7b-v1.1"  # kept, not replaced


def test_wrong_key_inside_model_section(tiny_cfg):
    cfg = dict(tiny_cfg, decoder={"n_layers": 3, "n_head": 2, "n_embd": 64})
    with pytest.raises(ValueError, match=r"model.*n_layers"):
        MorphModel(cfg)


def test_wrong_type_inside_model_section(tiny_cfg):
    cfg = dict(tiny_cfg, qformer={"num_queries": "many", "dim": 32, "depth": 1, "num_heads": 2})
    with pytest.raises(ValueError, match=r"model.*num_queries"):
        MorphModel(cfg)


def test_derived_key_in_model_section_is_refused(tiny_cfg):
    """Sizes fixed by another component (the decoder's prefix width is the LLM's) are not config keys."""
    cfg = dict(tiny_cfg, decoder={"n_layer": 2, "n_head": 2, "n_embd": 64, "prefix_dim": 64})
    with pytest.raises(ValueError, match=r"model.*prefix_dim"):
        MorphModel(cfg)


def test_unknown_model_section_is_refused(tiny_cfg):
    cfg = dict(tiny_cfg, decodr={"n_layer": 2})
    with pytest.raises(ValueError, match="decodr"):
        MorphModel(cfg)


# ---- resolve_config -------------------------------------------------------------------------------
def test_resolve_config_keeps_an_existing_path(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("seed_everything: 1\n")
    assert resolve_config(str(mine)) == str(mine)
    # A file in the working folder wins over configs/ of the same name.
    (tmp_path / "stage2.yaml").write_text("seed_everything: 1\n")
    assert resolve_config("stage2.yaml") == "stage2.yaml"


def test_resolve_config_maps_a_bare_name_to_configs():
    for name in ("stage1.yaml", "stage2.yaml", "stage3.yaml", "tiny/stage1.yaml"):
        resolved = resolve_config(name)
        assert resolved == str(CONFIG_DIR / name)
        assert Path(resolved).is_file()
    assert CONFIG_DIR == ROOT / "configs"


def test_resolve_config_leaves_an_unknown_name_alone():
    assert resolve_config("no_such_config.yaml") == "no_such_config.yaml"


def test_wrong_generation_key_stops_at_start_up(tiny_cfg):
    from morph_lightning.stages import Stage3Instruct

    with pytest.raises(ValueError, match=r"generation.*max_new_token"):
        Stage3Instruct(model=tiny_cfg, generation={"max_new_token": 4})


# ---- `--help`: every command, one line each ----------------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"], ["-h"], []])
def test_help_lists_every_command_then_where_their_help_is(argv, capsys):
    from morph_lightning.__main__ import SUBCOMMANDS, TRAINING, run

    if argv:
        run(argv)
    else:  # no command: the same list, as an error
        with pytest.raises(SystemExit) as exc:
            run(argv)
        assert exc.value.code == 2
    out, err = capsys.readouterr()
    lines = (out or err).splitlines()
    for name in [*TRAINING, *SUBCOMMANDS]:
        (line,) = [x for x in lines if x.split()[:1] == [name]]
        assert len(line.split()) > 2, line  # a description beside the name
    assert "generate" in SUBCOMMANDS and "chat" in SUBCOMMANDS
    assert "COMMAND --help" in "\n".join(lines[-2:])


def test_every_subcommand_module_exists():
    import importlib.util

    from morph_lightning.__main__ import SUBCOMMANDS

    for name, (module, _) in SUBCOMMANDS.items():
        assert importlib.util.find_spec(module) is not None, name


def test_a_training_command_keeps_lightning_help(capsys):
    code, out, _ = run_cli(["fit", "--help"], capsys)
    assert code == 0 and "--trainer.max_steps" in out and "--ckpt_path" in out


def test_an_unknown_command_is_named(capsys):
    from morph_lightning.__main__ import run

    with pytest.raises(SystemExit) as exc:
        run(["fitt"])
    assert exc.value.code == 2
    assert "unknown command 'fitt'" in capsys.readouterr().err.splitlines()[-1]


# ---- a config error ends in one line naming the key or the file ---------------------------------------
DUMP = ("Given value", "Subtypes:", "usage:")  # jsonargparse's namespace dump and usage


@pytest.mark.parametrize(
    ("extra", "yaml_text", "last_line"),
    [
        (["--model.init_args.bogus", "1"], None, "error: command line: unknown key 'model.init_args.bogus'"),
        (["--trainer.max_stepz", "3"], None, "error: command line: unknown key 'trainer.max_stepz'"),
        (
            [],
            "model:\n  init_args:\n    model:\n      decoder: {n_layers: 2}\n",
            "error: bad.yaml: unknown key 'model.init_args.model.decoder.n_layers'",
        ),
        ([], "trainer:\n  max_stepz: 10\n", "error: bad.yaml: unknown key 'trainer.max_stepz'"),
    ],
)
def test_config_error_is_one_last_line_without_the_dump(capsys, extra, yaml_text, last_line):
    args = ["fit", "--config", "tiny/stage1.yaml", *extra]
    if yaml_text:
        Path("bad.yaml").write_text(yaml_text)  # in the test's own folder (_cwd)
        args += ["--config", "bad.yaml"]
    code, out, err = run_cli(args, capsys)
    assert code == 2 and out == ""
    assert err.splitlines()[-1] == last_line
    assert not any(d in err for d in DUMP) and len(err.splitlines()) <= 3

    code, _, err = run_cli([*args, "--verbose"], capsys)  # the full message only on request
    assert code == 2 and err.splitlines()[-1] == last_line
    assert "add --verbose" not in err and len(err.splitlines()) >= 2
    assert ("Given value" in err) == ("model.init_args" in last_line)  # a class's errors come with a dump


def test_missing_vqgan_checkpoint_names_the_key_from_python(tmp_path):
    from morph_lightning.cli import ConfigError

    Path("bad.yaml").write_text("model:\n  init_args:\n    model:\n      vqgan_checkpoint: towers/x.ckpt\n")
    with pytest.raises(
        ConfigError, match=r"^model.init_args.model.vqgan_checkpoint: no file at towers/x.ckpt$"
    ):
        main(["fit", "--config", "tiny/stage1.yaml", "--config", "bad.yaml"])
    assert not Path("runs").exists()


def test_missing_vqgan_checkpoint_is_one_line_on_the_command_line(tmp_path):
    """`python -m morph_lightning`: one line, no traceback, exit 1; the traceback with --verbose."""
    Path("bad.yaml").write_text("model:\n  init_args:\n    model:\n      vqgan_checkpoint: towers/x.ckpt\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    args = [sys.executable, "-m", "morph_lightning", "fit", "--config", "tiny/stage1.yaml"]
    for verbose in ([], ["--verbose"]):
        proc = subprocess.run(
            [*args, "--config", "bad.yaml", *verbose], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 1
        last = "error: bad.yaml: model.init_args.model.vqgan_checkpoint: no file at towers/x.ckpt"
        assert proc.stderr.splitlines()[-1] == last
        assert ("Traceback" in proc.stderr) == bool(verbose)
