"""Shared fixtures. Under SKM_REQUIRE_ALL=1 (CI) any skipped test fails the run."""
from __future__ import annotations

import os

import pytest

from tests.support.postgres import *  # noqa: F401,F403  (fixtures: pg_cluster, pg_url, storage_url, storage)
from tests.support.server import *  # noqa: F401,F403  (fixtures: skm)

pytest_plugins = ["tests.support.require_all",     # SKM_REQUIRE_ALL=1: any skip, at collection too, fails
                  "tests.support.hygiene_plugin"]  # the secret-hygiene sweep's collector (fixture `hygiene`)
