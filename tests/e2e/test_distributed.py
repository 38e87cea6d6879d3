"""Issue 4, distributed: a sweep on a real two-node Ray cluster on this machine, driven by the CLI's
``--address``.

The cluster (``ray.cluster_utils.Cluster``: a head and one worker node, one CPU each) lives in a
helper process with its own ``RAY_TMPDIR``, so neither this test process nor anybody else's
``ray.init()`` on the machine can attach to it by accident. Each node has one CPU and a trial needs
one, so two concurrent trials must run on different nodes. On one machine both nodes have the same
IP; the trials are told apart by the Ray node id that losstune records with every result
(``node_id``) and as the child run's tag ``losstune.node_id``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]  # tests/: plugin_task, verify_tasks, conftest

pytestmark = pytest.mark.slow

CLUSTER_SCRIPT = r"""
import json, sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
worker = cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
print(json.dumps({"address": cluster.address, "head": cluster.head_node.node_id, "worker": worker.node_id}),
      flush=True)
sys.stdin.read()  # until the test closes our stdin
cluster.shutdown()
"""


def _env(ray_tmp: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS") and not k.startswith("MLFLOW_TRACKING_")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(Path(__file__).resolve().parent), str(REPO)])  # the plug-in imports on every node
    env["RAY_TMPDIR"] = ray_tmp
    env.setdefault("RAY_DEDUP_LOGS", "0")
    return env


@pytest.fixture
def two_node_cluster():
    """``{"address", "head", "worker"}`` of a running two-node cluster (node ids in hex)."""
    ray_tmp = tempfile.mkdtemp(prefix="ltd", dir="/tmp")  # short: Ray's socket paths live below it
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=_env(ray_tmp), cwd=ray_tmp)
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the cluster did not start (rc {proc.wait(30)})")
        info = json.loads(line)
        info["ray_tmp"] = ray_tmp
        yield info
    finally:
        import ray  # noqa: F401 - Ray ships psutil (ray/thirdparty_files)
        import psutil
        try:
            started = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            started = []
        try:
            proc.stdin.close()
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        _, alive = psutil.wait_procs(started, timeout=5)
        for p in alive:  # what the cluster started and left behind, by pid
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_sweep_runs_on_both_nodes_of_a_cluster(tmp_path, two_node_cluster):
    n, epochs = 4, 2
    cfg = {
        "name": "cluster",
        "train": {"task": "plugin_task:build_slow", "epochs": epochs, "batch_size": 12, "device": "cpu",
                  "amp": "off", "data": {"size": 16, "step_sleep": 0.15}},
        "space": {"lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2},
                  "gradient_weight": {"type": "uniform", "low": 0.0, "high": 0.2}},
        "search": {"sampler": "tpe", "seed": 0, "num_samples": n, "max_concurrent": 2},
        "scheduler": {"type": "fifo"},
        "resources": {"cpu": 1},
        "mlflow": {"experiment": "cluster"},
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    res, sweep_dir = tmp_path / "res", tmp_path / "res" / "cluster"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exe = Path(sys.executable).with_name("losstune")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "losstune.search.cli"]
    address = two_node_cluster["address"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + ["sweep", str(path), "--address", address, "--results-dir", str(res),
                                 "--tracking-uri", uri],
                          capture_output=True, text=True, env=_env(two_node_cluster["ray_tmp"]), cwd=tmp_path,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert time.perf_counter() - t0 < 240

    nodes = {two_node_cluster["head"], two_node_cluster["worker"]}
    assert len(nodes) == 2

    # Tune's results are complete, and each result says which node produced it
    from losstune.search.trials import load_results
    table = load_results(sweep_dir).table
    assert len(table) == n and set(table["status"]) == {"finished"}, table
    used = set()
    for trial in table["trial_id"]:
        lines = (sweep_dir / f"trial_{trial}" / "result.json").read_text().splitlines()
        results = [json.loads(line) for line in lines if line.strip()]
        assert [r["training_iteration"] for r in results] == list(range(1, epochs + 1))
        trial_nodes = {r["node_id"] for r in results}
        assert len(trial_nodes) == 1 and trial_nodes <= nodes, trial_nodes
        used |= trial_nodes
    assert used == nodes, "the trials did not run on both nodes"

    # MLflow: one parent, one complete child per trial, tagged with its node
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("cluster")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("losstune.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == n
    assert {c.data.tags["losstune.trial_id"] for c in children} == set(table["trial_id"])
    tagged = set()
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["losstune.status"] == "finished"
        assert child.data.tags.get("losstune.node_ip")
        tagged.add(child.data.tags["losstune.node_id"])
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "composite"))
        assert steps == list(range(1, epochs + 1))
    assert tagged == nodes
    assert (sweep_dir / "best.yaml").is_file()


# ----- the README's cluster recipe, as separate processes -------------------------------------------
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(check, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: {proc.args[:3]} ended (rc {proc.returncode})")
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not after {timeout:.0f}s")


def _listens(port: int) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _mlflow_answers(uri: str) -> bool:
    """The server answers an API call (its first one can take seconds on a busy machine)."""
    import urllib.request
    try:
        with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=20) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture
def started_processes():
    """``start(cmd, env, log)``: a process in its own process group; at the end each group we started is
    stopped (SIGTERM, then SIGKILL) with whatever it spawned, by pid. Never ``ray stop``."""
    import signal

    import ray  # noqa: F401 - Ray ships psutil (ray/thirdparty_files)
    import psutil
    procs: list[subprocess.Popen] = []

    def start(cmd, env, log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=log.parent, start_new_session=True)  # (mlflow server writes ./mlartifacts)
        procs.append(proc)
        return proc

    yield start
    spawned = []
    for proc in procs:
        try:
            spawned += psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for proc in reversed(procs):  # worker node, then head; mlflow last or first: independent
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in procs:
        try:
            proc.wait(5)  # Ray's nodes and the MLflow server end within a second or two on SIGTERM
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
    _, alive = psutil.wait_procs(spawned, timeout=2)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_the_documented_cluster_path_with_token_authentication(tmp_path, started_processes):
    """README, "Running on a cluster": ``ray start --head`` and ``ray start --address`` as separate
    processes with Ray's token authentication (RAY_AUTH_MODE=token, the token in RAY_AUTH_TOKEN on every
    node and the driver), a real ``mlflow server``, ``losstune sweep --address``. A driver without the
    token gets one line saying what to set; with it the trials run on both nodes and the runs complete.
    Each node has its own ``--temp-dir`` (and RAY_TMPDIR) so no other Ray on the machine attaches to it.
    (~4 min at a load average of 14 on 2 cores, most of it starting the MLflow server and Ray.)"""
    import secrets

    bin_dir = Path(sys.executable).parent
    ray_tmp = tempfile.mkdtemp(prefix="ltk", dir="/tmp")  # short: Ray's socket paths live below it
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` makes
    base = _env(ray_tmp)
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        base.pop(var, None)
    with_token = dict(base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    port, mlflow_port = _free_port(), _free_port()
    try:
        head = started_processes([str(bin_dir / "ray"), "start", "--head", "--block", "--port", str(port),
                                  "--num-cpus", "1", "--include-dashboard", "false", "--temp-dir", f"{ray_tmp}/h"],
                                 with_token, tmp_path / "head.log")
        mlflow = started_processes([str(bin_dir / "mlflow"), "server", "--backend-store-uri",
                                    f"sqlite:///{tmp_path / 'mlflow.db'}", "--host", "127.0.0.1", "--port",
                                    str(mlflow_port), "--workers", "1"],
                                   dict(base, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),  # no job consumers
                                   tmp_path / "mlflow.log")
        _wait_for(lambda: _listens(port), 60, "the head node", [head])
        worker = started_processes([str(bin_dir / "ray"), "start", "--block", "--address", f"127.0.0.1:{port}",
                                    "--num-cpus", "1", "--temp-dir", f"{ray_tmp}/w"],
                                   with_token, tmp_path / "worker.log")
        _wait_for(lambda: "block forever" in (tmp_path / "worker.log").read_text(), 90, "the worker node",
                  [head, worker])
        _wait_for(lambda: _mlflow_answers(f"http://127.0.0.1:{mlflow_port}"), 120, "the MLflow server", [mlflow])

        n, epochs = 4, 2
        cfg = {"name": "tokencluster",
               "train": {"task": "plugin_task:build_slow", "epochs": epochs, "batch_size": 12, "device": "cpu",
                         "amp": "off", "data": {"size": 16, "step_sleep": 0.15}},
               "space": {"gradient_weight": {"type": "uniform", "low": 0.0, "high": 0.2}},
               "search": {"sampler": "tpe", "seed": 0, "num_samples": n, "max_concurrent": 2},
               "scheduler": {"type": "fifo"}, "resources": {"cpu": 1}, "mlflow": {"experiment": "tokencluster"}}
        path = tmp_path / "cluster.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        uri = f"http://127.0.0.1:{mlflow_port}"
        exe = bin_dir / "losstune"
        sweep = [str(exe), "sweep", str(path), "--address", f"127.0.0.1:{port}", "--results-dir",
                 str(tmp_path / "res"), "--tracking-uri", uri]

        # a driver without the token: one line naming what to set, nothing started
        refused = subprocess.run(sweep, capture_output=True, text=True, env=base, cwd=tmp_path, timeout=120)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert refused.stderr.count("\n") == 1 and "RAY_AUTH_MODE=token" in refused.stderr, refused.stderr
        assert "RAY_AUTH_TOKEN" in refused.stderr and "InvalidAuthToken" not in refused.stderr + refused.stdout
        assert not (tmp_path / "res").exists()

        proc = subprocess.run(sweep, capture_output=True, text=True, env=with_token, cwd=tmp_path, timeout=240)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-6000:]
        assert "InvalidAuthToken" not in out
    except Exception:
        for log in ("head.log", "worker.log", "mlflow.log"):
            if (tmp_path / log).is_file():
                print(f"--- {log}\n" + (tmp_path / log).read_text()[-3000:])
        raise
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    from losstune.search.trials import load_results
    sweep_dir = tmp_path / "res" / "tokencluster"
    table = load_results(sweep_dir).table
    assert len(table) == n and set(table["status"]) == {"finished"}, table
    used = set()
    for trial in table["trial_id"]:
        lines = (sweep_dir / f"trial_{trial}" / "result.json").read_text().splitlines()
        used |= {json.loads(line)["node_id"] for line in lines if line.strip()}
    assert len(used) == 2, f"the trials did not run on both nodes: {used}"

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("tokencluster").experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("losstune.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == n and {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["losstune.node_id"] for c in children} == used
