"""The benchmark scripts run (at toy size): their numbers are printed, not asserted."""

import importlib.util
import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_packing_benchmark_packs_the_same_tokens_into_fewer_rows(capsys):
    args = ["--device", "cpu", "--hidden", "32", "--layers", "1", "--batch-size", "6", "--batches", "2"]
    results = _load("packing").main([*args, "--morph-tokens", "4", "--pack-length", "256"])
    padded, packed = results.values()
    assert packed["useful"] == padded["useful"] > 0
    assert packed["rows"] < padded["rows"] and packed["total"] < padded["total"]
    assert "useful tok/s" in capsys.readouterr().out


def test_generation_benchmark_gets_the_same_images_with_and_without_the_caches(capsys):
    """The static caches uncompiled (`--no-compile`): compiling three shapes would take minutes."""
    args = ["--device", "cpu", "--hidden", "32", "--layers", "1", "--batch", "2", "--caption-tokens", "3"]
    results = _load("generation").main([*args, "--no-compile"])  # raises if any system's outputs differ
    expected = {"speed-up 1", "speed-up 2", "speed-up captioning", "static vs KV cache, captioning 2"}
    assert expected <= set(results)
    lines = capsys.readouterr().out.strip().splitlines()
    assert "images/s" in lines[2] and "tokens/s" in lines[-4] and lines[-4].split()[2] == "static"
    assert re.fullmatch(r"generation speed-up vs recompute: \d+\.\d\dx", lines[-1])


def test_loss_memory_benchmark_gets_the_same_loss_chunked(capsys):
    args = ["--device", "cpu", "--hidden", "128", "--tokens", "64", "--chunks", "16"]
    results = _load("loss_memory").main(args)  # raises if a chunked loss differs from the whole one
    assert set(results) == {"memory ratio", "time ratio"}
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"loss memory, chunked \(16\) vs whole: \d+\.\d\dx less, \d+\.\d\dx the time", last)
