"""Figure 4: one tiny CPU training run through the whole system (CreateTrainingRun ->
SUCCEEDED seen by a watcher, with a real `python -m trainer_worker`) against the same
generated config trained by a bare mmengine Runner in a plain process."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import sys
import time
from typing import Any

from benchmarks.plan import Plan
from benchmarks.stack import ROOT, Stack
from benchmarks.stats import Results
from shared.metrics import MAP_50
from shared.proto.raven.training.v1 import training_run_pb2 as pb
from shared.proto.raven.training.v1 import training_run_pb2_grpc

_TIMEOUT_S = 600.0
DATASET = "datasets/tiny/annotations.json"


def create_request(display_name: str, **spec: Any) -> pb.CreateTrainingRunRequest:
    return pb.CreateTrainingRunRequest(
        training_run=pb.TrainingRun(display_name=display_name, spec=pb.TrainingSpec(**spec))
    )


def tiny_request(seed: int) -> pb.CreateTrainingRunRequest:
    return create_request(
        "bench tiny run",
        dataset_uri=DATASET,
        architecture="retinanet_r18_fpn",
        epochs=2,
        batch_size=4,
        image_size=128,
        seed=seed,
        device=pb.TrainingSpec.CPU,
    )


async def measure_training(stack: Stack, plan: Plan, results: Results) -> None:
    from trainer_worker.synthetic import make_dataset

    await asyncio.to_thread(
        make_dataset, (stack.artifact_root / DATASET).parent, images=16, size=128
    )
    # Jobs queued by the other figures name datasets that exist only for the service's checks.
    await stack.nc.jetstream().purge_stream(stack.subjects.jobs_stream)
    await stack.start_worker()
    async with stack.runs_channel() as channel:
        runs = training_run_pb2_grpc.TrainingRunServiceStub(channel)
        for round_ in range(plan.training_rounds):
            run, wall, first_progress = await _through_the_system(runs, round_)
            config = stack.artifact_root / "runs" / run.split("/")[1] / "attempt-1" / "config.py"
            bare_dir = stack.work_dir / f"bare-{round_}"
            try:
                bare = await _bare(config, bare_dir)
            finally:
                await asyncio.to_thread(shutil.rmtree, bare_dir, True)
            results.add(
                "training.bare_wall_s",
                bare["wall_s"],
                unit="s",
                description="bare mmengine Runner, same config, plain process (baseline)",
            )
            results.add(
                "training.bare_first_iter_s",
                bare["first_iter_s"],
                unit="s",
                description="bare Runner: process start -> end of the first iteration "
                "(imports + model build + one iteration)",
            )
            results.add(
                "training.bare_build_s",
                bare["import_s"] + bare["build_s"],
                unit="s",
                description="bare Runner: imports + Runner.from_cfg (model build)",
            )
            results.add(
                "training.system_wall_s",
                wall,
                unit="s",
                description="CreateTrainingRun -> SUCCEEDED seen by a watcher",
                baseline="training.bare_wall_s",
            )
            results.add(
                "training.first_progress_s",
                first_progress,
                unit="s",
                description="CreateTrainingRun -> first progress event seen by a watcher",
                baseline="training.bare_first_iter_s",
            )
    await measure_learning(stack, results)


# Figure 5: how fast the default recipe learns. The seconds of training until val mAP_50
# first reaches LEARNING_BAR, through the system and by a bare Runner on the same config.
LEARNING_DATASET = "datasets/learning/annotations.json"
LEARNING_BAR = 0.5
LEARNING_EPOCHS = 8


def learning_request() -> pb.CreateTrainingRunRequest:
    """The defaults: only the dataset, the architecture, the epochs and the image size."""
    return create_request(
        "bench learning run",
        dataset_uri=LEARNING_DATASET,
        architecture="rtmdet_tiny",
        epochs=LEARNING_EPOCHS,
        image_size=128,
    )


async def measure_learning(stack: Stack, results: Results) -> None:
    from trainer_worker.synthetic import make_dataset

    await asyncio.to_thread(
        make_dataset, (stack.artifact_root / LEARNING_DATASET).parent, images=120, seed=11
    )
    async with stack.runs_channel() as channel:
        runs = training_run_pb2_grpc.TrainingRunServiceStub(channel)
        run = await runs.CreateTrainingRun(learning_request())
        started = math.nan
        reached = math.nan
        state = pb.TrainingRun.STATE_UNSPECIFIED
        async with asyncio.timeout(_TIMEOUT_S):
            async for event in runs.WatchTrainingRun(pb.WatchTrainingRunRequest(name=run.name)):
                kind = event.WhichOneof("payload")
                if kind == "progress" and math.isnan(started):
                    started = time.perf_counter()
                elif kind == "evaluation" and math.isnan(reached):
                    if event.evaluation.metrics.get(MAP_50, 0.0) >= LEARNING_BAR:
                        reached = time.perf_counter() - started
                elif kind == "state_changed":
                    state = event.state_changed.to_state
    if state != pb.TrainingRun.SUCCEEDED:
        raise RuntimeError(f"{run.name} ended {pb.TrainingRun.State.Name(state)}, not SUCCEEDED")
    config = stack.artifact_root / "runs" / run.name.split("/")[1] / "attempt-1" / "config.py"
    bare_dir = stack.work_dir / "bare-learning"
    try:
        bare = await _bare(config, bare_dir)
    finally:
        await asyncio.to_thread(shutil.rmtree, bare_dir, True)
    bare_reached = next(
        (v["s"] for v in bare["validations"] if v["map_50"] >= LEARNING_BAR), math.nan
    )
    results.add(
        "learning.bare_s_to_map50",
        bare_reached,
        unit="s",
        description=f"bare mmengine Runner, same config: training seconds to val mAP_50 "
        f">= {LEARNING_BAR} (nan: not within {LEARNING_EPOCHS} epochs)",
    )
    results.add(
        "learning.system_s_to_map50",
        reached,
        unit="s",
        description=f"rtmdet_tiny with the defaults, 96 train images of 128 px: seconds from "
        f"the first progress event to a val mAP_50 >= {LEARNING_BAR} seen by a watcher",
        baseline="learning.bare_s_to_map50",
    )


async def _through_the_system(
    runs: training_run_pb2_grpc.TrainingRunServiceStub, seed: int
) -> tuple[str, float, float]:
    began = time.perf_counter()
    run = await runs.CreateTrainingRun(tiny_request(seed))
    first_progress = float("nan")
    state = pb.TrainingRun.STATE_UNSPECIFIED
    async with asyncio.timeout(_TIMEOUT_S):
        async for event in runs.WatchTrainingRun(pb.WatchTrainingRunRequest(name=run.name)):
            kind = event.WhichOneof("payload")
            if kind == "progress" and first_progress != first_progress:
                first_progress = time.perf_counter() - began
            elif kind == "state_changed":
                state = event.state_changed.to_state
    wall = time.perf_counter() - began
    if state != pb.TrainingRun.SUCCEEDED:
        raise RuntimeError(f"{run.name} ended {pb.TrainingRun.State.Name(state)}, not SUCCEEDED")
    return run.name, wall, first_progress


async def _bare(config: object, work_dir: object) -> dict[str, Any]:
    began = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.bare_train",
        str(config),
        str(work_dir),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    out, _ = await asyncio.wait_for(process.communicate(), _TIMEOUT_S)
    wall = time.perf_counter() - began
    if process.returncode != 0:
        raise RuntimeError(f"bare training exited {process.returncode}")
    timings = json.loads(out.decode().strip().splitlines()[-1])
    return {**timings, "wall_s": wall}
