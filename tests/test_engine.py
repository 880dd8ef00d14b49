"""`auto` measures: the fastest eligible candidate wins, once per model and machine."""

import json
import os
import time

import pytest
import torch

from wingspan.errors import WingspanError
from wingspan.models import create_classifier, engine, resolve_policy
from wingspan.models import policy as policy_module
from wingspan.models.engine import time_calls
from wingspan.models.runtime import make_runner
from wingspan.training import finetune_engine as step_module
from wingspan.training.finetune_engine import choose_train

SLOW = {"torch-fp32": 0.02, "torch-bf16": 0.04, "onnx-fp32": 0.0}  # seconds added per call


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """An AMX-like CPU with nothing forced, its own engine cache, and candidates whose
    speed the test sets: each call takes `delays[name]` seconds on the timing's clock."""
    from wingspan.models import engine as engine_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("WINGSPAN_PRECISION", raising=False)
    monkeypatch.delenv("WINGSPAN_RUNTIME", raising=False)
    monkeypatch.setenv("WINGSPAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(engine_module, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    delays, calls, broken = dict(SLOW), [], set()
    # The timing's clock moves only by the speeds set here (plus 1 ms a call), not by the
    # real work: on a busy machine a real clock made a 20 ms difference flip either way.
    clock = {"now": 0.0}

    class Clock:
        def __getattr__(self, name):
            return getattr(time, name)

        def perf_counter(self):
            return clock["now"]

    monkeypatch.setattr(engine_module, "time", Clock())

    def ticking(calls, x, rounds, near_tie):  # training steps: the same clock, same speeds
        def tick(name, call):
            def run(x):
                clock["now"] += 0.001 + delays[name]
                return call(x)
            return run

        return time_calls({n: tick(n, c) for n, c in calls.items()}, x, rounds, near_tie)

    monkeypatch.setattr(step_module, "time_calls", ticking)

    def slowed(module, size, engine, *args, **kwargs):
        runner = make_runner(module, size, engine, *args, **kwargs)

        def run(x):
            calls.append(engine.name)
            clock["now"] += 0.001 + delays[engine.name]
            out = runner(x)
            return out.flip(1) if engine.name in broken else out  # a wrong export

        return run

    monkeypatch.setattr(policy_module, "make_runner", slowed)
    return delays, calls, broken


def model():
    """A random network whose top-1 depends on the image: a random head's bias would
    otherwise decide every image's class, and no engine could change a top-1."""
    torch.manual_seed(0)
    classifier, _ = create_classifier("test_efficientnet", {"y": 5}, "none")
    with torch.no_grad():
        classifier.head.outputs["y"].bias.zero_()
        classifier.head.outputs["y"].weight.mul_(1000)
    return classifier


def test_the_fastest_candidate_wins_and_is_cached(machine, tmp_path):
    delays, calls, _ = machine
    net = model()
    policy = resolve_policy().choose_frozen(net, 32, batch_size=8)
    choice = policy.frozen
    assert choice.engine.name == "onnx-fp32" and choice.how == "measured"
    speeds = choice.images_per_s
    assert speeds["onnx-fp32"] > speeds["torch-fp32"] > speeds["torch-bf16"]
    assert choice.changed["torch-fp32"] == 0.0 and choice.seconds > 0
    assert "measured" in policy.describe() and "images/s" in policy.describe()
    record = json.loads((tmp_path / "cache" / "engines.json").read_text())
    (key, saved), = record.items()
    assert json.loads(key)["model"] == "test_efficientnet" and saved["engine"] == "onnx-fp32"
    # Known now: no timing the second time, whatever the speeds have become.
    calls.clear()
    delays["onnx-fp32"] = 1.0
    again = resolve_policy().choose_frozen(net, 32, batch_size=8).frozen
    assert (again.engine.name, again.how, calls) == ("onnx-fp32", "cached", [])
    # Another batch size is another measurement, and the new speeds decide.
    other = resolve_policy().choose_frozen(net, 32, batch_size=4).frozen
    assert other.how == "measured" and other.engine.name == "torch-fp32" and calls
    assert len(json.loads((tmp_path / "cache" / "engines.json").read_text())) == 2


def test_another_cpu_with_the_same_name_measures_again(machine, monkeypatch):
    """VMs call an AVX2-only EPYC and an AVX-512-bf16 one both "AMD EPYC"."""
    from wingspan.models import engine as engine_module

    _, calls, _ = machine
    net = model()
    assert resolve_policy().choose_frozen(net, 32, 8).frozen.how == "measured"
    assert resolve_policy().choose_frozen(net, 32, 8).frozen.how == "cached"
    monkeypatch.setattr(engine_module, "cpu_flags", lambda: frozenset({"amx_bf16", "avx512f"}))
    assert resolve_policy().choose_frozen(net, 32, 8).frozen.how == "measured"


def test_clearly_slower_candidates_stop_being_timed(machine):
    delays, calls, _ = machine
    delays.update({"torch-fp32": 0.1, "torch-bf16": 0.6, "onnx-fp32": 0.1})
    resolve_policy().choose_frozen(model(), 32, batch_size=8)
    # a warm-up each; bf16's took 6x the best: no more; two rounds for the close two
    assert calls.count("torch-bf16") == 1 and calls.count("torch-fp32") == 3
    calls.clear()
    delays.update({"torch-fp32": 0.12, "torch-bf16": 0.1, "onnx-fp32": 0.07})
    choice = resolve_policy().choose_frozen(model(), 32, batch_size=4).frozen
    assert choice.engine.name == "onnx-fp32"  # 1.4x ahead of the next after round 1
    assert [calls.count(name) for name in SLOW] == [2, 2, 2]  # warm-up and round 1 only


def test_a_lossy_engine_must_be_clearly_faster_to_be_chosen(machine):
    """bf16 moves answers; a hair's speed (1578 against 1561 images/s on a busy EPYC)
    flipped the choice from run to run, and with it a same-seed rerun's model."""
    delays, _, _ = machine
    delays.update({"torch-fp32": 0.1, "torch-bf16": 0.0485, "onnx-fp32": 0.05})
    close = resolve_policy().choose_frozen(model(), 32, batch_size=8).frozen
    assert close.engine.name == "onnx-fp32"  # bf16 about 3% faster: not enough
    assert close.images_per_s["torch-bf16"] > close.images_per_s["onnx-fp32"]
    assert "torch-bf16 " in close.describe() and "(lossy, not 1.05x as fast)" in close.describe()
    delays.update({"torch-bf16": 0.03})
    clear = resolve_policy().choose_frozen(model(), 32, batch_size=4).frozen
    assert clear.engine.name == "torch-bf16"  # 1.6x: worth its rounding
    # The training step too
    delays.update({"torch-fp32": 0.05, "torch-bf16": 0.0485})
    net = model()
    step = choose_train(resolve_policy().choose_frozen(net, 32, 16), net, 2, 32, 8).train
    assert step.engine.name == "torch-fp32"
    assert step.images_per_s["torch-bf16"] > step.images_per_s["torch-fp32"]


def test_the_accuracy_guard_rejects_a_fast_but_wrong_engine(machine):
    delays, _, broken = machine
    broken.add("onnx-fp32")  # fastest, but its features come out permuted
    choice = resolve_policy().choose_frozen(model(), 32, batch_size=16).frozen
    assert choice.engine.name == "torch-fp32"
    assert "of the timing images against torch-fp32" in choice.rejected["onnx-fp32"]
    assert choice.changed["onnx-fp32"] > 0.1
    assert "onnx-fp32" in choice.images_per_s  # still shown, marked rejected
    assert "(rejected)" in choice.describe()


def test_a_forced_policy_times_nothing(machine, monkeypatch):
    _, calls, _ = machine
    policy = resolve_policy(precision="bf16").choose_frozen(model(), 32, batch_size=8)
    assert policy.frozen.how == "forced by precision bf16" and calls == []
    monkeypatch.setenv("WINGSPAN_RUNTIME", "ONNX")  # (capitals were refused; spaces not)
    policy = resolve_policy().choose_frozen(model(), 32, batch_size=8)
    assert policy.frozen.engine.name == "onnx-fp32" and calls == []


def test_timing_leaves_the_model_and_the_random_stream_alone(machine):
    net = model()
    net.train()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    policy = resolve_policy().choose_frozen(net, 32, batch_size=8)
    policy = choose_train(policy, net, stages=2, size=32, batch_size=8)
    assert policy.train.how == "measured"
    assert set(policy.train.images_per_s) == {"torch-fp32", "torch-bf16"}
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    cached = choose_train(resolve_policy().choose_frozen(net, 32, 8), net, 2, 32, 8)
    assert cached.train.how == "cached"
    assert cached.train.engine == policy.train.engine


def test_a_choice_timed_while_other_work_held_the_cores_is_not_kept(machine, monkeypatch):
    """Beside other jobs on a 2-core AMX Xeon, ResNet-50 ran 6x slower in bf16 and 2x in
    ONNX Runtime, and the pick flipped; kept, it held every later run of that model. A
    timing whose threads waited for a core (Linux says how long) serves its run alone."""
    from wingspan.config import EngineConfig

    _, calls, _ = machine
    monkeypatch.delenv("WINGSPAN_MAX_CORE_WAIT")  # (the suite's, which keeps every choice)
    waited = {"seconds": 0.0, "per_read": 0.0}

    def waiting_seconds():  # each read finds this much more waiting than the one before
        waited["seconds"] += waited["per_read"]
        return waited["seconds"]

    monkeypatch.setattr(engine, "waiting_seconds", waiting_seconds)
    net = model()
    for busy in (True, False):
        waited["per_read"] = 1.0 if busy else 0.0  # (the fixture's clock: ~0.1 s of wall)
        for again in (False, True):  # timed again where the first was not kept
            calls.clear()
            policy = resolve_policy().choose_frozen(net, 32, batch_size=8)
            policy = choose_train(policy, net, stages=2, size=32, batch_size=8)
            timed = busy or not again
            for choice in (policy.frozen, policy.train):
                assert choice.how == ("measured" if timed else "cached")
                if timed:
                    assert choice.cores_shared == busy
                    assert (choice.core_wait > EngineConfig().max_core_wait) == busy
            said = policy.describe()
            assert ("not kept, timed again next time" in said) == busy, said
            assert bool(calls) == timed
    # Timed again beside other work (doctor): the choice stored before stays, and is said
    waited["per_read"] = 1.0
    stored = resolve_policy().choose_frozen(net, 32, batch_size=8).frozen
    again = resolve_policy().choose_frozen(net, 32, batch_size=8, remeasure=True).frozen
    assert again.cores_shared and again.stays == f"{stored.engine.name}, timed " \
        f"{stored.measured_on}"
    assert f"not kept, runs keep the choice stored before ({again.stays})" in again.describe()
    assert resolve_policy().choose_frozen(net, 32, batch_size=8).frozen.how == "cached"
    # $WINGSPAN_MAX_CORE_WAIT sets the share (1: keep every choice, a machine always shared)
    monkeypatch.setenv("WINGSPAN_MAX_CORE_WAIT", "1")
    kept = resolve_policy().choose_frozen(net, 32, batch_size=8, remeasure=True).frozen
    assert kept.core_wait > EngineConfig().max_core_wait and not kept.cores_shared
    monkeypatch.setenv("WINGSPAN_MAX_CORE_WAIT", "lots")
    with pytest.raises(WingspanError, match=r"\$WINGSPAN_MAX_CORE_WAIT is 'lots': a share"):
        engine.max_core_wait()
    # Under a CPU quota the threads wait for it, whatever else runs: not read there; but
    # one of as many cores as threads, or more, holds none back: read
    for quota, read in ((0.5, False), (float(torch.get_num_threads()), True)):
        monkeypatch.setattr(engine, "cpu_quota", lambda quota=quota: quota)
        reads = waited["seconds"]
        with engine.CoreWait() as wait:
            pass
        assert (waited["seconds"] > reads) == read and (wait.share is None or read)


def test_the_core_wait_is_read_from_the_system(tmp_path):
    """Two processes held to one core: the timed one waits about half the time (Linux
    alone says it: elsewhere there is no figure). Alone it waits as long as the suite's
    other work on that core makes it: less, but by how much is the machine's."""
    import subprocess
    import sys

    if not hasattr(os, "sched_setaffinity") or not os.path.exists("/proc/self/task"):
        pytest.skip("the core wait is read from Linux's schedstat")
    core = sorted(os.sched_getaffinity(0))[0]
    script = ("import os, torch\nfrom wingspan.models.engine import CoreWait\n"
              f"os.sched_setaffinity(0, {{{core}}}); torch.set_num_threads(1)\n"
              "with CoreWait() as w:\n    x = 0\n"
              "    for i in range(30_000_000): x += i\nprint(w.share)\n")
    alone = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=300)
    busy = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, "
                             f"{{{core}}})\nwhile True: pass"])
    try:
        shared = subprocess.run([sys.executable, "-c", script], capture_output=True,
                                text=True, timeout=300)
    finally:
        busy.kill()
        busy.wait()
    assert alone.returncode == shared.returncode == 0, alone.stderr + shared.stderr
    assert 0.3 < float(shared.stdout) <= 1 and 0 <= float(alone.stdout) < 1, (
        alone.stdout, shared.stdout)


def test_bf16_rejected_by_the_guard_is_not_trained_in(machine):
    _, _, broken = machine
    broken.add("torch-bf16")
    net = model()
    policy = resolve_policy().choose_frozen(net, 32, batch_size=16)
    assert "torch-bf16" in policy.frozen.rejected
    policy = choose_train(policy, net, stages=2, size=32, batch_size=16)
    assert policy.train.engine.name == "torch-fp32"


def test_the_step_precision_is_guarded_when_frozen_passes_were_forced(machine, monkeypatch):
    """With --runtime onnx nothing timed bf16 for frozen passes; the step's choice must
    still check bf16's features against fp32's before it may train in it."""
    from wingspan.models.runtime import TorchRunner
    from wingspan.training import finetune_engine as step_module

    class Coarse(TorchRunner):  # a bf16 whose features come out wrong
        def __call__(self, x):
            out = super().__call__(x)
            return out.flip(1) if self.dtype == torch.bfloat16 else out

    monkeypatch.setattr(step_module, "TorchRunner", Coarse)
    net = model()
    policy = resolve_policy(runtime="onnx").choose_frozen(net, 32, batch_size=16)
    assert policy.frozen.how == "forced by runtime onnx" and not policy.frozen.changed
    policy = choose_train(policy, net, stages=2, size=32, batch_size=16)
    assert policy.train.engine.name == "torch-fp32"
    assert "torch-bf16" in policy.train.rejected and policy.train.changed["torch-fp32"] == 0


def test_a_resumed_run_keeps_its_engines_where_they_still_run(machine, monkeypatch):
    from wingspan.models import engine as engine_module

    policy = resolve_policy().choose_frozen(model(), 32, 8)
    policy = choose_train(policy, model(), 2, 32, 8)
    records = policy.records()
    resumed = resolve_policy().adopt(records)
    assert resumed.frozen.engine == policy.frozen.engine
    assert resumed.train.how == "as the run began"
    monkeypatch.setattr(engine_module, "cpu_flags", lambda: frozenset({"avx2"}))
    records["train"]["engine"] = "torch-bf16"
    assert resolve_policy().adopt(records).train.engine.name == "torch-fp32"


@pytest.mark.policy
def test_a_run_uses_and_reports_the_engines_it_chose(demo_dir, tmp_path, monkeypatch):
    """Under any policy, forced or measured: the run log's first line names the engines and
    why, and every frozen pass and training step of the run used exactly those."""
    from test_train import tiny

    from wingspan.data import read_dataset
    from wingspan.inference import Predictor
    from wingspan.training import train

    # A cache of its own: the suite's other worker, writing the shared one at the same
    # time, may lose the entries measured here (EngineCache.put), and the run time anew.
    monkeypatch.setenv("WINGSPAN_CACHE", str(tmp_path / "engines"))
    net, _ = create_classifier("test_efficientnet", {"label": 4}, "none")
    known = resolve_policy().choose_frozen(net, 32, 8)  # measured now if nothing is forced,
    choose_train(known, net, net.spec.unfreeze, 32, 8)  # so the run below finds it known
    used, one_pass = [], []
    monkeypatch.setattr(policy_module, "make_runner",
                        lambda m, s, engine, *a, **k: used.append(engine.name) or make_runner(
                            m, s, engine, *a, **k))
    real_one_pass = policy_module.Policy._for_one_pass
    monkeypatch.setattr(policy_module.Policy, "_for_one_pass",
                        lambda *a: one_pass.append(real_one_pass(*a).name) or real_one_pass(*a))
    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, epochs_head=2, epochs_finetune=1),
                    tmp_path / "runs", "r", quiet=True)
    first = (run_dir / "train.log").read_text().splitlines()[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    frozen, step = metrics["engines"]["frozen"], metrics["engines"]["train"]
    assert f"frozen passes {frozen['engine']} (" in first
    assert f"training step {step['engine']} (" in first
    forced = {k: f"{k}={os.environ[k]}" for k in ("WINGSPAN_PRECISION", "WINGSPAN_RUNTIME")
              if os.environ.get(k)}
    for record, by in ((frozen, forced.values()), (step, [forced.get("WINGSPAN_PRECISION")])):
        assert record["how"] == "cached" or record["how"].startswith(
            ("forced by", "the only candidate"))
        if record["how"] != "cached":  # a setting that leaves several engines is not named
            assert all(f in record["how"] for f in by if f)  # the runtime picks no step
    if os.environ.get("WINGSPAN_PRECISION"):
        assert step["engine"].endswith(os.environ["WINGSPAN_PRECISION"])
    if os.environ.get("WINGSPAN_RUNTIME"):
        assert frozen["engine"].startswith(os.environ["WINGSPAN_RUNTIME"])
    # Feature cache, validation, the frozen prefix; but a validation pass, on weights that
    # change right after it, runs on the fastest PyTorch engine measured where an ONNX
    # export would not pay for itself (Policy._for_one_pass).
    assert set(used) == {frozen["engine"], *one_pass}
    assert set(one_pass) <= {frozen["engine"]} | {
        name for name in frozen["images_per_s"] if name.startswith("torch-")
        and name not in frozen["rejected"]}
    used.clear()
    predictor = Predictor(run_dir, workers=0, batch_size=8)  # the key the run measured
    list(predictor.run([str(next(demo_dir.rglob("*.jpg")))], progress=False))
    assert predictor.policy.frozen.engine.name == frozen["engine"]
    assert set(used) == {frozen["engine"]}


def test_a_damaged_or_read_only_engine_cache_costs_a_measurement_not_a_run(tmp_path,
                                                                            monkeypatch):
    """The cache is a convenience: a file that is not JSON (a write cut short on another
    machine's old version, an edit) reads as empty and is written afresh; a folder that
    cannot be written keeps nothing and raises nothing."""
    from wingspan.models.engine import EngineCache

    path = tmp_path / "engines.json"
    path.write_text("{not json")
    cache = EngineCache(path)
    assert cache.get({"kind": "frozen"}) is None
    cache.put({"kind": "frozen"}, {"engine": "onnx-fp32"})
    assert json.loads(path.read_text()) and cache.get({"kind": "frozen"}) == {
        "engine": "onnx-fp32"}
    path.write_text("[1, 2]")  # JSON, but not a table of choices
    assert cache.get({"kind": "frozen"}) is None
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anyway: a file where the folder goes
            locked.chmod(0o700)
            locked.rmdir()
            locked.write_text("a file, not a folder")
        read_only = EngineCache(locked / "engines.json")
        monkeypatch.setattr(engine, "NOT_KEPT", [])
        with pytest.warns(UserWarning, match="Could not keep the engines' timings"):
            assert read_only.put({"kind": "frozen"}, {"engine": "torch-fp32"}) is False
        assert read_only.get({"kind": "frozen"}) is None
        assert engine.NOT_KEPT  # (doctor said "Kept in" it)
        # A cache on a full disk: the disk's error in a line, not its own hint (to resume
        # a training run) nested in the warning
        full = EngineCache(tmp_path / "full" / "engines.json")
        monkeypatch.setattr(engine, "NOT_KEPT", [])

        def no_room(*args, **kwargs):
            raise WingspanError("The disk holding x is full (0 MiB free)", hint="... --resume")

        monkeypatch.setattr(engine, "atomic_path", no_room)
        with pytest.warns(UserWarning, match=r"\(The disk holding x is full \(0 MiB free\)\): "
                                             r"each run .* on a disk with room\.$"):
            assert full.put({"kind": "frozen"}, {"engine": "torch-fp32"}) is False
    finally:
        if locked.is_dir():
            locked.chmod(0o700)


def test_bf16_on_a_gpu_is_asked_of_the_gpu_chosen(monkeypatch):
    """bf16 was asked of the current GPU (torch.cuda.is_bf16_supported), not of --device's:
    on a machine of an A100 (cuda:0) and a T4 (cuda:1), --device cuda:1 timed bf16 on the
    T4, which emulates it. No GPU here: torch's answers for the two are stood in."""
    from wingspan.models.engine import cannot_run, engine_named, native_bf16

    capability = {0: (8, 0), 1: (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: capability[torch.device(device).index or 0])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # cuda:0's
    t4, a100 = torch.device("cuda", 1), torch.device("cuda", 0)
    assert not native_bf16(t4) and native_bf16(a100)
    bf16 = engine_named("torch-bf16")
    assert cannot_run(bf16, t4, train=True) == "this GPU has no bf16"
    assert cannot_run(bf16, a100, train=True) == ""
