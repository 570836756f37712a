"""A crashed training child's log becomes a message a person reads from the top."""

from __future__ import annotations

from pathlib import Path

from trainer_worker.failures import MESSAGE_MAX_CHARS, describe_crash

RUN = Path("/srv/raven/artifacts/runs/1b2c/attempt-1")
CHECKOUT = Path("/opt/raven")

HOOK_TABLE = "\n".join(
    [
        "12/02 16:40:01 - mmengine - INFO - Hooks will be executed in the following order:",
        "before_run:",
        "(VERY_HIGH   ) RuntimeInfoHook",
        "(BELOW_NORMAL) LoggerHook",
    ]
    * 30
)

CRASH = f"""{HOOK_TABLE}
Traceback (most recent call last):
  File "/opt/raven/trainer_worker/train_process.py", line 88, in main
    runner.train()
  File "/usr/lib/python3.11/site-packages/mmengine/runner/runner.py", line 1728, in train
    self.optim_wrapper = self.build_optim_wrapper(self.optim_wrapper)
  File "/usr/lib/python3.11/site-packages/mmengine/optim/builder.py", line 191, in build
    optimizer = OPTIMIZERS.build(optimizer_cfg)
  File "/opt/raven/.venv/lib/python3.11/site-packages/torch/optim/adamw.py", line 20, in __init__
    super().__init__(params, defaults)
TypeError: AdamW.__init__() got an unexpected keyword argument 'momentum'
"""


def test_the_exception_comes_first_and_the_frames_follow_without_machine_paths() -> None:
    message = describe_crash(CRASH, returncode=1, roots=(RUN, CHECKOUT))

    lines = message.splitlines()
    assert lines[0] == "TypeError: AdamW.__init__() got an unexpected keyword argument 'momentum'"
    assert "trainer_worker/train_process.py:88 in main" in message
    assert "torch/optim/adamw.py:20 in __init__" in message
    assert "/opt/raven" not in message and "site-packages" not in message
    assert "Hooks will be executed" not in message
    assert message.endswith("The whole log is the run's `log` artifact.")


def test_only_the_last_frames_are_kept_and_the_rest_is_counted() -> None:
    frames = "".join(
        f'  File "/opt/raven/trainer_worker/deep.py", line {n}, in level_{n}\n    call()\n'
        for n in range(1, 21)
    )
    log = f"Traceback (most recent call last):\n{frames}RecursionError: too deep\n"

    message = describe_crash(log, returncode=1, roots=(CHECKOUT,))

    assert message.startswith("RecursionError: too deep")
    assert "(14 earlier omitted)" in message
    assert "level_20" in message and "level_14" not in message


def test_a_wrapper_exception_of_the_launcher_does_not_hide_the_cause() -> None:
    launcher = (
        "Traceback (most recent call last):\n"
        '  File "/usr/lib/python3.11/site-packages/torch/distributed/run.py", line 9, in main\n'
        "    run(args)\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        "trainer_worker.train_process FAILED\n"
    )
    message = describe_crash(CRASH + launcher, returncode=1, roots=(CHECKOUT,))

    assert message.startswith("TypeError: AdamW.__init__()")


def test_a_chained_exception_reports_the_last_one() -> None:
    log = (
        "Traceback (most recent call last):\n"
        '  File "/opt/raven/a.py", line 1, in f\n'
        "KeyError: 'x'\n\n"
        "During handling of the above exception, another exception occurred:\n\n"
        "Traceback (most recent call last):\n"
        '  File "/opt/raven/a.py", line 3, in f\n'
        "ValueError: no x in the config\n"
    )
    assert describe_crash(log, returncode=1).startswith("ValueError: no x in the config")


def test_a_killed_child_without_a_traceback_says_how_it_ended_and_scrubs_the_tail() -> None:
    log = f"{HOOK_TABLE}\n12/02 16:41:00 - mmengine - INFO - Epoch(train) [1][2/8] loss: 1.2\n"
    log += f"saved {RUN}/work/epoch_1.pth and /home/someone/private/notes.txt\n"

    message = describe_crash(log, returncode=-9, roots=(RUN,))

    assert message.startswith("the training process was killed by SIGKILL (out of memory?)")
    assert "work/epoch_1.pth" in message
    assert str(RUN) not in message and "/home/someone" not in message
    assert ".../private/notes.txt" in message


def test_an_empty_log_still_names_the_exit_status() -> None:
    message = describe_crash("", returncode=3)
    assert message.startswith("the training process exited with status 3")


def test_the_message_is_bounded_whatever_the_exception_says() -> None:
    log = "Traceback (most recent call last):\nValueError: " + "x" * 100_000 + "\n"
    message = describe_crash(log, returncode=1)
    assert len(message) <= MESSAGE_MAX_CHARS
    assert message.startswith("ValueError: xxx")
    assert message.endswith("`log` artifact.")
