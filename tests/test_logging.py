"""Rank-aware logging: info from rank 0 only, warnings from every rank with their rank."""

from __future__ import annotations

import subprocess
import sys


def run_as_rank(rank: int) -> str:
    code = (
        "from divae.utils.logging import get_logger\n"
        "log = get_logger('t')\n"
        "log.info('hello info')\n"
        "log.warning('hello warn')\n"
        "log.info('every rank', extra={'all_ranks': True})\n"
    )
    env = {"RANK": str(rank), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stderr


def test_rank0_prints_info_and_warning():
    err = run_as_rank(0)
    assert "hello info" in err and "hello warn" in err
    assert "[rank 0] t: hello warn" in err
    assert "[rank" not in err.splitlines()[0]  # info lines of rank 0 carry no prefix


def test_other_ranks_print_only_warnings_with_rank():
    err = run_as_rank(3)
    assert "hello info" not in err
    assert "[rank 3] t: hello warn" in err
    assert "[rank 3] t: every rank" in err
