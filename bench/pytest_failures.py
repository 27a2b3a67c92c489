"""A pytest plugin for GPU runs under a time limit: each failure's report is appended to
$FAILURES_FILE the moment it happens (with xdist too), so a run stopped by its limit still
tells what failed.  Use: PYTHONPATH=bench pytest -p pytest_failures ..."""

import os


def pytest_runtest_logreport(report):
    path = os.environ.get("FAILURES_FILE")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext[-3000:]}\n")
