"""Benchmark applying a task vector: in-memory ``apply_to``, streaming ``apply_safetensors`` (with
and without the base fingerprint) and a merge recipe with ``stream: true`` (``music.merging.Recipe``,
what ``music merge`` runs), beside a plain file copy (the disk's own speed).

Builds a synthetic float32 safetensors checkpoint (``--size-gb``, default 2; ``--quick`` ~50 MB)
and a task vector of the same shapes in a temporary directory (removed afterwards), then runs
each path in a fresh subprocess and reads that child's peak RSS from its own rusage
(``os.wait4``). Two traps make such numbers dishonest, and both are avoided:

* ``RUSAGE_CHILDREN`` is a running maximum over all children, so a second measurement would
  report max(first, second); ``wait4`` gives each child's own figure.
* a child's ``ru_maxrss`` starts from its parent's peak RSS (Linux records the old address
  space's high-water mark at exec), so this parent never imports torch or allocates tensors
  before the measurements: the files are generated in a child too.
* on this VM, writing into page-cache pages the guest has not used lately costs several
  times more than into pages just freed (1 GB: 2.2 s against 0.34 s, for a plain
  ``os.write`` loop as for ``shutil.copyfile``), which no path controls. Each child therefore
  runs its path twice: ``first`` into fresh pages, ``again`` after deleting the first
  output, into the pages it just freed. Both are reported.
* writeback of the previous child's 1 GB output would compete with the next child for the
  cores and the disk, so the parent ``sync``s (untimed) before each child.
* a normal interpreter exit after importing torch raises RSS by ~125 MiB (teardown), so
  children leave with ``os._exit`` once their result is printed.

"Over imports" subtracts the child's RSS right after importing torch and music (~0.5 GB on
this build), i.e. what the method itself costs. Throughput is model bytes (the base file)
per second, page cache warm for every path. Paths are run ``--rounds`` times, interleaved (a
busy machine slows them alike); medians are reported, with the machine's load average.

    python scripts/bench_task_vector.py --quick
    python scripts/bench_task_vector.py --size-gb 2 --rounds 3 --out results/task_vectors_bench.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COEF = 0.5


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def make_checkpoint(base: str, vector: str, size_bytes: float) -> dict:
    """Random float32 layers (square weights + biases) and an int step buffer."""
    import torch
    from safetensors.torch import save_file

    from music.merging import fingerprint
    from music.task_vector import TaskVector

    side = 4096 if size_bytes >= 2**30 else 1024
    layers = max(1, round(size_bytes / (4 * side * (side + 1))))
    gen = torch.Generator().manual_seed(0)
    state = {"step": torch.tensor(1000)}
    for i in range(layers):
        state[f"layer{i}.weight"] = torch.randn(side, side, generator=gen)
        state[f"layer{i}.bias"] = torch.randn(side, generator=gen)
    save_file(state, base)
    tau = {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in state.items()
           if v.is_floating_point()}
    TaskVector(tau, fingerprint(state)).save(vector)
    return {"description": f"{layers} x (float32 {side}x{side} weight + bias) + int64 step"}


def _entries(f) -> tuple[dict, int]:
    size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def outputs_identical(a: Path, b: Path) -> bool:
    """Same keys, dtypes, shapes and bytes (stricter than torch.equal); no torch needed."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        (ha, sa), (hb, sb) = _entries(fa), _entries(fb)
        if ha.keys() != hb.keys():
            return False
        for key, ea in ha.items():
            eb = hb[key]
            if (ea["dtype"], ea["shape"]) != (eb["dtype"], eb["shape"]):
                return False
            fa.seek(sa + ea["data_offsets"][0])
            fb.seek(sb + eb["data_offsets"][0])
            size = ea["data_offsets"][1] - ea["data_offsets"][0]
            if fa.read(size) != fb.read(size):
                return False
    return True


def worker(mode: str, *args: str) -> None:
    """Runs in a child; prints one JSON line."""
    sys.path.insert(0, str(ROOT))  # this checkout's music, whatever is installed
    if mode == "generate":
        result = make_checkpoint(args[0], args[1], float(args[2]))
    else:
        from safetensors.torch import load_file, save_file

        from music.merging import Recipe, Source
        from music.task_vector import TaskVector, apply_safetensors

        base, vector, out = args

        def once() -> float:
            start = time.perf_counter()
            if mode == "in-memory":
                save_file(TaskVector.load(vector).apply_to(load_file(base), COEF), out)
            elif mode == "streaming":
                apply_safetensors(base, vector, out, COEF)
            elif mode == "streaming-unchecked":
                apply_safetensors(base, vector, out, COEF, check_base=False)
            elif mode == "merge-stream":  # what `music merge` runs for a recipe without evaluation
                Recipe(base=base, output=out, vectors=[Source(vector)], stream=True, overwrite=True).run(COEF)
            else:  # copy: read the base and write it, the floor any path pays
                import shutil

                shutil.copyfile(base, out)
            return time.perf_counter() - start

        rss_after_imports = _rss_mib()
        first = once()
        os.unlink(out)
        result = {"seconds": first, "again": once(), "rss_after_imports": rss_after_imports}
    print(json.dumps(result))


def run(mode: str, *args: object) -> tuple[dict, float]:
    """(the child's JSON result, its own peak RSS in MiB)."""
    proc = subprocess.Popen([sys.executable, __file__, "--worker", mode, *map(str, args)],
                            stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{mode} child failed with exit code {proc.returncode}")
    return json.loads(stdout.strip().splitlines()[-1]), usage.ru_maxrss / 1024  # KiB on Linux


MODES = ("copy", "in-memory", "streaming", "streaming-unchecked", "merge-stream")


def main() -> None:
    import statistics

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="model size in GB (1e9 bytes)")
    parser.add_argument("--quick", action="store_true", help="~50 MB, for a smoke run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each path, interleaved")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        sys.stdout.flush()
        os._exit(0)  # skip interpreter teardown: torch's adds ~125 MiB of RSS at exit
    size = 50e6 if args.quick else args.size_gb * 1e9
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_tv_", dir=os.environ.get("BENCH_TMP")) as tmp:
        base, vector = Path(tmp, "base.safetensors"), Path(tmp, "vector.safetensors")
        made, _ = run("generate", base, vector, size)
        gb = base.stat().st_size / 1e9
        runs: dict[str, list[tuple[float, float, float]]] = {m: [] for m in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                out = Path(tmp, f"out-{mode}.safetensors")
                out.unlink(missing_ok=True)
                os.sync()  # the previous child's output is on disk: no writeback competes with this one
                result, peak = run(mode, base, vector, out)
                runs[mode].append((result["seconds"], result["again"], peak, peak - result["rss_after_imports"]))
        same = outputs_identical(Path(tmp, "out-in-memory.safetensors"), Path(tmp, "out-streaming.safetensors")) and \
            outputs_identical(Path(tmp, "out-in-memory.safetensors"), Path(tmp, "out-merge-stream.safetensors"))
        assert "torch" not in sys.modules, "the parent must stay lean (see module docstring)"
    lines = [f"base: {gb:.3f} GB ({made['description']}); vector of the same size; scaling_coef {COEF}; "
             f"one child process per run, {args.rounds} interleaved rounds, medians. Machine: {os.cpu_count()} CPU "
             f"cores, load average {load_before[0]:.1f} before / {os.getloadavg()[0]:.1f} after (other jobs share it); "
             "torch's default threads.", "",
             "| path | first [s] | GB/s | again [s] | GB/s | peak RSS [MiB] | over imports [MiB] |",
             "|---|---|---|---|---|---|---|"]
    for mode, values in runs.items():
        first, again, peak, over = (statistics.median(v[i] for v in values) for i in range(4))
        lines.append(f"| {mode} | {first:.2f} | {gb / first:.2f} | {again:.2f} | {gb / again:.2f} | {peak:.0f} "
                     f"| {over:.0f} |")
    lines += ["", f"outputs identical (keys, dtypes, shapes, bytes) across in-memory, streaming, merge-stream: "
                  f"{'yes' if same else 'NO'}"]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("# Task-vector apply: streaming vs in memory (as measured)\n\n"
                                  "`python scripts/bench_task_vector.py " + " ".join(sys.argv[1:]) + "`\n\n"
                                  + "\n".join(lines) + "\n")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
