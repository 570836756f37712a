"""The inference child of an evaluation job: `python -m trainer_worker.evaluate_process CONFIG`.

One process per evaluation, as for training (trainer_worker.train_process), so that torch
and mmdet load only here and a crash or an OOM kill ends the job and not the worker. It
builds the model of the config (trainer_worker.evaluation_config), loads the checkpoint's
weights with `weights_only=True` (an imported model's checkpoint is untrusted: only the
objects trainer_worker.verify allows unpickle), runs it over the test loader's images and
writes their predictions, in original image coordinates, to `raven.predictions` as JSON:
`[{"image_id", "labels", "bboxes" [[x1, y1, x2, y2]], "scores"}]`.

Events go to the FIFO in `RAVEN_EVENT_PATH`: TrainingStarted (one "epoch" of one iteration
per batch), ProgressReported after each batch, ModelRefused when the checkpoint does not
fit the model (exit status 5). SIGTERM or SIGUSR1 stops it before the next batch (exit
status 3).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from trainer_worker.protocol import EXIT_CANCELLED, EXIT_REFUSED, ModelRefused

# Progress is sent at most this often, and after the last batch.
_PROGRESS_INTERVAL_S = 0.5


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write(f"usage: {argv[0]} CONFIG.py\n")
        return 2
    from trainer_worker.train_process import _die_with_parent

    _die_with_parent()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, lambda *_: stop.set())

    # Imported after the usage check: they take seconds (torch).
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.runner import Runner

    from trainer_worker.distributed import open_event_channel
    from trainer_worker.hooks import EventWriter
    from trainer_worker.verify import load_state_dict

    writer = EventWriter(open_event_channel())
    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(argv[1])
    raven = cfg.get("raven", {})
    model = MODELS.build(cfg.model)
    try:
        state = load_state_dict(raven["checkpoint"])
    except Exception as error:
        return _refuse(writer, f"the checkpoint cannot be loaded: {_last_line(error)}")
    problems = _fit(model, state)
    if problems:
        return _refuse(writer, "the checkpoint does not fit the model: " + problems)
    model.load_state_dict(state, strict=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    model.eval()
    loader = Runner.build_dataloader(cfg.test_dataloader)
    batches = len(loader)

    from trainer_worker.progress_hook import _describe
    from trainer_worker.protocol import ProgressReported, TrainingStarted

    writer.send(
        TrainingStarted(
            max_epochs=1,
            max_iters=batches,
            device=_describe(device),
            parameter_count=sum(p.numel() for p in model.parameters()),
        )
    )
    predictions: list[dict[str, Any]] = []
    started = last_sent = time.monotonic()
    with torch.no_grad():
        for index, batch in enumerate(loader):
            if stop.is_set():
                return EXIT_CANCELLED
            for sample in model.test_step(batch):
                predictions.append(_prediction(sample))
            now = time.monotonic()
            done = index + 1
            if now - last_sent >= _PROGRESS_INTERVAL_S or done == batches:
                last_sent = now
                elapsed = now - started
                writer.send(
                    ProgressReported(
                        epoch=1,
                        max_epochs=1,
                        iter=done,
                        max_iters=batches,
                        loss=None,
                        eta_s=elapsed / done * (batches - done),
                    )
                )
    if stop.is_set():
        return EXIT_CANCELLED
    target = Path(raven["predictions"])
    partial = target.with_name(f"{target.name}.{os.getpid()}")
    partial.write_text(json.dumps(predictions))
    os.replace(partial, target)
    return 0


def _prediction(sample: Any) -> dict[str, Any]:
    instances = sample.pred_instances
    return {
        "image_id": int(sample.metainfo["img_id"]),
        "labels": [int(v) for v in instances.labels.tolist()],
        "bboxes": [[float(v) for v in box] for box in instances.bboxes.tolist()],
        "scores": [float(v) for v in instances.scores.tolist()],
    }


def _fit(model: Any, state: Any) -> str:
    """What keeps the checkpoint's weights from loading into the model; empty when they fit."""
    from trainer_worker.verify import weight_problems

    return weight_problems(model, state)


def _refuse(writer: Any, message: str) -> int:
    writer.send(ModelRefused(message=message))
    return EXIT_REFUSED


def _last_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


if __name__ == "__main__":
    sys.exit(main(sys.argv))
