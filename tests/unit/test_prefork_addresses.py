"""Where the children of a service with several processes listen (shared/prefork.py)."""

from __future__ import annotations

from shared.prefork import child_address, child_metrics_address


def test_every_child_listens_on_the_port_the_parent_reserved() -> None:
    assert child_address("0.0.0.0:0", 50051) == "0.0.0.0:50051"
    assert child_address("[::]:50051", 50051) == "[::]:50051"


def test_child_i_serves_metrics_on_the_metrics_port_plus_i() -> None:
    assert child_metrics_address(None, "127.0.0.1:9464", 0) == "127.0.0.1:9464"
    assert child_metrics_address(None, "127.0.0.1:9464", 2) == "127.0.0.1:9466"
    assert child_metrics_address("0.0.0.0:9500", "127.0.0.1:9464", 1) == "0.0.0.0:9501"
    # Port 0: a free port of each child's own; off stays off.
    assert child_metrics_address("127.0.0.1:0", "127.0.0.1:9464", 3) == "127.0.0.1:0"
    assert child_metrics_address("off", "127.0.0.1:9464", 1) == "off"
