"""A pytest plugin for .ci/run: appends the id of every skipped test to the file $DNRT_CI_SKIPPED, so that CI can run
exactly those again once the optional packages are installed."""
import os


def _note(report) -> None:
    path = os.environ.get("DNRT_CI_SKIPPED")
    if path and report.skipped:
        with open(path, "a") as f:
            f.write(report.nodeid + "\n")


def pytest_collectreport(report):
    """A module that skips as a whole (pytest.importorskip at its top)."""
    _note(report)


def pytest_runtest_logreport(report):
    if report.when in ("setup", "call"):
        _note(report)
