"""benchmarks/train_throughput.py at toy size: its numbers are printed, not asserted."""

import importlib.util
import re
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


def test_train_benchmark_compares_the_same_tokens_and_ends_with_the_ratio(capsys):
    spec = importlib.util.spec_from_file_location("train_throughput", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shape = ["--hidden", "32", "--layers", "1", "--heads", "2", "--vocab", "300", "--codebook", "64"]
    run = ["--batch-size", "6", "--batches", "2", "--pack-length", "256", "--repeats", "1"]
    results = module.main(["--device", "cpu", *shape, *run, "--full-batches", "1", "--morph-tokens", "4"])
    hf, ours, stage1, stage2 = (results[k] for k in list(results)[:4])
    assert hf["useful"] == ours["useful"] > 0  # the same samples' tokens in both systems
    assert ours["rows"] < hf["rows"] and ours["total"] < hf["total"]  # packed into fewer rows
    assert stage1["useful"] > 0 and stage2["useful"] > stage1["useful"]  # stage 2: two rows per image
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"train speed-up vs transformers\+peft: \d+\.\d\dx", lines[-1])
