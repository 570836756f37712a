"""Figure 5: dataset preparation (validate, fingerprint, split, write) of a synthetic
COCO file, against `json.load` of the same file, each in a process of its own."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

from benchmarks.plan import Plan
from benchmarks.stack import ROOT
from benchmarks.stats import Results


async def _child(*args: str) -> dict[str, float]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.dataset_child",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"dataset_child {args[0]} failed:\n{err.decode()[-3000:]}")
    result: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def measure_dataset(plan: Plan, results: Results, cache: Path) -> None:
    images, per_image = plan.dataset_images, plan.boxes_per_image
    folder = cache / f"coco-{images}x{per_image}-images"
    # Kept between runs: linking 100,000 image files takes a while.
    if not (folder / "complete").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        await _child("generate", str(folder), str(images), str(per_image))
    annotations = folder / "annotations.json"
    size_mib = annotations.stat().st_size / 2**20
    results.notes["dataset"] = (
        f"{images:,} images, {images * per_image:,} boxes, {size_mib:.0f} MiB of JSON; "
        "real 640x480 PNG and JPEG files (hard links to two), each opened and its header "
        "and end read (no pixel is decoded)"
    )
    for _ in range(plan.dataset_rounds):
        base = await _child("json", str(annotations))
        out_dir = folder.parent / f"{folder.name}-prepared"
        try:
            prepared = await _child("prepare", str(annotations), str(out_dir))
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        results.add(
            "dataset.images",
            float(prepared["images"]),
            unit="images",
            description="images in the synthetic COCO file",
        )
        results.add(
            "dataset.json_load.seconds",
            base["elapsed_s"],
            unit="s",
            description="json.load of the file (baseline)",
        )
        results.add(
            "dataset.json_load.peak_rss",
            base["peak_rss_mib"],
            unit="MiB",
            description="peak RSS of the json.load process (baseline)",
        )
        results.add(
            "dataset.prepare.seconds",
            prepared["elapsed_s"],
            unit="s",
            description="prepare_dataset: read, validate, fingerprint, split, write",
            baseline="dataset.json_load.seconds",
        )
        results.add(
            "dataset.prepare.images_per_s",
            prepared["images"] / prepared["elapsed_s"],
            unit="images/s",
            description="prepare_dataset throughput",
            lower_is_better=False,
        )
        results.add(
            "dataset.prepare.peak_rss",
            prepared["peak_rss_mib"],
            unit="MiB",
            description="peak RSS of the prepare_dataset process",
            baseline="dataset.json_load.peak_rss",
        )
