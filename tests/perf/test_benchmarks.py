"""The README's benchmark commands run end to end (`--quick` shapes) and report their ratios.

Speed is not checked here (the ratios of a 2-core CI runner mean little); the reports' structure,
the agreement of the compared layers and the recorded environment are."""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))

pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _restore_threads():
    """The scripts' --threads sets torch's process-wide thread count: put it back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_layer_benchmark_quick_reports_ratios_and_agreement(tmp_path):
    import bench_moe_layer

    out = tmp_path / "layer.md"
    bench_moe_layer.main(["--quick", "--threads", "1", "--device", "cpu", "--markdown", str(out)])
    report = out.read_text()
    for row in ("dense SwiGLU (same FLOPs)", "moe_lm MoE (torch backend)",
                "transformers Mixtral eager", "transformers Mixtral grouped_mm",
                "experiment: dense SwiGLU, w1/w3 weight grads as moe_lm's"):
        assert f"| {row} |" in report
    assert re.search(r"moe_lm \(torch backend\) / dense time: \*\*\d+\.\d\dx\*\*", report)
    assert re.search(r"faster transformers / moe_lm time: \*\*\d+\.\d\dx\*\*", report)
    diffs = re.search(r"eager (\S+), grouped_mm (\S+)", report)
    assert diffs and max(float(diffs[1]), float(diffs[2])) < 2e-2  # same function, bf16


@pytest.mark.slow
def test_training_benchmark_quick_reports_tokens_per_second_and_mfu(tmp_path):
    import bench_train

    out = tmp_path / "train.md"
    bench_train.main(["--quick", "--threads", "1", "--device", "cpu", "--markdown", str(out)])
    report = out.read_text()
    assert re.search(r"\| moe_lm \| [\d.]+ \|", report)
    assert re.search(r"moe_lm tokens/s / transformers Mixtral eager tokens/s: \*\*\d+\.\d\dx\*\*",
                     report)
    assert "MFU" in report and "measured peak" in report
