"""How each catalog architecture maps onto MMDetection.

The catalog keys, learning rates and limits live in `shared.catalog` (the
services validate against them without the training stack); this module adds
what only the worker needs: the base config inside the mmdet wheel, the model
overrides that config needs, and where the class-dependent head weights live.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from shared.catalog import ARCHITECTURES, Architecture


class UnknownArchitecture(ValueError):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class MMDetArchitecture:
    catalog: Architecture
    # Relative to mmdet's packaged `configs/` folder.
    base_config: str
    # The ResNet output channels per stage, when the base config's neck expects others.
    neck_in_channels: tuple[int, ...] | None = None

    @property
    def key(self) -> str:
        return self.catalog.key

    @property
    def family(self) -> str:
        return self.catalog.family

    @property
    def depth(self) -> int:
        return self.catalog.depth

    def head_overrides(self, num_classes: int) -> str:
        """The `model=dict(...)` fragment that sizes the classification head(s)."""
        if self.family == "faster_rcnn":
            return f"roi_head=dict(bbox_head=dict(num_classes={num_classes}))"
        return f"bbox_head=dict(num_classes={num_classes})"

    @property
    def class_dependent_weights(self) -> tuple[str, ...]:
        """State-dict prefixes whose shape or meaning depends on the class list."""
        if self.family == "retinanet":
            return ("bbox_head.retina_cls.",)
        if self.family == "rtmdet":
            # One classifier per feature level: rtm_cls.0., rtm_cls.1., ...
            return ("bbox_head.rtm_cls.",)
        # Faster R-CNN regresses one box per class unless reg_class_agnostic.
        return ("roi_head.bbox_head.fc_cls.", "roi_head.bbox_head.fc_reg.")


_BASE_CONFIGS: dict[str, tuple[str, tuple[int, ...] | None]] = {
    "retinanet_r18_fpn": ("retinanet/retinanet_r18_fpn_1x_coco.py", None),
    "retinanet_r50_fpn": ("retinanet/retinanet_r50_fpn_1x_coco.py", None),
    "retinanet_r101_fpn": ("retinanet/retinanet_r101_fpn_1x_coco.py", None),
    # mmdet ships no ResNet-18 Faster R-CNN: derive it from the R-50 one.
    "faster_rcnn_r18_fpn": ("faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", (64, 128, 256, 512)),
    "faster_rcnn_r50_fpn": ("faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", None),
    "faster_rcnn_r101_fpn": ("faster_rcnn/faster-rcnn_r101_fpn_1x_coco.py", None),
    "rtmdet_tiny": ("rtmdet/rtmdet_tiny_8xb32-300e_coco.py", None),
}

MMDET_ARCHITECTURES: dict[str, MMDetArchitecture] = {
    key: MMDetArchitecture(catalog=ARCHITECTURES[key], base_config=base, neck_in_channels=neck)
    for key, (base, neck) in _BASE_CONFIGS.items()
}


def architecture(key: str) -> MMDetArchitecture:
    try:
        return MMDET_ARCHITECTURES[key]
    except KeyError:
        known = ", ".join(sorted(MMDET_ARCHITECTURES))
        raise UnknownArchitecture(f"unknown architecture {key!r}; known: {known}") from None


def mmdet_configs_root() -> Path:
    """The `configs/` folder packaged in the installed mmdet wheel, found without importing
    mmdet (which would import torch)."""
    spec = importlib.util.find_spec("mmdet")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "mmdet is not installed: install the worker extra (pip install .[worker])"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / ".mim" / "configs"
    if not root.is_dir():
        raise RuntimeError(f"mmdet is installed without its configs ({root} is missing)")
    return root
