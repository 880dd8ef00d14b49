"""Distributed runs on this CPU: 2 processes under DDP (gloo), started by Lightning Fabric's
launcher through the CLI, as users start them, against 1 process."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch
import yaml
from helpers import wait_for_finetune_epochs
from test_train import NUMBERS, history, tiny

from wingspan.data import read_dataset
from wingspan.errors import WingspanError
from wingspan.models import load_bundle
from wingspan.training import resume, train
from wingspan.training.data import MAX_WORKERS, EpochBatches, default_workers, resolve_workers

# Dropout off: each rank draws its masks from the same stream, so with dropout the two runs
# differ by their masks (the data, weighting and gradients are the same). With it off the
# 2-process run must be the 1-process run up to float rounding. fp32 whatever the machine:
# bf16 kernels may round differently for the batch sizes of 1 and 2 processes. PyTorch for
# the frozen passes too: which engine runs them otherwise depends on what other tests left
# in the session's engine cache.
TOLERANCE = 1e-4


def _config(tmp_path, **changes):
    # Batches of 31 of the 32 training images: one splits 16 / 15 over the ranks, the last
    # (1 image) is padded with a copy of itself. The train figures counted the copy and
    # weighed the ranks' losses by their slices, off by a point from one process's.
    settings = dict(dropout=0.0, epochs_head=3, epochs_finetune=3, lr=3e-2, precision="fp32",
                    runtime="torch", batch_size=31, device="cpu")  # (2 processes on a 1-GPU box)
    return tiny(tmp_path, **{**settings, **changes})


def _cli(*args, **popen):
    cmd = [sys.executable, "-m", "wingspan", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, **popen)  # its own group, to kill all


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()[-3000:]
    return out.decode(), err.decode()


def _train_cli(demo_dir, tmp_path, config, runs, *extra):
    config_file = tmp_path / f"{runs}.yaml"
    config_file.write_text(yaml.safe_dump(vars(config)))
    return _cli("train", demo_dir, "--config", config_file, "--runs-dir", tmp_path / runs,
                "--name", "r", "--quiet", *extra)


@pytest.fixture(scope="module")
def one_process(demo_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    return train(read_dataset(demo_dir), _config(tmp), tmp / "runs", "one", quiet=True)


def test_two_processes_train_one_bundle_with_the_same_metrics(demo_dir, tmp_path,
                                                               one_process):
    _, err = _finish(_train_cli(demo_dir, tmp_path, _config(tmp_path), "two", "--devices", "2"))
    run_dir = tmp_path / "two" / "r"
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["r"]  # one run folder
    assert (run_dir / "model" / "manifest.json").is_file()
    assert not list(run_dir.rglob("*.tmp"))
    log = (run_dir / "train.log").read_text()
    assert "2 processes (DDPStrategy)" in log and "over 2 processes" in log
    assert log.count("head   1:") == 1  # rank 0 alone writes the log
    two, one = history(run_dir), history(one_process)
    assert two["stage"].tolist() == one["stage"].tolist()
    pd.testing.assert_frame_equal(two[NUMBERS], one[NUMBERS], atol=TOLERANCE, rtol=0)
    # The bundles predict alike.
    a, _ = load_bundle(run_dir / "model")
    b, _ = load_bundle(one_process / "model")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(a.eval()(x)["label"], b.eval()(x)["label"], atol=1e-3,
                                   rtol=1e-3)


def test_a_two_process_checkpoint_resumes_in_one_process(demo_dir, tmp_path, one_process):
    config = _config(tmp_path, epochs_finetune=12, checkpoint_minutes=0.0)
    reference = train(read_dataset(demo_dir), config, tmp_path / "ref", "ref", quiet=True)
    proc = _train_cli(demo_dir, tmp_path, config, "killed", "--devices", "2")
    run_dir = tmp_path / "killed" / "r"
    wait_for_finetune_epochs(proc, run_dir, 1)
    os.killpg(proc.pid, signal.SIGKILL)  # both ranks
    proc.wait()
    assert len(history(run_dir)) < len(history(reference))  # it really was cut short

    resume(run_dir, quiet=True, devices=1)
    assert "Resuming" in (run_dir / "train.log").read_text()
    pd.testing.assert_frame_equal(history(run_dir)[NUMBERS], history(reference)[NUMBERS],
                                  atol=TOLERANCE, rtol=0)


def test_a_killed_rank_leaves_the_others_a_message_and_the_run_to_resume(demo_dir, tmp_path):
    """One rank killed (an out-of-memory kill, a node lost): the other said it in ~60 lines
    of gloo traceback and train.log did not say that the run had stopped."""
    config = _config(tmp_path, epochs_finetune=12)
    proc = _train_cli(demo_dir, tmp_path, config, "one-killed", "--devices", "2")
    run_dir = tmp_path / "one-killed" / "r"
    wait_for_finetune_epochs(proc, run_dir, 1)
    children = f"/proc/{proc.pid}/task/{proc.pid}/children"  # rank 1: the launcher's child
    rank_1 = [int(pid) for pid in open(children).read().split()]
    assert len(rank_1) == 1, rank_1
    os.kill(rank_1[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "[rank0]" not in err, err[-3000:]
    assert "Process 0 of 2 stopped: another process of the run ended" in err, err
    assert f"wingspan train --resume {run_dir}" in err
    log = (run_dir / "train.log").read_text().splitlines()
    assert "another process of the run ended" in log[-1], log[-3:]
    assert not (run_dir / "error.txt").exists()  # stopped, to resume: not failed


def test_predict_that_loses_a_process_says_so_in_a_line(demo_dir, one_process, monkeypatch):
    """predict --devices 2 whose other process died: ~50 lines of gloo's traceback from
    the gather, where train says it in one line."""
    from types import SimpleNamespace

    from wingspan import predict as predict_module
    from wingspan.inference import Predictor
    from wingspan.predict import predict

    def lost(*_):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection "
                           "closed by peer [127.0.0.1]:3973. This is typically caused by a "
                           "remote worker crashing.")

    monkeypatch.setattr(predict_module, "gather_to_main", lost)
    fabric = SimpleNamespace(world_size=2, global_rank=0, is_global_zero=True)
    images = sorted(str(p) for p in demo_dir.rglob("*.jpg"))[:4]
    with pytest.raises(WingspanError, match=r"Process 0 of 2 stopped: another process of the "
                                            r"run ended.*Connection closed by peer "
                                            r"\[127.0.0.1\]:3973\. "):
        predict(Predictor(one_process, workers=0), images, progress=False, fabric=fabric)


def _started_by(proc: subprocess.Popen, timeout: float = 300) -> int:
    """The pid of the process that `proc` started (rank 1 of `--devices 2`), once it is."""
    import time

    deadline, pid = time.time() + timeout, proc.pid
    while time.time() < deadline and proc.poll() is None:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
        if children:
            return children[0]
        time.sleep(0.05)
    raise AssertionError(f"no second process: {proc.poll()}")


def _gone(pid: int, timeout: float) -> bool:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):  # ended, not yet reaped
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, and prctl")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_processes_predict_started_end_with_it(demo_dir, tmp_path, one_process, sig):
    """`--devices 2`'s first process killed (the out-of-memory killer) or sent SIGTERM alone
    (`docker stop`, Kubernetes): the second went on for 10-20 s, then printed a gloo
    traceback, after the shell's prompt where the first was killed."""
    images = sorted(str(p) for p in demo_dir.rglob("*.jpg"))[:8]
    proc = _cli("predict", one_process, *images, "--devices", 2, "--device", "cpu",
                "--output", tmp_path / "p.csv")
    rank_1 = _started_by(proc)
    os.kill(proc.pid, sig)  # (while the two meet: the second is still starting up)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == (-9 if sig == signal.SIGKILL else 143), err[-3000:]
    assert _gone(rank_1, timeout=10)
    assert "Traceback" not in err and "Process 1 of 2" not in err, err[-3000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl")
def test_a_process_a_rank_starts_is_not_taken_for_a_rank(tmp_path):
    """The launcher's pid, inherited by a `wingspan` that a rank of a script ran before its
    own first fabric(): that process exited 1 without a word, its parent not the launcher.
    Where the launcher has ended, a process it started ends too."""
    from wingspan.errors import LAUNCHER_PID_ENV

    code = "from wingspan.errors import die_with_launcher\ndie_with_launcher()\nprint('on')"
    other = subprocess.Popen(["sleep", "60"])
    ended, killed = subprocess.Popen(["true"]), subprocess.Popen(["true"])
    ended.wait()
    # `killed` has ended, not yet reaped: as a launcher SIGKILLed just now (waited for
    # without reaping it; a sleep was a guess that a loaded machine could beat)
    os.waitid(os.P_PID, killed.pid, os.WEXITED | os.WNOWAIT)
    try:
        for launcher, goes_on in ((other.pid, True), (ended.pid, False), (killed.pid, False)):
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  env={**os.environ, LAUNCHER_PID_ENV: str(launcher)},
                                  timeout=60)
            assert (done.stdout.strip() == "on") == goes_on, (launcher, done)
    finally:
        other.kill()
        other.wait()
        killed.wait()


def test_a_started_process_that_fails_stops_this_one_gently(monkeypatch, capsys):
    """Lightning's watcher killed the first process with SIGKILL within 5 s of a started
    one's failure: exit 137, and train.log without the stop line or how to resume."""
    import time
    from types import SimpleNamespace

    from wingspan import parallel

    sent = []
    monkeypatch.setattr(parallel, "STARTED_FAILED_GRACE_S", 0.01)
    monkeypatch.setattr(parallel.os, "kill", lambda pid, sig: sent.append((pid, sig)))

    def watched(*codes):
        sent.clear()
        started = [SimpleNamespace(poll=lambda c=c: c, pid=100 + i) for i, c in enumerate(codes)]
        parallel._watch_started(started)
        time.sleep(1.5)
        return sent, started

    assert watched(0, 0)[0] == []  # done: nothing to do
    assert watched(None, 2)[0] == [(os.getpid(), signal.SIGTERM), (os.getpid(), signal.SIGKILL)]
    assert "Another process of this run (pid 101) ended (exit code 2): stopping this one" \
        in capsys.readouterr().err
    watched(-9)
    assert "(pid 100) ended (killed by SIGKILL)" in capsys.readouterr().err
    sent_now, started = watched(None, None)
    started.clear()  # this process stops (end_started): nothing more
    time.sleep(1.5)
    assert sent_now == []


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_shared_over_two_processes_gives_the_same_rows(demo_dir, tmp_path,
                                                                one_process, run_cli):
    images = sorted(str(p) for p in demo_dir.rglob("*.jpg"))[:13] + [str(tmp_path / "bad.jpg")]
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    def args(n: int) -> list:
        return ["predict", one_process, *images, "--output", tmp_path / f"{n}.csv",
                "--devices", n, "--device", "cpu", "--top-k", 2, "--precision", "fp32",
                "--quiet"]

    # One process: the CLI in this one (a new python would only import torch again).
    code, _, err = run_cli(*args(1))
    assert code == 0, err
    _finish(_cli(*args(2)))
    one, two = _rows(tmp_path / "1.csv"), _rows(tmp_path / "2.csv")
    assert [r["path"] for r in two] == [r["path"] for r in one]
    assert [r["path"] for r in one[:13]] == images[:13]  # in the order given
    assert one[-1]["error"] and two[-1]["error"]  # the broken file, listed once
    for a, b in zip(one, two, strict=True):
        assert (a["class_1"], a["class_2"]) == (b["class_1"], b["class_2"])
        if a["prob_1"]:
            assert abs(float(a["prob_1"]) - float(b["prob_1"])) < 1e-5


def test_the_apis_predict_takes_devices_as_the_cli_does(demo_dir, tmp_path, one_process):
    """Run.predict(devices=2) in a script: Fabric's launcher starts the second process (it
    runs the script again), the rows are shared and merged in order on rank 0, and the other
    process gets no rows (it did its share)."""
    import wingspan as ws

    images = sorted(str(p) for p in demo_dir.rglob("*.jpg"))[:7]
    script = tmp_path / "script.py"
    script.write_text(
        "import os, sys\nimport wingspan as ws\n"
        f"preds = ws.load({str(one_process)!r}).predict({images!r}, devices=2, "
        "strategy='ddp', device='cpu', top_k=2, precision='fp32', quiet=True)\n"
        "preds.to_json(f\"{sys.argv[1]}.{os.environ.get('LOCAL_RANK', '0')}.json\")\n"
        "if ws.is_main_process():\n    open(f'{sys.argv[1]}.main', 'a').write('x')\n")
    _finish(subprocess.Popen([sys.executable, script, tmp_path / "out"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    two = pd.read_json(tmp_path / "out.0.json")
    one = ws.load(one_process).predict(images, top_k=2, precision="fp32", quiet=True)
    assert two.path.tolist() == one.path.tolist() == images
    assert two.predicted.tolist() == one.predicted.tolist()
    assert two.probability.to_numpy() == pytest.approx(one.probability.to_numpy(), abs=1e-5)
    assert pd.read_json(tmp_path / "out.1.json").empty
    assert (tmp_path / "out.main").read_text() == "x"  # one process of the two is the main


@pytest.mark.parametrize("how", ["-c", "stdin"])
def test_more_processes_without_a_script_file_are_refused_not_killed(tmp_path, how):
    """Fabric starts the others by running the program again: from `python -c` or standard
    input it could not, and killed the process (exit 137) with nothing said. Now an error
    says how to start them, and the program goes on to handle it."""
    code = ("from wingspan.errors import WingspanError\n"
            "from wingspan.parallel import Processes, _starts_processes\n"
            "from lightning_fabric import Fabric\n"
            # One process per machine on two: each machine starts its own, nothing again.
            "assert not _starts_processes(Fabric(accelerator='cpu', devices=1, num_nodes=2))\n"
            "try:\n    Processes(device='cpu', devices=2).fabric()\n"
            "except WingspanError as e:\n    print('refused:', e.message, e.hint)\n")
    args, stdin = ([sys.executable, "-c", code], None) if how == "-c" else \
        ([sys.executable, "-"], code)
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: 2 processes are started here by running this program again" in done.stdout
    assert "python my_script.py" in done.stdout


@pytest.mark.parametrize("n, batch, world", [(10, 4, 2), (9, 4, 3), (5, 8, 2), (7, 3, 4)])
def test_the_ranks_together_take_one_process_batches(n, batch, world):
    weights = torch.rand(n, generator=torch.Generator().manual_seed(1))
    for w in (None, weights):
        one = list(EpochBatches(n, batch, seed=3, weights=w))
        batches_of = [EpochBatches(n, batch, seed=3, weights=w, rank=r, world=world)
                      for r in range(world)]
        ranks = [list(b) for b in batches_of]
        assert {len(r) for r in ranks} == {len(one)}  # every rank takes as many steps
        for step, single in enumerate(one):
            together = [req for r in ranks for req in r[step]]
            assert all(r[step] for r in ranks)  # no rank idles (DDP would wait forever)
            if len(single) >= world:
                assert together == single
            else:  # a last batch smaller than the world is padded with its own items
                assert set(together) == set(single)
            # What the epoch's figures count: each item once, as one process counts them.
            counted = []
            for rank, batches in enumerate(ranks):
                items, mine = batches_of[rank].real(step)
                assert items == len(single)
                counted += batches[step][:mine]
            assert counted == single
        # Resuming after a step gives the same remaining batches, on any number of ranks.
        later = EpochBatches(n, batch, seed=3, weights=w, rank=0, world=world)
        later.set_epoch(0, start_batch=1)
        assert list(later) == ranks[0][1:]


def test_an_image_drawn_again_in_an_epoch_is_another_view_of_it():
    """The weighted sampler draws a rare class's images several times an epoch: each draw
    asked for the same (image, epoch, view), so the same augmented pixels (61 of 162
    requests of a weighted demo epoch were copies). Without repeats nothing changes."""
    weights = torch.ones(30)
    weights[:3] = 20.0
    for w, view in ((weights, 1), (None, 1), (weights, 0)):
        requests = [r for batch in EpochBatches(30, 4, seed=3, view=view, weights=w)
                    for r in batch]
        assert len(set(requests)) == len(requests)
        firsts = {}
        for i, _, v in requests:
            firsts.setdefault(i, v)
        assert set(firsts.values()) == {view}  # an image's first draw: the plain view
    assert w is not None and len(requests) > len({i for i, _, _ in requests})


def test_batches_count_what_is_left_once_unreadable_items_are_left_out():
    """A weighted draw may hold an unreadable item many times: the length (the progress
    bar's and the learning-rate schedule's count of steps) counts the batches that are left."""
    weights = torch.ones(40)
    weights[:2] = 50.0  # the two items that cannot be read are drawn most
    for w in (None, weights):
        batches = EpochBatches(40, 4, seed=3, weights=w)
        batches.skip = {0, 1}
        assert len(batches) == len(list(batches)) == (len(batches._order()) + 3) // 4
        assert w is None or len(batches) < 9


def _no_quota(monkeypatch) -> None:
    """No cgroup CPU quota, whatever the machine's (a CI container may have one)."""
    import wingspan.config

    monkeypatch.setattr(wingspan.config, "CGROUP_CPU_MAX", "/nonexistent/cpu.max")
    monkeypatch.setattr(wingspan.config, "CGROUP_V1_QUOTA", ("/nonexistent/q", "/nonexistent/p"))


def test_a_containers_cpu_quota_bounds_the_cores_and_torchs_threads(monkeypatch, tmp_path):
    """`docker run --cpus 2` (a Kubernetes limit) on a 64-core host: affinity says 64, and
    a worker and a torch thread per core then shared 2 cores' time."""
    import torch

    import wingspan.config
    from wingspan.config import usable_cores
    from wingspan.models import resolve_policy

    _no_quota(monkeypatch)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert usable_cores() == 64
    limit = tmp_path / "cpu.max"
    monkeypatch.setattr(wingspan.config, "CGROUP_CPU_MAX", str(limit))
    for text, cores in (("150000 100000", 2), ("50000 100000", 1), ("max 100000", 64)):
        limit.write_text(text + "\n")
        assert usable_cores() == cores, text
    # A quota on the process's own cgroup below the root (systemd's CPUQuota=, a batch
    # system's) was missed: the smallest on the way up holds
    limit.write_text("max 100000\n")
    (tmp_path / "user.slice" / "job").mkdir(parents=True)
    (tmp_path / "user.slice" / "cpu.max").write_text("300000 100000\n")
    (tmp_path / "user.slice" / "job" / "cpu.max").write_text("50000 100000\n")
    own = tmp_path / "self-cgroup"
    own.write_text("1:cpu:/\n0::/user.slice/job\n")
    monkeypatch.setattr(wingspan.config, "CGROUP_SELF", str(own))
    assert wingspan.config.cpu_quota() == 0.5 and usable_cores() == 1
    own.write_text("0::/user.slice\n")
    assert usable_cores() == 3
    own.write_text("0::/\n")
    # cgroup v1: a quota of -1 is none
    v1 = tmp_path / "quota", tmp_path / "period"
    monkeypatch.setattr(wingspan.config, "CGROUP_CPU_MAX", "/nonexistent/cpu.max")
    monkeypatch.setattr(wingspan.config, "CGROUP_V1_QUOTA", tuple(map(str, v1)))
    v1[1].write_text("100000\n")
    for quota, cores in (("300000", 3), ("-1", 64)):
        v1[0].write_text(quota + "\n")
        assert usable_cores() == cores, quota
    assert default_workers() == MAX_WORKERS  # (16) of 64 cores, with no quota
    v1[0].write_text("200000\n")
    assert default_workers() == 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        resolve_policy("cpu")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_data_workers_share_the_cores_this_process_may_use(monkeypatch):
    _no_quota(monkeypatch)
    cores = set(range(4))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores, raising=False)
    assert default_workers() == 3 and default_workers(2) == 1 and default_workers(4) == 0
    # Off the main thread (a web app's or a thread pool's predict), images are read in
    # the calling process: a worker forked while another thread held torch's locks hung
    # for good. So too in a daemonic process (a multiprocessing.Pool's), which may not
    # start any.
    import multiprocessing
    import threading

    from_thread = []
    thread = threading.Thread(target=lambda: from_thread.append(default_workers()))
    thread.start()
    thread.join()
    assert from_thread == [0] and default_workers() == 3
    with pytest.MonkeyPatch.context() as m:
        m.setattr(multiprocessing.current_process(), "daemon", True, raising=False)
        assert default_workers() == 0
    cores = set(range(64))  # a big machine: capped
    assert default_workers() == MAX_WORKERS and default_workers(8) == 7


def test_workers_allowed_past_the_cores_draw_no_torch_advice(monkeypatch):
    """wingspan allows WORKERS_PER_CORE a core; torch's DataLoader advised against more
    than one a core each time a loader was made or iterated (6 times a train)."""
    import warnings

    from wingspan.training.data import WORKERS_PER_CORE, Loader

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        loader = Loader(list(range(4)), batch_size=2, num_workers=WORKERS_PER_CORE)
        assert [batch.tolist() for batch in loader] == [[0, 1], [2, 3]]
    with pytest.warns(UserWarning, match="worker processes in total"):  # (what torch says)
        torch.utils.data.DataLoader(list(range(4)), num_workers=WORKERS_PER_CORE)


def test_an_absurd_number_of_workers_is_refused_before_any_is_started(monkeypatch, run_cli,
                                                                       demo_dir, tmp_path):
    from wingspan.errors import WingspanError

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert resolve_workers(None) == default_workers() and resolve_workers(8) == 8
    assert resolve_workers(0) == 0 and resolve_workers(4, processes=2) == 4
    for workers, processes in ((9, 1), (5, 2), (514, 1)):
        with pytest.raises(WingspanError,
                           match=rf"--workers {workers} \(workers= in Python\) would start"):
            resolve_workers(workers, processes)
    # A resumed run's saved setting (from a larger machine, say) is lowered, and said.
    said = []
    assert resolve_workers(16, log=said.append) == 8 and "--workers 16" in said[0]
    code, _, err = run_cli("train", demo_dir, "--workers", "514", "--runs-dir", tmp_path,
                           "--backbone", "test_efficientnet", "--weights", "none")
    assert code != 0 and "--workers 514" in err and "at most 8" in err
    assert not any(tmp_path.iterdir())  # no run folder left behind


def test_predict_and_evaluate_refuse_absurd_workers_as_train_does(monkeypatch, tmp_path):
    """Predictor (predict, evaluate, calibrate, adapt) sizes its workers with train's
    resolve_workers: 514 is refused with train's message, before the model is looked for."""
    from wingspan.errors import WingspanError
    from wingspan.evaluate.run import evaluate
    from wingspan.inference import Predictor

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    nowhere = tmp_path / "no-run"  # never reached
    for call in (lambda: Predictor(nowhere, workers=514),
                 lambda: evaluate(nowhere, workers=514, progress=False)):
        with pytest.raises(WingspanError, match=r"--workers 514 \(workers= in Python\) would "
                                                r"start .* at most 8"):
            call()


def test_a_one_process_command_under_torchrun_is_refused_once(monkeypatch, run_cli, tmp_path):
    """`torchrun --nproc-per-node 2 -m wingspan evaluate RUN`: both ranks evaluated and raced
    for the folder ("Another `wingspan evaluate` is writing..."), and nothing was written."""
    for k, v in {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2",
                 "RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    code, _, err = run_cli("evaluate", tmp_path / "run")
    assert code == 2 and "`wingspan evaluate` runs in one process, but torchrun started 2" in (
        " ".join(err.split()))
    monkeypatch.setenv("RANK", "1")
    assert run_cli("export", tmp_path / "run") == (2, "", "")  # rank 0 says it for all
    monkeypatch.setenv("RANK", "0")
    code, _, err = run_cli("data", "audit", tmp_path / "data")  # (it has no --devices)
    assert code == 2 and "`wingspan data audit` runs in one process" in " ".join(err.split())
    assert run_cli("--version")[0] == 0


def test_processes_follow_torchrun_and_refuse_what_cannot_run(monkeypatch):
    from wingspan.errors import WingspanError
    from wingspan.parallel import Processes, interleave

    assert Processes().world() == (1, 1)
    # Several machines with nothing to say where the others are: it waited forever.
    with pytest.raises(WingspanError, match="--nodes 2, but nothing says where the other "
                                            "machines are"):
        Processes(devices=4, nodes=2).world()
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")  # run on each machine, with its NODE_RANK
    assert Processes(devices=4, nodes=2).world() == (4, 2)
    monkeypatch.delenv("MASTER_ADDR")
    for k, v in {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "16"}.items():
        monkeypatch.setenv(k, v)
    assert Processes().world() == (8, 2)  # as torchrun started them
    assert Processes(devices=8).world() == (8, 2)
    # --devices 2 under torchrun's 8: each process trained a whole run of its own.
    with pytest.raises(WingspanError, match="torchrun started 8 processes on this machine, "
                                            "but --devices is 2"):
        Processes(devices=2).world()
    # A one-process command under torchrun: refused, not raced for its output folder.
    from wingspan.parallel import check_one_process

    with pytest.raises(WingspanError, match="`wingspan evaluate` runs in one process, but "
                                            "torchrun started 16"):
        check_one_process("evaluate")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(WingspanError, match="no CUDA GPU"):
        Processes(device="cuda").fabric()
    with pytest.raises(WingspanError, match="Unknown strategy 'fsdp'"):
        Processes(strategy="fsdp")  # at once: predict on one process never makes a Fabric
    # Undoing the strided shards: rank r held items r, r + w, ...
    assert interleave([[0, 3, 6], [1, 4], [2, 5]]) == list(range(7))


def test_two_processes_skip_unreadable_images_alike(demo_dir, tmp_path):
    from test_train import _with_broken_files

    data = _with_broken_files(demo_dir, tmp_path)
    _finish(_train_cli(data, tmp_path, _config(tmp_path), "broken", "--devices", "2"))
    run_dir = tmp_path / "broken" / "r"
    unreadable = json.loads((run_dir / "metrics.json").read_text())["unreadable"]
    assert {os.path.basename(u["path"]) for u in unreadable} == {"zero.jpg", "text.jpg",
                                                                  "cut.jpg"}
    assert (run_dir / "model" / "manifest.json").is_file()


def test_strict_stops_every_process_with_the_error(demo_dir, tmp_path):
    """--strict under DDP: the rank that meets the unreadable image must not leave the
    others waiting for it forever; all stop with the error."""
    from test_train import _with_broken_files

    data = _with_broken_files(demo_dir, tmp_path)
    proc = _train_cli(data, tmp_path, _config(tmp_path, strict=True), "strict", "--devices", "2")
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    err = err.decode()
    # Every rank stops at the same point with the same error, which rank 0 alone prints;
    # none dies on a closed connection.
    assert err.count("Cannot read image") == 1 and "Without --strict" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def test_a_data_error_on_two_processes_is_said_once(demo_dir, tmp_path):
    """Every process reads the same data and meets the same error: rank 0 says it."""
    proc = _cli("train", demo_dir, "--holdout-classes", "nosuch", "--devices", 2,
                "--device", "cpu", "--runs-dir", tmp_path / "runs", "--quiet", "--weights", "none",
                "--backbone", "test_efficientnet")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert err.decode().count("no class 'nosuch'") == 1, err.decode()[-2000:]


def test_the_ranks_train_the_same_head_with_dropout_on(demo_dir, tmp_path):
    """Stage 1 trains the whole head on every rank, on the same features: the ranks draw
    the same dropout masks, so their heads are equal at each epoch's end, before rank 0's
    are copied to the others. (A rank that drifted could stop alone on a NaN, and leave
    the others waiting for it.)"""
    found = tmp_path / "differences.txt"
    script = tmp_path / "check.py"  # Fabric's launcher starts rank 1 by running it again
    script.write_text(textwrap.dedent(f"""
        import wingspan.training.stages as stages
        from wingspan.cli import main

        sync = stages._sync_from_rank_zero

        def compared(run, module):
            for name, tensor in module.state_dict().items():
                both = run.fabric.all_gather(tensor)
                if run.fabric.is_global_zero:
                    with open({str(found)!r}, "a") as f:
                        f.write(f"{{name}} {{float((both[0] - both[1]).abs().max())}}\\n")
            sync(run, module)

        stages._sync_from_rank_zero = compared
        main()
    """))
    config = _config(tmp_path, dropout=0.5, epochs_finetune=0)
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(vars(config)))
    proc = subprocess.Popen([sys.executable, str(script), "train", str(demo_dir), "--config",
                             str(config_file), "--runs-dir", str(tmp_path / "runs"), "--quiet",
                             "--devices", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    _finish(proc)
    rows = [line.split() for line in found.read_text().splitlines()]
    assert len(rows) >= 3 * 2  # 3 epochs, a weight and a bias at least
    assert all(float(diff) == 0.0 for _, diff in rows), rows


def test_a_run_folder_rank_0_cannot_make_stops_every_torchrun_process_cleanly(demo_dir,
                                                                               tmp_path):
    """Rank 0 alone makes the run folder: when it cannot (here a name that is a path), the
    others learn it and stop too, rather than fail on a connection rank 0 closed."""
    import socket

    with socket.socket() as probe:  # a port free now, not one fixed that may be taken
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(port), "-m", "wingspan", "train", str(demo_dir), "--name", "../x",
         "--runs-dir", str(tmp_path / "runs"), "--weights", "none", "--backbone",
         "test_efficientnet", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, env={**os.environ, "TMPDIR": str(tmp_path)})  # torchrun's logs
    _, err = proc.communicate(timeout=300)
    err = err.decode()
    assert proc.returncode != 0
    assert err.count("is a path") == 1, err[-3000:]
    assert "Connection closed" not in err and "[rank1]" not in err, err[-3000:]
    assert not (tmp_path / "x").exists()


def test_two_processes_train_with_frozen_passes_on_onnx_runtime(demo_dir, tmp_path):
    """Each rank exports its own graphs for the frozen passes (and both may keep one in the
    shared cache folder at once): the run ends, its ranks agree, and its model predicts."""
    config = _config(tmp_path, runtime="onnx", device="cpu", epochs_head=2,  # (a CPU engine:
                     epochs_finetune=1)  # refused on a GPU, whatever the box)
    _, err = _finish(_train_cli(demo_dir, tmp_path, config, "onnx", "--devices", "2"))
    run_dir = tmp_path / "onnx" / "r"
    log = (run_dir / "train.log").read_text()
    assert "2 processes (DDPStrategy)" in log and "frozen passes onnx-fp32" in log, log
    assert not list(run_dir.rglob("*.tmp")) and "Traceback" not in err
    model, _ = load_bundle(run_dir / "model")
    out = model.eval()(torch.randn(2, 3, 32, 32))["label"]
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_lightnings_mixed_precision_line_is_not_printed(caplog):
    """`train -q` printed Lightning's "Using bfloat16 Automatic Mixed Precision (AMP)": the
    run's own engine line says the precision."""
    import logging

    from wingspan.parallel import Processes

    with caplog.at_level(logging.INFO):
        Processes(device="cpu").fabric("bf16")
    assert not [r for r in caplog.records if "Mixed Precision" in r.getMessage()]
    said = logging.getLogger("lightning_fabric.utilities.rank_zero")
    assert not said.filters  # (taken away again)


SLOW_END = """
import sys, time
from datetime import timedelta

import lightning_fabric.strategies.ddp as ddp
import torch.distributed as dist

setup = ddp.DDPStrategy.setup_environment


def short(self):  # the process group's timeout: 4 s, not 30 minutes; set once both
    # processes have joined (given to the strategy, it bounded their rendezvous too, and a
    # rank 1 slow to start on a loaded machine failed it: "1/2 clients joined")
    setup(self)
    dist.set_timeout(timedelta(seconds=4))


ddp.DDPStrategy.setup_environment = short
import wingspan.training.finish as finish

check = finish.check_lossy_engines


def slow(r, *args):  # rank 0's end of the run, longer than that
    time.sleep(12)
    return check(r, *args)


finish.check_lossy_engines = slow
from wingspan.cli.app import main

main(sys.argv[1:])
"""


def test_the_ranks_wait_for_rank_0s_long_end_of_a_run(demo_dir, tmp_path):
    """Rank 0 alone ends a run (the lossy check, the final passes, the bundle) while the
    others wait at a barrier: under the process group's timeout (torch's 30 minutes,
    which ETHEC's final passes on a CPU can pass) they failed, and a resume on as many
    processes failed again. Here that timeout is 4 s and the end takes 12: it finishes."""
    script = tmp_path / "slow_end.py"
    script.write_text(SLOW_END)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(vars(_config(tmp_path, epochs_head=1, epochs_finetune=1))))
    proc = subprocess.Popen([sys.executable, str(script), "train", str(demo_dir), "--config",
                             str(config), "--runs-dir", str(tmp_path / "runs"), "--name", "r",
                             "--quiet", "--devices", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    _finish(proc)
    assert (tmp_path / "runs" / "r" / "model" / "manifest.json").is_file()
