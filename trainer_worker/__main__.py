from __future__ import annotations

from trainer_worker.main import run

run()
