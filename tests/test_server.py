"""A shared MLflow tracking server backed by PostgreSQL, started on loopback by .ci/services.sh (which
`make test` sources). A parallel sweep into it, one worker killed: tests/test_load.py.

Without the services these tests are skipped and the session's summary says so; with CI set they fail.
"""

from __future__ import annotations

import os

import pytest

from gb10exp.config import ConfigError, TrackingConfig
from gb10exp.tracking import check_store

pytestmark = pytest.mark.server


def _service(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not set in CI: `make test` sources .ci/services.sh, which sets it")
        pytest.skip(f"no {name}: run `make test`, or source .ci/services.sh")
    return value


def test_the_server_and_its_database_are_checked_before_any_job():
    server = _service("GB10EXP_TEST_MLFLOW_URI")
    database = _service("GB10EXP_TEST_PG_URI")
    check_store(TrackingConfig(uri=server, experiment="probe"))  # reachable: no error
    check_store(TrackingConfig(uri=database, experiment="probe"))  # the server's own PostgreSQL store
    wrong = database.rsplit("/", 1)[0] + "/no_such_db"  # the server answers, the database is not there
    with pytest.raises(ConfigError, match=r"^tracking.uri='postgresql\+psycopg2://mlflow:\*\*\*@127.0.0.1:\d+/no_such_db' "
                                          r"cannot be reached \(.*no_such_db.* does not exist"):
        check_store(TrackingConfig(uri=wrong, experiment="probe"))
