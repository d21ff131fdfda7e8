"""The multi-GPU launcher on the CPU.

Fast tests hold its parts: a rank's own run (``vramfit.measure.rank.main`` in this process,
a one-rank gloo group), the collection of rank records (busiest first; a dead rank and a rank
out of memory as one line, exit 1), and the stop of a whole session of processes. The
``slow`` tests (``python -m pytest -q -m slow -n 0 tests/test_launch.py``) run real torchrun
launches of 2 and 3 gloo ranks end to end, a hang included; the same code runs NCCL ranks on
GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

from vramfit.errors import VramfitError  # noqa: E402
from vramfit.measure import rank as rank_module  # noqa: E402
from vramfit.measure.launch import NO_MULTICAST, _collect, _kill, check_gpus, launch  # noqa: E402

ROOT = str(Path(__file__).resolve().parents[1])


def _write(folder: Path, rank: int, record: dict) -> None:
    (folder / f"rank{rank}.json").write_text(json.dumps(record))


def _record(rank: int, peak: int) -> dict:
    return {"rank": rank, "world": 3, "backend": "nccl", "nccl_bytes": 5, "nccl_version": "2.27.7",
            "result": {"peak_allocated_bytes": peak}}


def test_records_come_back_busiest_first(tmp_path: Path) -> None:
    for rank, peak in enumerate([10, 30, 20]):
        _write(tmp_path, rank, _record(rank, peak))
    results = _collect(tmp_path, 3, 0, "")
    assert [r.rank for r in results] == [1, 2, 0]
    assert [r.busiest for r in results] == [30, 20, 10]


def test_a_rank_without_a_record_died(tmp_path: Path) -> None:
    _write(tmp_path, 0, _record(0, 1))
    with pytest.raises(VramfitError) as err:
        _collect(tmp_path, 2, 1, "torchrun: ...\nChildFailedError: exitcode 3\n")
    assert err.value.exit_code == 1
    assert str(err.value) == ("--gpus: rank 1 of 2 died before reporting (launcher exit 1): "
                              "ChildFailedError: exitcode 3")


def test_a_rank_out_of_memory_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rank.main itself, one gloo rank in this process, with a job that runs out of memory."""
    monkeypatch.syspath_prepend(ROOT)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29000 + os.getpid() % 1000)
                       }.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "request.json").write_text(json.dumps(
        {"job": "tests.launch_jobs:out_of_memory", "backend": "gloo", "request": {"rank": 0}}))
    assert rank_module.main(["rank", str(tmp_path)]) == 1
    with pytest.raises(VramfitError) as err:
        _collect(tmp_path, 1, 1, "")
    assert err.value.exit_code == 1
    assert str(err.value) == ("--gpus: rank 0 of 1: out of memory: CUDA out of memory. Tried "
                              "to allocate 2.00 GiB.")
    (tmp_path / "request.json").write_text(json.dumps(
        {"job": "tests.launch_jobs:report", "backend": "gloo", "request": {"peaks": [7]}}))
    assert rank_module.main(["rank", str(tmp_path)]) == 0
    [result] = _collect(tmp_path, 1, 0, "")
    assert (result.busiest, result.result["sum"], result.nccl_bytes) == (7, 1.0, 0)


def test_a_stopped_launch_leaves_no_process() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '60']); "
         "print(flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, start_new_session=True,
    )
    proc.stdout.readline()  # the child has started its own child
    children = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True)
    assert len(children.stdout.split()) == 2
    _kill(proc)
    proc.wait(timeout=5)
    time.sleep(0.1)
    left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True)
    assert left.stdout.split() == []


def test_too_few_gpus_names_the_field() -> None:
    with pytest.raises(VramfitError) as err:
        check_gpus(4, 1)
    assert err.value.exit_code == 2 and str(err.value).startswith("--gpus: a real 4-rank run")


def _launch(job: str, request: dict, n: int = 2, timeout: float = 120) -> list:
    return launch(request, n, backend="gloo", job=f"tests.launch_jobs:{job}", timeout=timeout,
                  extra_path=ROOT)


@pytest.mark.slow
def test_torchrun_ranks_report_with_multicast_off() -> None:
    results = _launch("report", {"peaks": [10, 30, 20]}, n=3)
    assert [r.rank for r in results] == [1, 2, 0]
    assert all(r.world == 3 and r.result["sum"] == 6.0 for r in results)
    assert all(r.env == NO_MULTICAST for r in results)


@pytest.mark.slow
def test_torchrun_dead_rank_is_one_line() -> None:
    with pytest.raises(VramfitError, match="rank 1 of 2 died") as err:
        _launch("die", {"rank": 1})
    assert err.value.exit_code == 1 and "\n" not in str(err.value)


@pytest.mark.slow
def test_torchrun_hang_is_stopped_and_leaves_no_process(tmp_path: Path) -> None:
    with pytest.raises(VramfitError, match="did not finish in 20 s"):
        _launch("hang", {"pids": str(tmp_path)}, timeout=20)
    pids = [int(p.name) for p in tmp_path.iterdir()]
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_measure_gpus_on_enough_gpus_launches_real_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """``measure --train --gpus 2`` on a machine with 2 GPUs goes through the launcher (here
    a stand-in returning two rank records) and compares every rank with the prediction, the
    device total with NCCL's memory on both sides; the busiest rank comes first."""
    import dataclasses

    from typer.testing import CliRunner

    from vramfit import cli
    from vramfit.measure import launch as launch_module
    from vramfit.measure.launch import RankResult
    from vramfit.measure.train import TrainMeasurement

    gib = 2**30

    def record(rank: int, peak: float) -> RankResult:
        m = TrainMeasurement(
            params=1, phases={"forward": int(peak * gib)}, phase_end={}, peak_allocated_bytes=
            int(peak * gib), total_bytes=int((peak + 2) * gib), reserved_peak_bytes=0,
            context_bytes=0, weights_bytes=0, steps=[], oom=False, reached=None,
            device_name="NVIDIA H200", device_total_bytes=150 * gib, torch_version="2.11",
            alloc_conf=None)
        return RankResult(rank, 2, "nccl", 600 * 2**20, "2.27.7", dataclasses.asdict(m))

    asked = {}

    def fake_launch(request: dict, n: int, **_: object) -> list[RankResult]:
        asked.update(request=request, n=n)
        return [record(1, 11.0), record(0, 10.0)]

    monkeypatch.setattr(launch_module, "visible_gpus", lambda: 2)
    monkeypatch.setattr(launch_module, "launch", fake_launch)
    args = ["measure", "--train", "--preset", "llama-3.2-1b", "--gpus", "2", "--fsdp", "full",
            "--loop", "drops", "--batch", "1", "--seq", "512", "--steps", "2"]
    result = CliRunner().invoke(cli.app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert asked["n"] == 2 and asked["request"]["steps"] == 2
    assert asked["request"]["run"]["parallel"]["gpus"] == 2
    import json

    doc = json.loads(result.output)
    assert [r["rank"] for r in doc["ranks"]] == [1, 0]
    predicted = doc["predicted"]["total_bytes"]
    assert doc["ranks"][0]["errors"]["total_bytes"] == pytest.approx(
        (predicted - 13 * gib) / (13 * gib) * 100, abs=0.01)
    assert doc["ranks"][0]["nccl_bytes"] == 600 * 2**20
    text = CliRunner().invoke(cli.app, args)
    assert text.exit_code == 0
    assert "2 ranks through torchrun, 2 ranks, nccl (NCCL 2.27.7)" in text.output
    assert "rank 1: peak 11.00 GiB" in text.output
