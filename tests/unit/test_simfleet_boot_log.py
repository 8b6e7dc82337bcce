"""The boot log tail simfleet puts in the error of a car that did not come up: never an empty message."""

from __future__ import annotations

from pathlib import Path

from simfleet.host import log_tail


def test_the_tail_of_a_boot_log_is_its_last_lines_or_says_why_there_are_none(tmp_path: Path) -> None:
    log = tmp_path / "boot.log"
    assert log_tail(log) == "(no log)"
    log.write_text("")
    assert log_tail(log) == "(nothing yet: the container has written no line)"
    log.write_text("\n  \n")
    assert log_tail(log) == "(nothing yet: the container has written no line)"
    log.write_text("".join(f"line {i}\n" for i in range(40)))
    assert log_tail(log, lines=3) == "line 37\nline 38\nline 39"
