"""The GPU check: the GPU tests and the timings users' GPU jobs depend on, in one call.

    python benchmarks/gpu_check.py --output DIR            # on a CUDA machine: at most about 6 minutes
    python benchmarks/gpu_check.py --output DIR --dry-run  # the same logic on the CPU, tiny sizes

It needs torch, Lightning, torchmetrics and torchvision (what a GPU image has) plus jsonargparse and
wandb, and the project on ``PYTHONPATH`` (``PYTHONPATH=. python benchmarks/gpu_check.py ...`` from a
checkout). It writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` (a table), and prints the table.

1. ``pytest -m gpu tests/test_gpu.py``: the quickstart zoo trains on the device with both executors
   for four methods, stacked batched rounds agree with sequential ones, ``bf16-mixed`` runs, a
   checkpoint written on the device resumes on the CPU, two ranks equal one process (with 2 GPUs),
   and pFedMoE trains on table rows and on texts (both executors).
2. Timings side by side in one run (synthetic 28x28 images, the quickstart's zoo and method): the
   plain PyTorch loop, the sequential executor, the batched one in fp32 and in bf16, at the
   quickstart's size, 100 clients with C = 0.1 and C = 1.0, and 500 clients of 500 images with
   C = 0.2; rounds/s, client-epochs/s, GPU utilisation and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
from round_overhead import measure  # noqa: E402

from fedmoe_pl.fleets.executor import quiet_lightning  # noqa: E402

CONFIG = str(ROOT / "configs" / "quickstart.yaml")


def _synthetic(train_per_class: int, image_size: int = 28) -> list[str]:
    return [
        "--data.source",
        "fedmoe_pl.data.Synthetic",
        "--data.source.init_args.num_classes",
        "10",
        "--data.source.init_args.train_per_class",
        str(train_per_class),
        "--data.source.init_args.image_size",
        str(image_size),
    ]


def settings(dry_run: bool) -> dict[str, list[str]]:
    """Each setting's fit arguments on top of the quickstart config (pathological, 2 classes a client)."""
    if dry_run:
        tiny = _synthetic(8, image_size=16)
        return {
            "quickstart": [*tiny, "--data.num_clients", "5"],
            "n100_c0.1": [*tiny, "--data.num_clients", "10", "--federation.participation", "0.2"],
            "n100_c1.0": [*tiny, "--data.num_clients", "6"],
            "n500_c0.2": [*tiny, "--data.num_clients", "10", "--federation.participation", "0.2"],
        }
    return {
        "quickstart": [*_synthetic(6000), "--data.num_clients", "10"],  # 6,000 images a client
        "n100_c0.1": [*_synthetic(6000), "--data.num_clients", "100", "--federation.participation", "0.1"],
        "n100_c1.0": [*_synthetic(6000), "--data.num_clients", "100"],
        "n500_c0.2": [*_synthetic(25000), "--data.num_clients", "500", "--federation.participation", "0.2"],
    }


def gpu_tests(output: Path, dry_run: bool) -> dict[str, Any]:
    """Run the GPU tests in a child process; their counts and failures from its JUnit report."""
    report = output / "gpu_tests.xml"
    env = dict(os.environ, WANDB_MODE="disabled", WANDB_SILENT="true")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if dry_run:
        env["FEDMOE_GPU_TEST_DEVICE"] = "cpu"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")]
    start = time.perf_counter()
    done = subprocess.run([*command, f"--junitxml={report}"], env=env, capture_output=True, text=True, cwd=ROOT)
    counts: dict[str, Any] = {"exit_code": done.returncode, "seconds": round(time.perf_counter() - start, 1)}
    if report.exists():
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")  # type: ignore[assignment]
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] = int(suite.get(key, 0))
        counts["failed"] = []
        for case in suite.iter("testcase"):
            problem = case.find("failure")
            problem = case.find("error") if problem is None else problem
            if problem is not None:
                counts["failed"].append(f"{case.get('name')}: {problem.get('message', '')[:300]}")
    else:
        counts["output_tail"] = (done.stdout + done.stderr)[-3000:]
    return counts


def timings(dry_run: bool, device: torch.device) -> dict[str, Any]:
    repeats = 1
    out: dict[str, Any] = {}
    for name, args in settings(dry_run).items():
        start = time.perf_counter()
        executors = ["sequential", "batched"]
        if name == "n100_c1.0":  # does stacking pFedMoE's common parts across architectures pay?
            executors.append("batched_per_architecture")
        fp32 = measure(CONFIG, args, executors, device, repeats)
        bf16 = measure(CONFIG, [*args, "--trainer.precision", "bf16-mixed"], ["batched"], device, repeats)
        sides = {**fp32["sides"], "batched_bf16": bf16["sides"]["batched"]}
        out[name] = {
            **{k: fp32[k] for k in ("clients", "per_round", "steps")},
            "sides": sides,
            "batched_over_plain_speedup": sides["plain"]["seconds"] / sides["batched"]["seconds"],
            "sequential_over_plain": sides["sequential"]["seconds"] / sides["plain"]["seconds"],
            "bf16_over_fp32_speedup": sides["batched"]["seconds"] / sides["batched_bf16"]["seconds"],
            **(
                {
                    "across_over_per_architecture_speedup": sides["batched_per_architecture"]["seconds"]
                    / sides["batched"]["seconds"]
                }
                if "batched_per_architecture" in sides
                else {}
            ),
            "seconds_spent": round(time.perf_counter() - start, 1),
        }
        print(f"{name}: done in {out[name]['seconds_spent']} s", file=sys.stderr, flush=True)
    return out


def table(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"GPU check on {env['device']} (torch {env['torch']}, CUDA {env['cuda']})"
        + (" - dry run on the CPU" if env["dry_run"] else ""),
        "",
        f"GPU tests: {result['tests'].get('tests', '?')} run, {result['tests'].get('failures', '?')} failed, "
        f"{result['tests'].get('errors', '?')} errors, {result['tests'].get('skipped', '?')} skipped",
        "",
        "| setting | side | round (s) | rounds/s | client-epochs/s | GPU busy % | peak GPU MiB | time / plain | acc |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, setting in result["timings"].items():
        for side, m in setting["sides"].items():
            busy = "" if m["gpu_util_percent"] is None else f"{m['gpu_util_percent']:.0f}"
            peak = "" if m["peak_gpu_bytes"] is None else f"{m['peak_gpu_bytes'] / 2**20:.0f}"
            lines.append(
                f"| {name} ({setting['clients']} clients, {setting['per_round']} a round) | {side} | "
                f"{m['seconds']:.3f} | {m['rounds_per_s']:.2f} | {m['client_epochs_per_s']:.1f} | {busy} | {peak} | "
                f"{m['time_over_plain']:.3f} | {m['mean_acc']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="the whole logic on the CPU with tiny sizes")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run on a CPU", file=sys.stderr)
        return 2
    quiet_lightning()
    device = torch.device("cpu" if args.dry_run else "cuda")
    start = time.perf_counter()
    result: dict[str, Any] = {
        "environment": {
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "dry_run": args.dry_run,
        }
    }
    result["tests"] = gpu_tests(output, args.dry_run)
    print(f"GPU tests: {result['tests']}", file=sys.stderr, flush=True)
    result["timings"] = timings(args.dry_run, device)
    result["seconds"] = round(time.perf_counter() - start, 1)
    (output / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    (output / "gpu_check.md").write_text(text)
    print(text)
    failed = result["tests"].get("failures", 1) + result["tests"].get("errors", 0)
    return 0 if result["tests"]["exit_code"] in (0, 5) and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
