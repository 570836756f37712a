"""Writes a tiny MMDetection model's files for import tests; run in a child process.

    python -m tests.checkpoints OUT_DIR

OUT_DIR gets config.py (RetinaNet R18, 2 classes, random init), checkpoint.pth (its
state dict in an mmengine-style checkpoint, message hub included), misfit.pth (a
state dict with a head that is not this config's) and truncated.pth.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(out: Path) -> None:
    import mmdet
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.logging import MessageHub

    register_all_modules(init_default_scope=True)
    configs = Path(mmdet.__file__).parent / ".mim" / "configs"
    cfg = Config.fromfile(configs / "retinanet" / "retinanet_r18_fpn_1x_coco.py")
    cfg.model.backbone.init_cfg = None
    cfg.model.bbox_head.num_classes = 2
    out.mkdir(parents=True, exist_ok=True)
    cfg.dump(out / "config.py")
    state = MODELS.build(cfg.model).state_dict()

    hub = MessageHub.get_instance("tests")
    hub.update_scalar("train/loss", 1.5)
    torch.save(
        {"meta": {"epoch": 1}, "state_dict": state, "message_hub": hub.state_dict()},
        out / "checkpoint.pth",
    )
    misfit = {k: v for k, v in state.items() if not k.startswith("bbox_head.")}
    misfit["classifier.weight"] = torch.zeros(2, 4)
    torch.save({"state_dict": misfit}, out / "misfit.pth")
    data = (out / "checkpoint.pth").read_bytes()
    (out / "truncated.pth").write_bytes(data[: len(data) // 2])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
