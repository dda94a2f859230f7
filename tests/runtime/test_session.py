"""`wait_for_gpus`: `--device cuda` on an autoscaling cluster waits for the GPU nodes (issue 23), without Ray: the
cluster's GPU count, the autoscaler request and the clock are plain callables here."""

from __future__ import annotations

import pytest

from cxrage_ray.errors import InputError
from cxrage_ray.runtime.session import wait_for_gpus


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_waits_for_the_autoscaler_then_withdraws_its_request():
    clock, requests, lines = FakeClock(), [], []
    gpus = lambda: 1.0 if clock.now >= 200 else 0.0  # noqa: E731  (a GPU node joins after 200 s)
    have = wait_for_gpus(600, gpus, requests.append, lines.append, sleep=clock.sleep, clock=clock)
    assert have == 1.0 and 200 <= clock.now < 210
    assert requests == [[{"GPU": 1}], []]  # asked for one GPU, and the request withdrawn once it came
    assert "waiting up to 600s" in lines[0] and any("still waiting" in line for line in lines)
    assert "scoring starts" in lines[-1]


def test_a_cluster_with_gpus_is_not_asked_or_waited_for():
    clock, requests, lines = FakeClock(), [], []
    assert wait_for_gpus(600, lambda: 2.0, requests.append, lines.append, sleep=clock.sleep, clock=clock) == 2.0
    assert requests == [] and lines == [] and clock.now == 0


def test_no_gpu_within_the_timeout_is_a_clear_error_and_the_request_is_withdrawn():
    clock, requests, lines = FakeClock(), [], []
    with pytest.raises(InputError, match=r"no GPU joined the Ray cluster in 30s.*ray status"):
        wait_for_gpus(30, lambda: 0.0, requests.append, lines.append, sleep=clock.sleep, clock=clock)
    assert requests == [[{"GPU": 1}], []] and clock.now == 30


DRIVER = """
import os, shutil, sys
from pathlib import Path

here = Path(os.getcwd())
if sys.argv[1] == "settled":
    from cxrage_ray.runtime.session import settle_cwd_dependent_imports

    settle_cwd_dependent_imports()
shutil.rmtree(here)  # what a runtime-env agent's re-extraction of --working-dir does to the driver's folder
here.mkdir()
from cxrage_ray.model.checkpoint import load_state_dict

print("loaded", len(load_state_dict(Path(sys.argv[2]))))
"""


@pytest.mark.parametrize("settled", [True, False])
def test_a_driver_whose_working_folder_is_replaced_still_loads_its_weights_once_settled(tmp_path, settled):
    """The first `ray job submit`'s failure (issue 23), without Ray: torch imported after the driver's working folder
    was deleted under it fails (FileNotFoundError from inspect's abspath, or a fatal MKL load error); imported
    before, as `init_ray` does before joining a cluster, the weights load in the replaced folder."""
    import subprocess
    import sys

    from cxrage_ray.model.demo import write_demo_checkpoint

    weights = write_demo_checkpoint(tmp_path / "w.pth")
    folder = tmp_path / "_ray_pkg_0123"
    folder.mkdir()
    run = subprocess.run([sys.executable, "-c", DRIVER, "settled" if settled else "unsettled", str(weights)],
                         cwd=folder, capture_output=True, text=True, timeout=300)
    if settled:
        assert run.returncode == 0 and "loaded" in run.stdout, run.stderr[-2000:]
    else:
        assert run.returncode != 0 and "loaded" not in run.stdout
