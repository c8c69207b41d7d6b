"""Regenerate every benchmark report, plot and README table in one run.

Each benchmark (and the demo) runs as its own process, one after the other, with the settings the README quotes. Its
report (the markdown it prints) goes to ``benchmarks/results/<name>.md`` and its plot to
``benchmarks/results/<name>.png``; ``benchmarks/results/README.md`` lists the machine, every command, its seeds and
wall time. Then every README block fenced by ``<!-- bench:<name> -->`` ... ``<!-- /bench:<name> -->`` is replaced by
the tables of the fresh report (``<!-- bench:<name>#2,3 -->`` takes only its 2nd and 3rd table), so the README can
never quote a figure the scripts did not print. The prose around the blocks is written by hand: reread it after a
run.

Run from the repository root::

    python benchmarks/run_all.py                        # everything, about 40 minutes on 2 idle cores
    python benchmarks/run_all.py --only cache sequence  # some of them
    python benchmarks/run_all.py --quick --no-readme    # smoke run of every script (tests/test_benchmarks.py)

A benchmark that fails is reported with its exit code (its error output streams through); its README block and
result files are left as they were, the others are still updated, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(
    r"(<!-- bench:(?P<name>[a-z_]+)(?:#(?P<which>[0-9,]+))? -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.DOTALL
)


@dataclass(frozen=True)
class Benchmark:
    """One script of the report: its arguments for the full and the quick run, and how it is given a plot path."""

    name: str
    args: tuple[str, ...]
    seeds: str
    plot_flag: str | None = "--plot"

    def command(self, quick: bool, results: Path, scratch: Path) -> list[str]:
        """The command line, run from the repository root."""
        if self.name == "demo":
            base = [sys.executable, "-m", "lightning_distill.cli", "demo", "--output", str(scratch / "demo")]
        else:
            base = [sys.executable, f"benchmarks/{self.name}.py"]
        args = ["--quick"] if quick else list(self.args)
        if self.plot_flag == "--plot":
            args += ["--plot", str(results / f"{self.name}.png")]
        elif self.plot_flag == "--output":
            args += ["--output", str(results)]
        return base + args


BENCHMARKS = (
    Benchmark("demo", (), "students 0-4, teacher 0, data seed 42", plot_flag=None),
    Benchmark(
        "overhead", ("--rounds", "30", "--epochs", "4", "--clock", "thread"), "seed 0, data seed 42", plot_flag=None
    ),
    Benchmark("features", ("--seeds", "5", "--rounds", "20"), "0-4, data seed 42"),
    Benchmark("self_distill", (), "0-2, data seed 42", plot_flag="--output"),
    Benchmark("ddp", (), "0", plot_flag=None),
    Benchmark("sharding", (), "0", plot_flag=None),
    Benchmark("cache", (), "0-2, data seed 42"),
    Benchmark("sequence", (), "0-2 (students), chain seed 0"),
    Benchmark("quantization", (), "0-2, data seed 42"),
    Benchmark("on_policy", (), "0-2 (students), chain seed 0"),
    Benchmark("token_cache", (), "0-2 (students), chain seed 0"),
)
NAMES = tuple(b.name for b in BENCHMARKS)


@dataclass(frozen=True)
class Outcome:
    """What one benchmark run left behind."""

    benchmark: Benchmark
    command: str
    returncode: int
    seconds: float
    report: str


def run_one(benchmark: Benchmark, quick: bool, results: Path, scratch: Path) -> Outcome:
    """Run one benchmark, letting its progress and errors (stderr) through and capturing its report (stdout)."""
    cmd = benchmark.command(quick, results, scratch)
    shown = " ".join(["python", *cmd[1:]]).replace(str(ROOT) + os.sep, "").replace(str(scratch) + os.sep, "")
    shown = shown.replace("python -m lightning_distill.cli demo --output demo", "lightning-distill demo")
    print(f"\n=== {benchmark.name}: {shown}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)  # stderr streams through
    seconds = time.perf_counter() - start
    report = proc.stdout
    if benchmark.name == "demo":  # the report as `lightning-distill demo` prints it: its default output folder
        report = report.replace(str(scratch / "demo"), "demo_output")
        if proc.returncode == 0:
            shutil.copyfile(scratch / "demo" / "results.png", results / "demo.png")
    return Outcome(benchmark, shown, proc.returncode, seconds, report)


def tables(report: str, which: str | None = None) -> str:
    """The markdown tables of a report (all, or the 1-based positions in ``which``, e.g. ``"2,3"``), blank-separated.

    Raises:
        ValueError: ``which`` names a table the report does not have.
    """
    blocks: list[list[str]] = [[]]
    for line in report.splitlines():
        if line.startswith("|"):
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    found = ["\n".join(block) for block in blocks if block]
    positions = range(1, len(found) + 1) if which is None else [int(i) for i in which.split(",")]
    if any(not 1 <= i <= len(found) for i in positions):
        raise ValueError(f"The report has {len(found)} table(s); a README block asks for tables {which}.")
    return "\n\n".join(found[i - 1] for i in positions)


def update_readme(readme: Path, outcomes: Sequence[Outcome], stamp: str) -> list[str]:
    """Replace the README block of every successful outcome; return the names whose block is missing."""
    text = readme.read_text()
    fresh = {o.benchmark.name: o for o in outcomes if o.returncode == 0}
    found = set()

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in fresh:
            return match.group(0)
        found.add(name)
        outcome = fresh[name]
        body = (
            f"{tables(outcome.report, match['which'])}\n\n"
            f"<sub>Generated by `python benchmarks/run_all.py` on {stamp} from `{outcome.command}` "
            f"({outcome.seconds:.0f} s); full report and machine: `benchmarks/results/{name}.md`.</sub>\n"
        )
        return f"{match.group(1)}{body}{match.group(5)}"

    readme.write_text(BLOCK.sub(replace, text))
    return sorted(set(fresh) - found)


def write_index(results: Path, outcomes: Sequence[Outcome], stamp: str) -> None:
    """``results/README.md``: the machine and one row per benchmark; rows of benchmarks not run this time are kept."""
    index = results / "README.md"
    old = index.read_text().splitlines() if index.exists() else []
    kept = {m[1]: line for line in old if (m := re.match(r"\| `([a-z_]+)` \|", line))}
    reports = [o.report.splitlines() for o in outcomes if "- CPU" in o.report]
    machine = [line for line in (reports[0] if reports else old) if line.startswith(("- CPU", "- Python"))]
    fresh = {
        o.benchmark.name: f"| `{o.benchmark.name}` | `{o.command}` | {o.benchmark.seeds} | {stamp} | {o.seconds:.0f} | "
        + ("ok" if o.returncode == 0 else f"FAILED ({o.returncode})")
        + f" | [{o.benchmark.name}.md]({o.benchmark.name}.md) |"
        for o in outcomes
    }
    rows = [fresh.get(name) or kept[name] for name in NAMES if name in fresh or name in kept]
    lines = [
        "# Benchmark results",
        "",
        "Written by `python benchmarks/run_all.py`. Every figure is a median (timings) or a mean ± std over the seeds "
        "listed (accuracy); each report gives its own details and the machine's load.",
        "",
        *machine,
        "",
        "| benchmark | command | seeds | run on | wall s | status | report |",
        "|---|---|---|---|---:|---|---|",
        *rows,
    ]
    index.write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=NAMES, default=list(NAMES), help="run only these")
    parser.add_argument("--quick", action="store_true", help="smoke run of every script (figures meaningless)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="reports and plots")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="README whose blocks are replaced")
    parser.add_argument("--no-readme", action="store_true", help="leave the README alone")
    args = parser.parse_args(argv)
    if args.quick and not args.no_readme and args.readme.resolve() == (ROOT / "README.md").resolve():
        parser.error("--quick figures are meaningless: add --no-readme, or --readme pointing at a copy")
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    outcomes = []
    with tempfile.TemporaryDirectory() as scratch:
        for benchmark in (b for b in BENCHMARKS if b.name in args.only):
            outcome = run_one(benchmark, args.quick, args.results, Path(scratch))
            outcomes.append(outcome)
            if outcome.returncode == 0:
                (args.results / f"{benchmark.name}.md").write_text(outcome.report)
    write_index(args.results, outcomes, stamp)
    missing = [] if args.no_readme else update_readme(args.readme, outcomes, stamp)
    failed = [o for o in outcomes if o.returncode != 0]
    for o in failed:
        print(f"FAILED {o.benchmark.name} (exit {o.returncode}, error output above): {o.command}", file=sys.stderr)
    if missing:
        print(f"README has no <!-- bench:NAME --> block for: {', '.join(missing)}", file=sys.stderr)
    print(f"\n{len(outcomes) - len(failed)} of {len(outcomes)} benchmarks ok; results in {args.results}")
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
