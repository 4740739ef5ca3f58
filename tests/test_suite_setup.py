"""The suite's own scheduling: the xdist groups of conftest.py reach the scheduler.

`make test` runs `-n 2 --dist loadgroup`; a file (or a group of files sharing a costly session
fixture) must run whole on one worker, or its fixtures are built on both. A pytest or xdist whose
group markers are silently ignored (pytest 9 with xdist 3.8) fails here instead of costing minutes.
"""

from __future__ import annotations


def test_this_file_runs_in_its_xdist_group(request):
    marks = [mark.args[0] for mark in request.node.iter_markers("xdist_group")]
    assert marks == ["test_suite_setup.py"], marks
    if getattr(request.config.option, "loadgroup", False):  # set on xdist workers under --dist loadgroup
        assert request.node.nodeid.endswith("@test_suite_setup.py"), request.node.nodeid
