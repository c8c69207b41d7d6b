"""The benchmark scripts run end to end (smoke tests only: timings are never asserted)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers.processes import REPO_ROOT, run_python


def run_quick(script: str, *args: str) -> str:
    return run_python(f"benchmarks/{script}", "--quick", *args)


def assert_plotted(out: str, path: Path) -> None:
    """The ``--plot`` PNG exists, is not empty, and the report names it."""
    assert path.stat().st_size > 0 and path.read_bytes().startswith(b"\x89PNG")
    assert f"Plot: `{path}` (" in out


@pytest.mark.slow
def test_overhead_quick_runs_and_prints_the_three_figures() -> None:
    out = run_quick("overhead.py")
    assert "| figure | ratio | per-round p25-p75 | best rounds | target | verdict |" in out
    for figure in ("(a) plugin / hand-written Lightning KD", "(b) full teacher cache / student alone", "(c) 1 feature"):
        assert f"| {figure}" in out
    assert "| variant | median step ms [p25-p75] | median epoch s | peak RSS MB (Δ fit) |" in out
    for label in ("plain PyTorch loop", "hand-written LightningModule", "DistillModule + DistillationCallback"):
        assert f"| {label}" in out
    for label in ("student alone", "full TeacherCache", "logit KD + 1 feature map"):
        assert label in out
    plugin_row = next(line for line in out.splitlines() if line.startswith("| DistillModule + DistillationCallback"))
    assert plugin_row.split("|")[4].strip() != "n/a"  # the plugin's peak RSS, measured in a subprocess


@pytest.mark.slow
def test_features_quick_runs_and_prints_both_tables(tmp_path: Path) -> None:
    out = run_quick("features.py", "--plot", str(tmp_path / "x.png"))
    assert "| student (CNN, 8 channels) | test acc (mean ± std) | gain vs alone (pts) |" in out
    assert "| feature maps (+ logit KD) | median step ms [p25-p75] | ratio vs 0 maps |" in out
    for row in ("| teacher (CNN", "| alone (CE only)", "| logit KD (alpha", "3 FitNets maps", "3 attention maps"):
        assert row in out
    for count in range(4):
        assert f"| {count} (" in out
    assert_plotted(out, tmp_path / "x.png")


@pytest.mark.slow
def test_self_distill_quick_runs_and_prints_the_tables(tmp_path: Path) -> None:
    out = run_quick("self_distill.py", "--output", str(tmp_path))
    assert "| variant | exit 0 | exit 1 | exit 2 | exit 3 (network) | ensemble | exit 3 gain vs alone | fit s |" in out
    for row in ("| network alone (CE", "| deep supervision (CE", "| self-distillation (T=3"):
        assert row in out
    assert out.count("| threshold | accuracy | Δ vs full (pts) |") == 2
    for batch in ("#### Test set in batches of 100", "#### Test set in batches of 1000"):
        assert batch in out
    assert "1.5x target" in out or "No threshold loses <= 1 pt" in out
    assert (tmp_path / "self_distill.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_quick_runs_and_prints_the_table() -> None:
    out = run_quick("ddp.py")
    assert "| processes (1 thread each) | median samples/s | ratio vs 1 process |" in out
    assert "| 2 (`ddp`, gloo) |" in out and "the machine's ceiling" in out


@pytest.mark.slow
@pytest.mark.distributed
def test_sharding_quick_runs_and_reports_half_the_teacher_per_rank() -> None:
    out = run_quick("sharding.py")
    assert "| `teacher_sharding` | teacher MiB per rank (at rest) | median samples/s |" in out
    replicate = float(out.split("| `replicate` | ")[1].split(" |")[0])
    shard = float(out.split("| `shard` | ")[1].split(" |")[0])
    assert replicate > 16 and abs(shard - replicate / 2) < 0.01  # 4.3 M float32 parameters, halved by sharding


@pytest.mark.slow
def test_cache_quick_runs_and_prints_the_table(tmp_path: Path) -> None:
    out = run_quick("cache.py", "--plot", str(tmp_path / "x.png"))
    assert (
        "| variant | median step ms (epochs >= 2) | ratio vs alone | test acc % (mean ± std) | bytes per sample |"
        in out
    )
    for row in ("| student alone |", "| uncached KD |", "| cached KD (full logits) |", "| cached KD (top-3) |"):
        assert row in out
    assert "| cached KD (full logits) |" in out and "| 33 |" in out  # 10 float16 logits, inputs digest, CRC, flag
    assert_plotted(out, tmp_path / "x.png")


@pytest.mark.slow
def test_sequence_quick_runs_and_prints_both_tables(tmp_path: Path) -> None:
    out = run_quick("sequence.py", "--plot", str(tmp_path / "x.png"))
    assert "| variant | peak RSS above the logits, MB | median ms |" in out
    assert "| naive |" in out and "| chunked (256 positions) |" in out
    for row in ("| the chain itself", "| teacher (dim 64", "| student alone", "| student distilled"):
        assert row in out
    assert_plotted(out, tmp_path / "x.png")


@pytest.mark.slow
def test_quantization_quick_runs_and_prints_both_tables(tmp_path: Path) -> None:
    out = run_quick("quantization.py", "--plot", str(tmp_path / "x.png"))
    assert "| model | test acc % (mean ± std, exported) | KD gain (pts) | vs float (pts) |" in out
    assert "| model | weights KiB | latency ms, batch 1 (median) | latency ms, batch 1000 (median) |" in out
    for row in ("| 8-bit, QAT alone", "| 8-bit, QAT + KD", "| 4-bit, QAT alone", "| 4-bit, QAT + KD", "| int8 (8-bit"):
        assert row in out
    assert_plotted(out, tmp_path / "x.png")


@pytest.mark.slow
def test_on_policy_quick_runs_and_prints_every_table(tmp_path: Path) -> None:
    out = run_quick("on_policy.py", "--plot", str(tmp_path / "x.png"))
    assert out.startswith(
        "## On-policy distillation (GKD) on a Markov language: `python benchmarks/on_policy.py --quick"
    )
    for title in (
        "### Small data: 32 training sequences",
        "### Long generation: 256 training sequences",
        "### Step time",
    ):
        assert title in out
    assert out.count("| model | impossible rate % | impossible mass % | NLL at tokens 5..") == 2
    for row in ("| the chain itself (floor) | 0.00 | 0.00 |", "| teacher (dim 64", "| student alone (CE) |"):
        assert out.count(row) == 2
    for row in ("| off-policy KD (forward KL) |", "| on-policy KD (forward KL) |", "| on-policy KD (JSD, beta 0.5) |"):
        assert out.count(row) == 2
    assert "| off-policy KD, full-length data |" in out and out.count("(reference) | (reference) |") == 2
    assert (
        "| step | median ms per step | ratio on / off-policy (median over rounds) | per-round ratios | target |" in out
    )
    assert (
        "| on-policy KD, 4-token prompts + 28 sampled |" in out
        and "| on-policy KD, 4-token prompts + 60 sampled |" in out
    )
    assert out.count("**met**") + out.count("**NOT met**") == 4  # 2 accuracy targets, 2 step-time targets
    assert_plotted(out, tmp_path / "x.png")


@pytest.mark.slow
def test_token_cache_quick_runs_and_prints_every_table(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = run_quick("token_cache.py", "--plot", str(tmp_path / "x.png"))
    assert out.startswith(
        "## Token-level teacher cache (TokenCache, top-16): `python benchmarks/token_cache.py --quick"
    )
    for title in ("### 1. Size", "### 2. Fidelity", "### 3. Quality", "### 4. Speed", "### 5. Pre-pass throughput"):
        assert title in out
    assert (
        "| pre-pass | vocabulary | tokens stored | tokens a sample | bytes a token (tokens.bin + samples.bin) |" in out
    )
    for vocab in (
        "| 64 | uint8 | 42 |",
        "| 50257 | uint16 | 58 |",
        "| 65536 | uint16 | 58 |",
        "| 128256 | uint32 | 90 |",
    ):
        assert vocab in out
    assert "| setting | positions | median top-16 mass | mean full KL (nats) |" in out
    for row in ("| random logits, V = 50257, scale 6 (peaked) |", "| random logits, V = 50257, scale 3 (flatter) |"):
        assert row in out
    assert out.count("| Markov teacher, student ") == 2
    assert "| model | held-out perplexity (mean ± std) | per seed | vs online, per seed |" in out
    for row in ("| student alone |", "| distilled online (full logits) |", "| distilled from the cache (top-16) |"):
        assert row in out
    assert "| student | variant | median ms a step |" in out and out.count("<= 1.10x: **") == 4
    assert "| teacher | stored tokens | forward loop, tokens/s |" in out
    assert "| Markov TinyCausalLM" in out and "| GPT-2 from config" in out
    # 3 vocabularies and the size target; the step-time target of 2 students, in the table and the verdicts
    assert out.count("**met**") + out.count("**NOT met**") == 3 + 1 + 2 + 2
    assert "**within noise**" in out or "**NOT within noise**" in out
    assert_plotted(out, tmp_path / "x.png")


@pytest.mark.slow
def test_gpu_model_quick_runs_on_cpu_and_prints_the_table() -> None:
    pytest.importorskip("transformers")
    out = run_quick("gpu_model.py", "--device", "cpu")
    assert "| variant | median step ms [p25-p75] | ratio vs hand-written (median of rounds) |" in out
    rows = ("| hand-written |", "| plugin |", "| plugin, check_finite=False |", '| plugin, teacher_precision="bf16" |')
    assert all(row in out for row in rows), out


def test_gpu_check_script_is_valid_bash_and_documents_its_dry_run() -> None:
    script = REPO_ROOT / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    assert os.access(script, os.X_OK)
    help_text = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30).stdout
    assert "--cpu-dry-run" in help_text and "benchmarks/results/gpu_check.md" in help_text
