"""What the unset fields of a training spec become: one definition for the service, which
records the completed spec on the run, and the worker, which completes a job's spec the
same way when a field reaches it unset.

Pure: values are the spec's fields by name (enums by their names), an absent or None
value meaning "unset".
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

from shared import catalog

# numpy seeds must fit in 32 bits: a drawn seed stays below this.
SEED_LIMIT = 2**31
# Left unset when unset: they depend on the run's length and on the device the worker
# finds, which the service does not know.
OPEN_FIELDS = ("warmup_iterations", "mixed_precision")


def random_seed() -> int:
    return random.randrange(SEED_LIMIT)


class UnknownArchitecture(ValueError):
    """The spec names no architecture of the catalog."""


def complete(
    requested: Mapping[str, Any],
    *,
    fine_tune: bool,
    new_seed: Callable[[], int] = random_seed,
) -> dict[str, Any]:
    """The training fields of a spec with each unset one filled in (docs/training.md):
    the catalog's defaults and the architecture's recipe for its starting point
    (`fine_tune`: from a base model's weights), and a new seed, recorded so that the
    split and the run can be reproduced (docs/datasets.md)."""

    def given(name: str) -> Any:
        return requested.get(name)

    def value(name: str, default: Any) -> Any:
        chosen = given(name)
        return default if chosen is None else chosen

    key = given("architecture") or ""
    try:
        arch = catalog.ARCHITECTURES[key]
    except KeyError:
        raise UnknownArchitecture(f"unknown architecture {key!r}") from None
    recipe = arch.recipe(fine_tune=fine_tune)
    optimizer = given("optimizer")
    optimizer = optimizer if optimizer in catalog.OPTIMIZERS else recipe.optimizer
    batch_size = value("batch_size", catalog.DEFAULT_BATCH_SIZE)
    device = value("device", "AUTO")
    completed = {
        "architecture": arch.key,
        "epochs": value("epochs", catalog.DEFAULT_EPOCHS),
        "batch_size": batch_size,
        "learning_rate": value(
            "learning_rate",
            catalog.default_learning_rate(
                arch, optimizer=optimizer, batch_size=batch_size, fine_tune=fine_tune
            ),
        ),
        "frozen_stages": value("frozen_stages", recipe.frozen_stages),
        "image_size": value("image_size", catalog.DEFAULT_IMAGE_SIZE),
        "val_fraction": value("val_fraction", catalog.DEFAULT_VAL_FRACTION),
        "test_fraction": value("test_fraction", catalog.DEFAULT_TEST_FRACTION),
        "seed": new_seed() if given("seed") is None else given("seed"),
        "device": "AUTO" if device == "DEVICE_UNSPECIFIED" else device,
        "gpu_count": value("gpu_count", 1),
        "optimizer": optimizer,
        "augment": value("augment", True),
        "val_interval": value("val_interval", catalog.DEFAULT_VAL_INTERVAL),
        "early_stopping_patience": value(
            "early_stopping_patience", catalog.DEFAULT_EARLY_STOPPING_PATIENCE
        ),
        # With the recorded seed, what a retry needs to train the same run again.
        "deterministic": bool(value("deterministic", False)),
    }
    for name in OPEN_FIELDS:
        if given(name) is not None:
            completed[name] = given(name)
    return completed
