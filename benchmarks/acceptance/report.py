"""The report of a run: where the figures come from (GPU, driver, CUDA, versions, commit), its JSON and its
Markdown summary."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from acceptance.plan import GIB, REPO, STARTUP_BUDGET_S
from acceptance.runner import StepResult


def environment(dry_run: bool) -> dict[str, Any]:
    """Where the figures come from: GPU, driver, CUDA, torch and library versions, the commit."""
    import diffusers
    import torch
    import transformers
    from bench_common import cpu_model  # benchmarks/ is on sys.path

    env: dict[str, Any] = {
        "mode": "dry-run (CPU, tiny weights)" if dry_run else "GPU",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical cores)",
        "commit": _git("rev-parse", "--short", "HEAD")
        + (" (with local changes)" if _git("status", "--porcelain") else ""),
    }
    if not dry_run:
        props = torch.cuda.get_device_properties(0)
        env |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / GIB, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "driver": nvidia_driver() or "unknown",
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    return env


def nvidia_driver() -> str | None:
    """The display driver version from ``nvidia-smi`` (torch only knows the CUDA driver API version)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def report_label(env: dict[str, Any]) -> str:
    """File name of the report: GPU, driver, CUDA and torch versions (or the dry run's CPU and torch)."""
    if "gpu" in env:
        text = f"{env['gpu']}-driver-{env['driver']}-cuda-{env['cuda']}-torch-{env['torch']}"
    else:
        text = f"dry-run-cpu-torch-{env['torch']}"
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20, check=False)
    except OSError:
        return ""
    return done.stdout.strip()


def build_report(env: dict, results: list[StepResult], started: float, finished: bool) -> dict:
    total = time.perf_counter() - started
    budget = STARTUP_BUDGET_S + sum(r.budget_s for r in results)  # of the steps run (all: 480 s on a GPU)
    return {
        "label": report_label(env),
        "environment": env,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "finished": finished,
        "ok": finished and all(r.status == "passed" for r in results),
        "total_s": round(total, 1),
        "total_budget_s": budget,
        "over_budget": total > budget,
        "steps": [
            dataclasses.asdict(r) | {"over_budget": r.over_budget, "seconds": round(r.seconds, 1)} for r in results
        ],
    }


def markdown(report: dict) -> str:
    """The human summary of a report."""
    env = report["environment"]
    state = "passed" if report["ok"] else ("FAILED" if report["finished"] else "UNFINISHED")
    over = " — OVER budget" if report["over_budget"] else ""
    lines = [
        f"# GPU acceptance: {report['label']}",
        "",
        f"**{state}** in {report['total_s']:.1f} s (budget {report['total_budget_s']:.0f} s{over}), "
        f"{report['date_utc']} UTC, `python benchmarks/gpu_acceptance.py"
        f"{' --dry-run' if 'gpu' not in env else ''}`",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in env.items()],
        "",
        "| step | status | seconds | budget |",
        "|---|---|---:|---:|",
    ]
    for step in report["steps"]:
        flag = " (over budget)" if step["over_budget"] else ""
        lines.append(f"| {step['name']} | {step['status']}{flag} | {step['seconds']:.1f} | {step['budget_s']:.0f} |")
    for step in report["steps"]:
        lines += ["", f"## {step['name']}: {step['title']}", ""]
        if step["error"]:
            lines += [f"**Error:** `{step['error'][:600]}`", ""]
        lines += [
            f"- {c['result'].upper()}: {c['name']}" + (f" — {c['detail']}" if c["detail"] else "")
            for c in step["checks"]
        ]
        lines += _figures_markdown(step["figures"])
        lines += [f"- note: {n}" for n in step["notes"]]
    return "\n".join(lines) + "\n"


def _figures_markdown(figures: dict[str, Any]) -> list[str]:
    lines, tables = [], []
    for key, value in figures.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            tables += ["", f"{key}:", "", "| " + " | ".join(value[0]) + " |", "|" + "---|" * len(value[0])]
            tables += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in value]
        elif isinstance(value, dict):
            lines.append(f"- {key}: " + ", ".join(f"{k} {v}" for k, v in value.items()))
        else:
            lines.append(f"- {key}: {value}")
    return lines + tables


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{report['label']}.json", out / f"{report['label']}.md"
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(markdown(report), encoding="utf-8")
    return json_path, md_path
