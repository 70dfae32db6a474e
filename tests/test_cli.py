from __future__ import annotations

import re

import pytest

from aiollmcache.cli import _prompts, main


def test_demo_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--requests", "40", "--prompts", "5", "--latency", "0.01", "--answer-chars", "50"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    body = lines[lines.index(next(x for x in lines if x.startswith("---"))) + 1 :]
    # scenario -> requests, upstream, memory, redis, coalesced, seconds, speed-up
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", x.strip()) for x in body)}
    distinct = len(set(_prompts(40, 5, 1)))
    assert rows["no cache"][:2] == ["40", "40"]
    assert rows["cache, cold"][:5] == ["40", str(distinct), "0", "0", str(40 - distinct)]
    assert rows["cache, warm"][:5] == ["40", "0", "40", "0", "0"]


def test_demo_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--requests", "0"])
    assert "--requests" in capsys.readouterr().err
