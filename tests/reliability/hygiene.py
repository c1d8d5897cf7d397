"""Moved to tests/support/hygiene.py (any test can register with the sweep now); kept for old imports."""
from tests.support.hygiene import *  # noqa: F401,F403
from tests.support.hygiene import Hygiene, dump_rows  # noqa: F401
