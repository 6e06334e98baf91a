"""What the benchmark scripts share: thread set-up before PyTorch loads, interleaved timing, the machine's description,
the large-matmul peak, and writing one section of docs/benchmarks.md.

Absolute times on a shared machine are noisy (other processes come and go), so every figure is a ratio against a
baseline timed in the same process, the variants interleaved (A, B, A, B, ...) and compared by their medians.
"""

import argparse
import contextlib
import datetime
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
# OpenMP threads that spin while waiting for each other lose whole time slices whenever another process holds a
# core: measured here, two threads ran TinyViT 6-8x slower than one while a niced training job shared the CPU,
# and LAPACK's SVD up to 100x slower. Passive waiting costs nothing measurable without contention. It must be in
# the environment before PyTorch (libgomp) loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(REPO))


def arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per variant (median reported)")
    parser.add_argument("--docs", type=Path, default=DOCS, help="markdown file whose section is updated")
    parser.add_argument("--no-docs", action="store_true", help="print the table only")
    return parser


def set_threads(threads: int):
    import torch

    torch.set_num_threads(threads)


def interleaved(variants: dict, repeats: int, warmup: int = 1) -> dict:
    """name -> list of seconds; every round runs each variant once, in order, after `warmup` untimed rounds."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def median(values) -> float:
    return statistics.median(values)


def spread(values) -> str:
    """min-max of the timed runs, so a reader sees how noisy the machine was."""
    return f"{min(values):.2f}-{max(values):.2f}"


@contextlib.contextmanager
def unmerged(model, rebuild_only=True):
    """Run the tuned layers unmerged for a while: W' from U, s', V^T on every forward (rebuild_only: always rebuilt,
    as the S-SAM reference code does; else the library's per-layer choice of rebuilt or factored, as in training)."""
    from SSAMSegmentLib.model.svd_linear import tuned_layers

    layers = tuned_layers(model.image_encoder)
    states = [layer.merged for layer in layers]
    for layer in layers:
        layer.merged = False
        if rebuild_only:
            layer.factored_is_cheaper = lambda x: False
    try:
        yield
    finally:
        for layer, state in zip(layers, states):
            layer.merged = state
            layer.__dict__.pop("factored_is_cheaper", None)


def matmul_peak_gflops(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a large float32 matrix product (best of `repeats`): the CPU's practical peak right now."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def machine(threads: int) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = names[0] if names else cpu
    except OSError:
        pass
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = ", AVX512-BF16" if "avx512_bf16" in text else (", AVX512" if "avx512f" in text else "")
    except OSError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.1f} at start"
    return (f"{cpu}{flags}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {threads} thread(s), "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}{load}")


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script))] + [shlex.quote(a) for a in sys.argv[1:]])


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(path: Path, name: str, title: str, body: str, threads: int, command: str = None):
    """Replace (or append) the section between this benchmark's markers in `path`, with command (default: this
    process's command line), date, machine."""
    from SSAMSegmentLib.files.atomic_file import atomic_output

    start, end = f"<!-- benchmark:{name} -->", f"<!-- /benchmark:{name} -->"
    section = "\n".join([
        start,
        f"## {title}",
        "",
        f"Command: `{command or command_line()}`  ",
        f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}  ",
        f"Machine: {machine(threads)}",
        "",
        body.strip(),
        end,
    ])
    path = Path(path)
    text = path.read_text() if path.is_file() else (
        "# Benchmarks\n\nWritten by the scripts in `benchmarks/`; each section says the command that made it. "
        "Times on a shared CPU are noisy, so each figure is a ratio against a baseline timed in the same process, "
        "interleaved (A, B, A, B, ...), medians compared; absolute seconds are given for scale only.\n"
    )
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    with atomic_output(path, suffix=".md") as temporary:
        Path(temporary).write_text(text.rstrip("\n") + "\n")
    print(f"updated {path} ({name})")
