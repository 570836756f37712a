"""`python -m benchmarks.bare_train CONFIG.py WORK_DIR`: the baseline of figure 4.

Trains a generated config with a bare mmengine Runner, nothing of the system around
it, and prints one JSON line of timings (seconds since the process started).
"""

from __future__ import annotations

import json
import sys
import time

_STARTED = time.perf_counter()


def main(config: str, work_dir: str) -> None:
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    from shared.metrics import MAP_50

    register_all_modules(init_default_scope=True)
    imported = time.perf_counter()
    cfg = Config.fromfile(config)
    cfg.work_dir = work_dir
    runner = Runner.from_cfg(cfg)
    built = time.perf_counter()
    marks: dict[str, float] = {}
    validations: list[dict[str, float]] = []

    class FirstIteration(Hook):  # type: ignore[misc]
        def after_train_iter(
            self, runner: object, batch_idx: int, data_batch: object = None, outputs: object = None
        ) -> None:
            marks.setdefault("first_iter", time.perf_counter())

        def after_val_epoch(self, runner: object, metrics: dict[str, float] | None = None) -> None:
            validations.append(
                {
                    "s": time.perf_counter() - built,
                    "map_50": float((metrics or {}).get(MAP_50, 0.0)),
                }
            )

    runner.register_hook(FirstIteration(), priority="LOWEST")
    runner.train()
    done = time.perf_counter()
    print(
        json.dumps(
            {
                "import_s": imported - _STARTED,
                "build_s": built - imported,
                "first_iter_s": marks.get("first_iter", done) - _STARTED,
                "train_s": done - built,
                "total_s": done - _STARTED,
                # Seconds since the runner was built, and val mAP_50, after each validation.
                "validations": validations,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
