"""The `raven` CLI against the real services, as a user or a script runs it: output formats
a script can parse, the commands beyond create/get/list, and nothing cut when piped."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from shared.proto.raven.training.v1 import training_run_pb2
from tests.cli import raven
from tests.support import WorkerDriver

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cli(pki, training_runs, trained_models):
    async def run(*args: str):
        return await raven(pki, training_runs, trained_models, *args)

    return run


async def _created(cli, dataset_uri: str, *options: str) -> dict:
    result = await cli(
        "runs", "create", "--name", "cli run", "--dataset", dataset_uri,
        "--architecture", "retinanet_r18_fpn", *options, "-o", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


async def test_create_sends_every_spec_option_and_prints_the_proto_json(cli, dataset_uri) -> None:
    run = await _created(
        cli, dataset_uri,
        "--epochs", "3", "--batch-size", "4", "--optimizer", "adamw", "--learning-rate", "0.002",
        "--warmup-iterations", "0", "--frozen-stages", "-1", "--image-size", "256",
        "--no-augment", "--val-fraction", "0.25", "--test-fraction", "0.1", "--val-interval", "2",
        "--early-stopping-patience", "3", "--seed", "42", "--deterministic", "--device", "cpu",
        "--no-mixed-precision", "--label", "site=north", "--label", "team=a",
    )  # fmt: skip
    assert run["name"].startswith("trainingRuns/") and run["state"] == "QUEUED"
    assert run["labels"] == {"site": "north", "team": "a"}
    spec = run["spec"]
    assert spec["epochs"] == 3 and spec["batchSize"] == 4 and spec["optimizer"] == "ADAMW"
    assert spec["learningRate"] == 0.002 and spec["warmupIterations"] == 0
    assert spec["frozenStages"] == -1 and spec["imageSize"] == 256 and spec["augment"] is False
    assert spec["valFraction"] == 0.25 and spec["testFraction"] == 0.1
    assert spec["valInterval"] == 2 and spec["earlyStoppingPatience"] == 3
    assert spec["seed"] == "42", "int64 is a string in the proto's JSON mapping"
    assert spec["deterministic"] is True and spec["device"] == "CPU"
    assert spec["mixedPrecision"] is False


async def test_unset_options_take_the_servers_defaults(cli, dataset_uri) -> None:
    run = await _created(cli, dataset_uri)
    assert run["spec"]["epochs"] == 12 and run["spec"]["augment"] is True


async def test_yaml_is_the_same_document_as_json(cli, dataset_uri) -> None:
    run = await _created(cli, dataset_uri)
    as_json = await cli("runs", "get", run["name"], "-o", "json")
    as_yaml = await cli("runs", "get", run["name"], "-o", "yaml")
    assert as_yaml.exit_code == 0, as_yaml.output
    assert yaml.safe_load(as_yaml.stdout) == json.loads(as_json.stdout)


async def test_piped_tables_cut_nothing(cli, dataset_uri) -> None:
    long_name = "a display name long enough to be cut at eighty columns " * 2
    created = await cli(
        "runs", "create", "--name", long_name.strip(), "--dataset", dataset_uri,
        "--architecture", "retinanet_r18_fpn", "-o", "json",
    )  # fmt: skip
    run = json.loads(created.stdout)
    listed = await cli("runs", "list", "--page-size", "5")
    assert listed.exit_code == 0, listed.output
    assert run["name"].removeprefix("trainingRuns/") in listed.output
    assert long_name.strip() in listed.output
    assert "…" not in listed.output


async def test_update_cancel_retry_and_delete(cli, dataset_uri) -> None:
    run = await _created(cli, dataset_uri, "--label", "a=1")
    name = run["name"]
    updated = await cli(
        "runs", "update", name, "--display-name", "renamed", "--label", "b=2", "-o", "json"
    )
    assert updated.exit_code == 0, updated.output
    assert json.loads(updated.stdout)["displayName"] == "renamed"
    assert json.loads(updated.stdout)["labels"] == {"b": "2"}

    cancelled = await cli("runs", "cancel", name, "--reason", "wrong data", "-o", "json")
    assert json.loads(cancelled.stdout)["state"] == "CANCELLED"

    retried = await cli("runs", "retry", name, "-o", "json")
    assert retried.exit_code == 0, retried.output
    retry = json.loads(retried.stdout)
    assert retry["retryOf"] == name and retry["state"] == "QUEUED"

    deleted = await cli("runs", "delete", name)
    assert deleted.exit_code == 0, deleted.output
    gone = await cli("runs", "get", name)
    assert gone.exit_code == 1 and "NOT_FOUND" in gone.output

    nothing = await cli("runs", "update", retry["name"])
    assert nothing.exit_code == 2 and "nothing to change" in nothing.output


async def test_a_failure_message_keeps_its_brackets(cli, dataset_uri, runs, js, subjects) -> None:
    created = await _created(cli, dataset_uri)
    run = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=created["name"]))
    worker = WorkerDriver(js, subjects, run)
    message = "annotation 7: bbox must be [x, y, w, h] with w > 0 and h > 0"
    await worker.send(preparing={})
    await worker.send(failed={"reason": "dataset_invalid", "message": message})
    watched = await cli("runs", "watch", run.name)
    assert watched.exit_code == 1
    assert message in watched.output, watched.output
    shown = await cli("runs", "get", run.name)
    assert message in shown.output


async def test_architectures_lists_the_catalog(cli) -> None:
    shown = await cli("architectures", "-o", "json")
    assert shown.exit_code == 0, shown.output
    found = json.loads(shown.stdout)
    keys = [a["key"] for a in found["architectures"]]
    assert "rtmdet_tiny" in keys and "retinanet_r18_fpn" in keys
    assert found["defaults"]["epochs"] == 12
    table = await cli("architectures")
    assert "rtmdet_tiny" in table.output and "adamw" in table.output


async def test_every_command_offers_its_help(cli) -> None:
    for command in (
        ("runs", "create"), ("runs", "update"), ("runs", "retry"), ("runs", "delete"),
        ("runs", "metrics"), ("runs", "report"), ("models", "import"), ("models", "update"),
        ("models", "delete"), ("models", "publish"), ("models", "unpublish"),
        ("models", "publications"), ("models", "download"), ("models", "evaluate"),
        ("models", "evaluations"), ("models", "compare"), ("architectures",),
    ):  # fmt: skip
        shown = await cli(*command, "--help")
        assert shown.exit_code == 0, (command, shown.output)
        assert "<bool>" not in shown.output, (command, shown.output)


def _commands() -> list[tuple[str, ...]]:
    """Every leaf command of `raven`, as its words."""
    import typer.main

    from cli.main import app

    def walk(command, path: tuple[str, ...]):
        subcommands = getattr(command, "commands", None)
        if not subcommands:
            yield path
            return
        for name, sub in subcommands.items():
            yield from walk(sub, (*path, name))

    return list(walk(typer.main.get_command(app), ()))


def test_docs_cli_lists_every_command_with_an_example() -> None:
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    rows = dict(re.findall(r"^\| `raven ([a-z -]+)` \| `raven ([^`]+)`", page, flags=re.MULTILINE))
    commands = {" ".join(words) for words in _commands()}
    assert set(rows) == commands, (commands - set(rows), set(rows) - commands)
    for command, example in rows.items():
        assert example.startswith(command), (command, example)
