"""Imported configs are read as data: what is accepted, and what is refused with its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.model_config import ConfigRefused, mmdet_configs_root, read_config

DUMPED = """\
# A config as mmengine dumps it.
default_scope = 'mmdet'
classes = ('dump', 'tire')
metainfo = dict(classes=classes)
model = dict(
    type='RetinaNet',
    backbone=dict(type='ResNet', depth=18, init_cfg=None, out_indices=(0, 1, 2, 3)),
    bbox_head=dict(type='RetinaHead', num_classes=2, loss_cls={'type': 'FocalLoss'}),
    data_preprocessor=dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375]),
    test_cfg=dict(score_thr=0.05, nms=dict(type='nms', iou_threshold=-0.5)),
)
train_pipeline = [dict(type='mmdet.PackDetInputs'), dict(type='Resize', keep_ratio=True)]
load_from = None
resume = False
"""


def test_a_dumped_config_reads_as_data():
    checked = read_config(DUMPED.encode(), configs_root=None)
    assert checked.bases == ()
    assert checked.data["model"]["bbox_head"]["num_classes"] == 2
    assert checked.data["metainfo"] == {"classes": ("dump", "tire")}
    assert checked.data["model"]["test_cfg"]["nms"]["iou_threshold"] == -0.5
    assert checked.data["train_pipeline"][0] == {"type": "mmdet.PackDetInputs"}


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("model = dict(type='X')\nx = 1\nopen('/tmp/marker', 'w').write('x')\n", "line 3"),
        ("model = dict(type='X')\nx = 1\ny = open('/tmp/marker', 'w')\n", "line 3 calls open()"),
        ("import os\n", "line 1 has an import"),
        ("from os import environ\n", "line 1 has an import"),
        ("x = __import__('os').environ\n", "an attribute access"),
        ("x = __import__('os')\n", "calls __import__()"),
        ("x = os.environ\n", "attribute access (os.environ)"),
        ("x = environ['RAVEN_DATABASE_URL']\n", "a subscript"),
        ("x = dict(**{'a': 1})\n", "** arguments"),
        ("x = {**{'a': 1}}\n", "unpacks a dict"),
        ("x = [i for i in range(3)]\n", "a comprehension"),
        ("x = (lambda: 1)\n", "a lambda"),
        ("x = 2 * 3\n", "an operator"),
        ("x = f'{1}'\n", "an f-string"),
        ("x = y\n", "the name y, which is not assigned above"),
        ("def f():\n    pass\n", "a function definition"),
        ("x: int = 1\n", "an annotated assignment"),
        ("x = y = 1\n", "one plain name"),
        ("a, b = 1, 2\n", "one plain name"),
        ("x = b'bytes'\n", "a bytes literal"),
        ("custom_imports = dict(imports=['os'])\n", "sets custom_imports"),
        ("model = dict(type='subprocess.Popen', args=['touch', 'x'])\n", "has type="),
        ("model = dict(type=dict)\n", "is not assigned above"),
        ("x = (\n", "not valid Python syntax"),
        ("x = 1\x00\n", "NUL"),
        ("x = " + "[" * 100 + "]" * 100 + "\n", "deeper than"),
    ],
)
def test_anything_but_literal_assignments_is_refused(source, problem):
    with pytest.raises(ConfigRefused) as refused:
        read_config(source.encode(), configs_root=None)
    assert problem in str(refused.value)
    assert len(str(refused.value)) < 200


def test_bytes_that_are_not_utf8_or_too_large_are_refused():
    with pytest.raises(ConfigRefused, match="UTF-8"):
        read_config(b"x = '\xff'\n", configs_root=None)
    with pytest.raises(ConfigRefused, match="larger than"):
        read_config(b"x = 1\n" * 300_000, configs_root=None)


def test_base_names_only_configs_inside_the_configs_root(tmp_path: Path):
    root = tmp_path / "configs"
    (root / "retinanet").mkdir(parents=True)
    shipped = root / "retinanet" / "r18.py"
    shipped.write_text("model = dict(type='RetinaNet')\n")
    outside = tmp_path / "evil.py"
    outside.write_text("import os\n")

    for name in ("mmdet::retinanet/r18.py", "retinanet/r18.py", str(shipped)):
        checked = read_config(f"_base_ = [{name!r}]\nx = 1\n", configs_root=root)
        assert checked.bases == (shipped.resolve(),) and checked.data == {"x": 1}
    for name in (str(outside), "../evil.py", "retinanet/missing.py", "mmdet::../evil.py"):
        with pytest.raises(ConfigRefused, match="not a config shipped with mmdet"):
            read_config(f"_base_ = {name!r}\n", configs_root=root)
    with pytest.raises(ConfigRefused, match="a config name or a list"):
        read_config("_base_ = 3\n", configs_root=root)
    with pytest.raises(ConfigRefused, match="cannot be resolved"):
        read_config("_base_ = 'retinanet/r18.py'\n", configs_root=None)


@pytest.mark.parametrize("fine_tune", [False, True])
def test_the_configs_the_worker_generates_read_as_data(fine_tune: bool):
    from tests.configs import dataset_files
    from trainer_worker.architectures import MMDET_ARCHITECTURES
    from trainer_worker.config import BaseCheckpoint, TrainingPlan, generate_config

    root = mmdet_configs_root()
    assert root is not None, "mmdet (the worker extra) is installed for the tests"
    for key in MMDET_ARCHITECTURES:
        plan = TrainingPlan(
            architecture=key,
            epochs=12,
            batch_size=4,
            learning_rate=0.01,
            frozen_stages=1,
            image_size=320,
            seed=7,
            early_stopping_patience=3 if fine_tune else 0,
        )
        dataset = dataset_files(
            Path("/data"), ("dump", "tire"), train_image_count=10, test=fine_tune
        )
        base = BaseCheckpoint(path=Path("/base.pth"), architecture=key, classes=("dump",))
        generated = generate_config(
            plan=plan,
            dataset=dataset,
            work_dir=Path("/work"),
            configs_root=root,
            base=base if fine_tune else None,
        )
        checked = read_config(generated.text, configs_root=root)
        assert len(checked.bases) == 1 and checked.bases[0].is_relative_to(root.resolve())
        assert checked.data["model"]["bbox_head" if "rcnn" not in key else "roi_head"]


def test_the_verification_child_inherits_no_secrets(monkeypatch, tmp_path: Path):
    from services.trained_models.artifacts import _child_env

    for name in (
        "RAVEN_DATABASE_URL",
        "RAVEN_TLS_KEY_FILE",
        "AWS_SECRET_ACCESS_KEY",
        "HTTPS_PROXY",
    ):
        monkeypatch.setenv(name, "secret")
    env = _child_env(tmp_path)
    assert not any("secret" in value for value in env.values())
    assert set(env) <= {
        *("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "HOME", "TMPDIR", "PYTHONPATH"),
        *("PYTHONNOUSERSITE", "PYTHONDONTWRITEBYTECODE", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS"),
    }
    assert env["HOME"] == env["TMPDIR"] == str(tmp_path)


def test_the_verification_child_can_leave_the_network(tmp_path: Path):
    import socket
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces are Linux only")
    # A listener this process can reach; the child, once out of the network, cannot.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        probe = (
            "import socket, sys\n"
            "from trainer_worker.verify import without_network\n"
            "isolated = without_network()\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
            "    reached = True\n"
            "except OSError:\n"
            "    reached = False\n"
            "print(isolated, reached)\n"
        )
        root = Path(__file__).resolve().parents[2]
        found = subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=root,
            check=True,
        ).stdout.split()
    if found[0] == "False":
        pytest.skip("this kernel does not allow unprivileged network namespaces")
    assert found == ["True", "False"]
