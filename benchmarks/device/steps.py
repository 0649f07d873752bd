"""One step of the GPU session (benchmarks/device/gpu_session.sh), recorded as JSON.

    python -m benchmarks.device.steps STEP --out DIR [--smoke]

Appends one line to ``DIR/results.jsonl``: the step, whether it finished, its seconds and
its measured data (what :mod:`benchmarks.device.splice` turns into BENCHMARKS.md). Steps, in
the session's order: env, overhead, fastpath, packing, cache, amp, heads_cuda, memory,
compile, trainables_tests.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ROOT, load_average, machine, stop_ray

STEPS = ("env", "overhead", "fastpath", "packing", "cache", "amp", "heads_cuda", "memory",
         "compile", "trainables_tests")


def _env(smoke: bool) -> dict[str, Any]:
    info = machine()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(cuda=str(torch.version.cuda), cudnn=str(torch.backends.cudnn.version()),
                    sms=str(props.multi_processor_count),
                    gpu_memory_gib=f"{props.total_memory / 2**30:.0f}")
    with _suppress():
        import torchvision

        info["torchvision"] = torchvision.__version__
    with _suppress():
        import xgboost

        info["xgboost"] = xgboost.__version__
    with _suppress():
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                              "clocks.sm,clocks.max.sm,power.limit,temperature.gpu",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30)
        info["nvidia_smi"] = smi.stdout.strip()
    return info


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def _pytest(args: list[str], timeout: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = next((line for line in reversed(lines) if " in " in line and (
        "passed" in line or "failed" in line or "error" in line)), lines[-1] if lines else "")
    print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n")
    return {"args": args, "returncode": proc.returncode, "summary": summary.strip("= "),
            "skipped": [line for line in lines if line.startswith("SKIPPED")]}


def run_step(step: str, *, smoke: bool, backbone: str | None = None) -> dict[str, Any]:
    """The measured data of ``step``."""
    if step == "env":
        return _env(smoke)
    if step == "overhead":
        from benchmarks import trial_overhead

        gpu, trial = trial_overhead.measure_gpu(smoke=smoke)
        return {"result": gpu, "trial": trial}
    if step in ("fastpath", "compile"):
        from benchmarks import gpu_fast_path

        compiled = step == "compile"
        return {"rows": gpu_fast_path.measure_ratios(
            smoke=smoke, compile_variants=(True,) if compiled else (False,),
            variants=not compiled,
            backbones=(backbone,) if backbone else gpu_fast_path.BACKBONES)}
    if step == "packing":
        from benchmarks import gpu_fast_path

        return gpu_fast_path.measure_packing(smoke=smoke)
    if step == "cache":
        from benchmarks import frozen_cache

        full, half = frozen_cache.measure_gpu(smoke=smoke)
        return {"full": full, "half": half}
    if step == "amp":
        from benchmarks.device import gpu_checks

        return gpu_checks.amp_vs_fp32(smoke=smoke)
    if step == "memory":
        from benchmarks.device import gpu_checks

        return gpu_checks.reused_actor_gpu_memory(smoke=smoke)
    if step == "heads_cuda":
        # The suite's CUDA-only tests (skipped on CPU CI), with the rest of their file.
        return _pytest(["tests/trainables/test_heads.py", "-rs"], timeout=300)
    if step == "trainables_tests":
        import importlib.util

        workers = ["-n", "8"] if importlib.util.find_spec("xdist") else []  # pytest-xdist
        return _pytest(["tests/trainables", "-rs", *workers], timeout=600)
    raise ValueError(f"unknown step {step!r}; choose from {STEPS}")


def _terminated(signum: int, frame: object) -> None:
    raise TimeoutError(f"stopped by signal {signum} (the step's time limit)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="toy sizes (runs on a CPU)")
    parser.add_argument("--backbone", help="fastpath / compile: this backbone only")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _terminated)  # `timeout` ends a step: still record it
    t0 = time.perf_counter()
    record: dict[str, Any] = {"step": args.step, "smoke": args.smoke, "backbone": args.backbone,
                              "started": datetime.now().astimezone().isoformat(
                                  timespec="seconds"), "load_before": load_average()}
    try:
        record["data"] = run_step(args.step, smoke=args.smoke, backbone=args.backbone)
        record["ok"] = True
    except BaseException as err:  # noqa: BLE001 - recorded; the session goes on
        record["ok"] = False
        record["error"] = traceback.format_exc()[-4000:]
        print(record["error"], file=sys.stderr)
        if isinstance(err, KeyboardInterrupt):
            raise
    finally:
        stop_ray()
        record["seconds"] = time.perf_counter() - t0
        record["load_after"] = load_average()
        with open(args.out / "results.jsonl", "a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
    print(f"step {args.step}: {'ok' if record['ok'] else 'FAILED'} in "
          f"{record['seconds']:.1f} s")
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
