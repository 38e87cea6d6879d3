"""Issue 17, the habits of sweep users: a re-runnable demo, KEY=VALUE overrides, --dry-run, ``ls``,
``trials --format json``, ``--resume RESULTS_DIR``, the MLflow environment's precedence, and a
tracking pre-check that goes through MLflow's own client (TLS and auth settings honoured).

Everything is real: the sweeps run on the session's local Ray, log to MLflow on SQLite in the test's
folder; the pre-check tests talk to real HTTP(S) servers on 127.0.0.1.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import ssl
import sys
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from losstune.search.cli import main
from losstune.search.config import load_sweep

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"
TINY = ["train.epochs=1", "search.num_samples=2", "search.points_to_evaluate=[]"]


@pytest.fixture
def workdir(tmp_path, clean_env):
    """An empty working directory: ``results/`` and the default MLflow store land here."""
    work = tmp_path / "work"
    work.mkdir()
    clean_env.chdir(work)
    return work


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ----- make demo, twice -----------------------------------------------------------------------------
def test_the_demo_command_works_every_time(workdir, ray_local, capsys, mlflow_runs):
    """The Makefile's demo target is the README's, and that command (on the smoke config, tiny) runs
    twice: two results folders, two parent runs, and the second run's printed commands point at its own
    folder. The overrides are recorded; ``ls`` and ``trials --format json`` read the sweeps back."""
    recipe = re.search(r"^demo:.*\n\t(.+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert recipe == ".venv/bin/losstune sweep configs/quickstart.yaml"
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "configs/quickstart.yaml" in readme
    argv = shlex.split(recipe)[1:]
    assert argv[:1] == ["sweep"]

    outs = []
    for _ in range(2):
        assert main(["sweep", str(SMOKE), *TINY]) == 0
        outs.append(capsys.readouterr().out)
    first, second = workdir / "results" / "smoke", workdir / "results" / "smoke-2"
    assert (first / "best.yaml").is_file() and (second / "best.yaml").is_file()
    assert f"{first} exists (continue it with: losstune sweep --resume {first}); this sweep is 'smoke-2'" in outs[1]
    follow_ups = [line for line in outs[1].splitlines() if "losstune " in line and "[losstune]" in line
                  and ("train " in line or "trials " in line or "report " in line)]
    assert len(follow_ups) == 3 and all(str(second) in line for line in follow_ups), follow_ups
    assert str(first) + "/" not in outs[1] and str(first) + " " not in outs[1].split("this sweep is")[1]

    uri = f"sqlite:///{workdir / 'results' / 'mlflow.db'}"  # the default store, below the working directory
    parents = [r for r in mlflow_runs(uri, "losstune-smoke") if r.data.tags.get("losstune.kind") == "sweep"]
    assert sorted(r.info.run_name for r in parents) == ["smoke", "smoke-2"]
    assert {r.info.status for r in parents} == {"FINISHED"}
    for parent in parents:  # provenance of the overrides
        assert parent.data.tags["losstune.overrides"] == " ".join(TINY)
        assert parent.data.params["train.epochs"] == "1" and parent.data.params["search.num_samples"] == "2"
    info = json.loads((second / "sweep.json").read_text())
    assert info["overrides"] == {"train.epochs": 1, "search.num_samples": 2, "search.points_to_evaluate": []}
    assert info["parent_run_id"] != json.loads((first / "sweep.json").read_text())["parent_run_id"]
    best = yaml.safe_load((second / "best.yaml").read_text())
    assert best["provenance"]["overrides"] == info["overrides"] and best["provenance"]["sweep"] == "smoke-2"
    saved = yaml.safe_load((second / "sweep.yaml").read_text())
    assert saved["name"] == "smoke-2" and saved["train"]["epochs"] == 1

    # ls: both, finished, best, and verified once the verification stage wrote its summary
    (second / "verify").mkdir(exist_ok=True)
    (second / "verify" / "summary.json").write_text("{}")
    assert main(["ls", "--format", "json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in listing] == ["smoke", "smoke-2"]
    assert [s["status"] for s in listing] == ["finished", "finished"]
    assert [s["trials"] for s in listing] == [2, 2]
    assert [s["verified"] for s in listing] == [False, True]
    assert all(isinstance(s["best_composite"], float) for s in listing)
    assert main(["ls"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["NAME", "STATUS", "TRIALS"] and len(table) == 3
    assert table[2].startswith("smoke-2") and " yes " in table[2]

    assert main(["trials", str(second), "--format", "json"]) == 0
    trials = json.loads(capsys.readouterr().out)
    assert len(trials) == 2 and {t["status"] for t in trials} == {"finished"}
    assert trials[0]["composite"] >= trials[1]["composite"]
    assert trials[0]["trial_id"] == listing[1]["best_trial"]

    # a finished sweep resumed by its folder alone: nothing left to run, the same trials
    assert main(["sweep", "--resume", str(second)]) == 0
    capsys.readouterr()
    assert len(json.loads((second / "mlflow_runs.json").read_text())) == 2


def test_a_chosen_name_that_exists_is_refused_with_both_ways_on(workdir, capsys):
    existing = workdir / "results" / "mine"
    existing.mkdir(parents=True)
    (workdir / "results" / "mine-2").mkdir()
    rc = main(["sweep", str(SMOKE), "--name", "mine", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert f"losstune sweep --resume {existing}" in err and "--name mine-3" in err, err
    assert _files(workdir) == ["results", "results/mine", "results/mine-2"]


# ----- overrides ------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, expected", [
    ("search.samples=3", "search.samples: unknown key"),
    ("train.epochz=3", "train.epochz"),
    ("train.epochs=many", "train.epochs"),
    ("resources.gpu=-1", "resources.gpu"),
    ("train.epochs.max=3", "train.epochs.max: cannot set it: train.epochs is not a mapping"),
    ("space.epochs={type: uniform, low: 1, high: 3}", "space.epochs: cannot be searched"),
    ("space.lr={type: loguniform", "override space.lr: the value"),
    ("epochs", "override 'epochs': expected KEY=VALUE"),
])
def test_a_bad_override_exits_2_naming_it_and_writes_nothing(workdir, capsys, override, expected):
    rc = main(["sweep", str(SMOKE), override])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("losstune: error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert _files(workdir) == []


def test_overrides_are_yaml_typed_and_a_flag_wins(workdir):
    from losstune.search.config import parse_overrides
    sets = parse_overrides(["train.epochs=3", "train.lr=1.0e-3", "train.model.hidden_channels=[8, 8]",
                            "space.lr={type: loguniform, low: 1.0e-4, high: 1.0e-2}", "mlflow.experiment="])
    assert sets == {"train.epochs": 3, "train.lr": 1e-3, "train.model.hidden_channels": [8, 8],
                    "space.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}, "mlflow.experiment": None}
    sweep = load_sweep(SMOKE, sets=sets, overrides={"num_samples": 5})
    assert sweep.epochs == 3 and sweep.base_train["model"]["hidden_channels"] == [8, 8]
    assert sweep.search.num_samples == 5 and sweep.params["lr"].describe() == "loguniform[0.0001, 0.01]"
    assert sweep.overrides == sets
    # a flag beats the same key given as KEY=VALUE
    assert load_sweep(SMOKE, sets={"search.num_samples": 3}, overrides={"num_samples": 7}).search.num_samples == 7


def test_overrides_may_follow_options(workdir, capsys):
    assert main(["sweep", str(SMOKE), "--dry-run", "--name", "late", "train.epochs=2", "search.num_samples=3"]) == 0
    plan = yaml.safe_load(capsys.readouterr().out.split("# plan\n")[1].split("# search space")[0])
    assert plan["name"] == "late" and plan["trials"]["epochs"] == 2 and plan["trials"]["num_samples"] == 3
    assert main(["trials", "somewhere", "train.epochs=2"]) == 2  # only sweep takes KEY=VALUE
    assert "unrecognized arguments: train.epochs=2" in capsys.readouterr().err
    assert main(["ls", str(workdir / "nothing")]) == 2
    assert "nothing: no such folder" in capsys.readouterr().err


def test_dry_run_validates_prints_the_plan_and_leaves_nothing(workdir, capsys):
    import ray
    ray_before = ray.is_initialized()
    rc = main(["sweep", str(SMOKE), "train.epochs=1", "resources.cpu=1", "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert _files(workdir) == [], "the dry run wrote something"
    assert ray.is_initialized() == ray_before, "the dry run started Ray"
    out = captured.out
    plan = yaml.safe_load(out.split("# plan\n")[1].split("# search space")[0])
    assert plan["name"] == "smoke" and plan["results"] == str(workdir / "results" / "smoke")
    assert plan["trials"]["num_samples"] == 4 and plan["trials"]["epochs"] == 1 and plan["trials"]["at_once"] >= 1
    assert plan["resources_per_trial"] == {"cpu": 1.0, "gpu": 0.0}
    assert plan["tracking"]["tracking_uri"] == f"sqlite:///{workdir / 'results' / 'mlflow.db'}"
    assert plan["tracking"]["experiment"] == "losstune-smoke" and plan["overrides"] == "train.epochs=1 resources.cpu=1"
    space = yaml.safe_load(out.split("# search space\n")[1].split("# resolved config")[0])
    assert set(space["searched"]) == {"gradient_weight", "lr", "model.hidden_channels"}
    resolved = yaml.safe_load(out.split("# resolved config\n")[1])
    assert resolved["train"]["epochs"] == 1

    # what the real run refuses, the dry run refuses: exit 2, one line, still nothing on disk
    for argv, expected in (
            (["sweep", "missing.yaml", "--dry-run"], "missing.yaml: no such file"),
            (["sweep", str(SMOKE), "resources.cpu=64", "--dry-run"], "resources: a trial asks for more"),
            (["sweep", str(SMOKE), "--dry-run", "--tracking-uri", f"http://127.0.0.1:{_free_port()}"],
             "is unreachable"),
            (["sweep", str(SMOKE), "--dry-run", "--address", f"127.0.0.1:{_free_port()}"], "Ray: cannot start"),
            (["sweep", str(SMOKE), "--dry-run", "--resume"], "nothing to resume")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, (argv, err)
    assert _files(workdir) == []


# ----- tracking: precedence and the pre-check -------------------------------------------------------
def test_shipped_configs_leave_tracking_to_the_environment():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        mlflow = (yaml.safe_load(path.read_text()) or {}).get("mlflow") or {}
        assert "tracking_uri" not in mlflow, path


def test_tracking_precedence_cli_config_env_default(workdir, clean_env):
    cfg = yaml.safe_load(SMOKE.read_text())
    del cfg["mlflow"]
    path = workdir.parent / "noml.yaml"
    path.write_text(yaml.safe_dump(cfg))
    def resolved(config_uri=None, config_exp=None, cli_uri=None, cli_exp=None):
        sets = {"mlflow.tracking_uri": config_uri, "mlflow.experiment": config_exp}
        sweep = load_sweep(path, overrides={"tracking_uri": cli_uri, "experiment": cli_exp},
                           sets={k: v for k, v in sets.items() if v}, check_task=False)
        return sweep.tracking_uri, sweep.experiment

    default = (f"sqlite:///{workdir / 'results' / 'mlflow.db'}", "losstune")
    assert resolved() == default
    clean_env.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    clean_env.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert resolved() == (f"sqlite:///{workdir / 'env.db'}", "from-env")
    assert resolved("http://127.0.0.1:1", "from-config") == ("http://127.0.0.1:1", "from-config")
    assert resolved("http://127.0.0.1:1", "from-config", "http://127.0.0.1:2", "from-cli") == \
        ("http://127.0.0.1:2", "from-cli")


def test_the_environment_reaches_a_real_sweep(workdir, clean_env, ray_local, capsys, mlflow_runs):
    """$MLFLOW_TRACKING_URI and $MLFLOW_EXPERIMENT_NAME, with a config that sets neither (as shipped)."""
    cfg = yaml.safe_load(SMOKE.read_text())
    del cfg["mlflow"]
    path = workdir / "envsweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    uri = f"sqlite:///{workdir.parent / 'env.db'}"
    clean_env.setenv("MLFLOW_TRACKING_URI", uri)
    clean_env.setenv("MLFLOW_EXPERIMENT_NAME", "env-experiment")
    assert main(["sweep", str(path), "train.epochs=1", "search.num_samples=1", "search.points_to_evaluate=[]"]) == 0
    capsys.readouterr()
    runs = mlflow_runs(uri, "env-experiment")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert not (workdir / "results" / "mlflow.db").exists()


class _FakeTrackingServer(http.server.BaseHTTPRequestHandler):
    """Answers MLflow's experiments/search only to ``Authorization: Bearer s3cret``."""

    def do_GET(self):  # noqa: N802
        self._answer()

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer()

    def _answer(self):
        ok = self.headers.get("Authorization") == "Bearer s3cret"
        body = json.dumps({"experiments": []} if ok else {"error_code": "UNAUTHENTICATED"}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def https_server(tmp_path):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate: ``(url, cert_path)``."""
    import shutil
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeTrackingServer)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", cert
    server.shutdown()
    server.server_close()


# the insecure part of this test asks for an unverified request: urllib3's warning about it is the expected outcome
@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_the_pre_check_honours_mlflows_tls_and_auth_settings(https_server, clean_env):
    """A private CA (MLFLOW_TRACKING_SERVER_CERT_PATH), MLFLOW_TRACKING_INSECURE_TLS and a token
    (MLFLOW_TRACKING_TOKEN) reach the pre-check, because it asks through MLflow's client."""
    from losstune.search.tracking import TrackingUnavailable, check_tracking
    url, cert = https_server
    retries_before = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    for var in ("MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_TOKEN"):
        clean_env.delenv(var, raising=False)
    with pytest.raises(TrackingUnavailable, match="unreachable: .*(SSL|certificate)"):
        check_tracking(url, timeout=3)
    clean_env.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(cert))
    with pytest.raises(TrackingUnavailable, match="refused the credentials"):
        check_tracking(url, timeout=3)
    clean_env.setenv("MLFLOW_TRACKING_TOKEN", "s3cret")
    check_tracking(url, timeout=3)
    clean_env.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
    clean_env.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    check_tracking(url, timeout=3)
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") == retries_before  # the probe's own settings undone


# ----- a user's project with its own losses/, search/, trainables/ ----------------------------------
USER_LOSSES = '''"""The user's own losses package (same name as losstune's, which lives at losstune.losses)."""
import torch

def l1(pred, target, **_):
    return (pred - target).abs().mean()
'''
USER_SEARCH = '''"""The user's own search package: losstune must not import it."""
raise ImportError("the user's search package was imported by losstune")
'''
USER_TASK = '''"""A plug-in task in the user's trainables package, using the user's losses package."""
import plugin_task  # losstune's test plug-in: the data and model
from losstune.losses.combined import WeightedLoss
from losses import l1

def build(config):
    task = plugin_task.build(config)
    loss = WeightedLoss({"pixel": l1}, {"pixel": config.pixel_weight})
    task.training_step = lambda model, batch, step: loss(step, pred=model(batch["input"]), target=batch["target"])
    return task
'''


def test_a_user_project_with_its_own_losses_search_trainables_packages(tmp_path):
    """With the user's ``losses``, ``search`` and ``trainables`` packages first on PYTHONPATH, a sweep
    of the user's plug-in (which imports the user's ``losses``) runs to the end: losstune imports only
    its own ``losstune.*`` packages."""
    project = tmp_path / "project"
    for package, text in (("losses", USER_LOSSES), ("search", USER_SEARCH), ("trainables", "")):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text(text)
    (project / "trainables" / "my_task.py").write_text(USER_TASK)
    cfg = {"name": "mine", "train": {"task": "trainables.my_task:build", "epochs": 1, "batch_size": 12,
                                     "device": "cpu", "amp": "off", "data": {"size": 16}},
           "space": {"lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
           "search": {"num_samples": 2, "max_concurrent": 2}, "scheduler": {"type": "fifo"},
           "mlflow": {"experiment": "mine"}}
    (project / "sweep.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env["PYTHONPATH"] = os.pathsep.join([str(project), str(REPO / "tests")])  # the user's packages first
    exe = Path(sys.executable).with_name("losstune")
    proc = subprocess.run([str(exe), "sweep", "sweep.yaml", "ray.num_cpus=2"], capture_output=True, text=True,
                          cwd=project, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "Traceback" not in out
    info = json.loads((project / "results" / "mine" / "sweep.json").read_text())
    assert info["status"] == "finished" and (project / "results" / "mine" / "best.yaml").is_file()
