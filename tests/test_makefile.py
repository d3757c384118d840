"""The Makefile's test targets agree with the suite: the serial part collects only SERIAL_TESTS, so that list must
name every file that holds a `serial` test (else such a test would silently never run in `make test`)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_serial_tests_lists_every_file_with_a_serial_test():
    makefile = (ROOT / "Makefile").read_text()
    listed = set(re.search(r"^SERIAL_TESTS := (.+)$", makefile, re.M).group(1).split())
    marked = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")
              if re.search(r"^@pytest\.mark\.serial\b|pytestmark = .*pytest\.mark\.serial", p.read_text(), re.M)}
    assert marked and listed == marked
