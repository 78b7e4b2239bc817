"""``ensemble.build --mlflow``: the run, its metrics, params and artifacts read back from a local
store; MLFLOW_TRACKING_URI; a deleted experiment; and the clear failure without mlflow."""
from __future__ import annotations

import json
import os
import sys

import pytest

from covid_ray.tracking import MLFLOW_EXTRA, tracking_uri
from test_ensemble_build import FAST, make_search, untrained  # noqa: F401  (untrained is a fixture)

QUICK = [*FAST, "--export", "none", "--lung-cam-images", "0"]
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_DISABLE_TELEMETRY")


@pytest.fixture
def mlflow_env():
    """No tracking URI from the machine; MLflow variables the code sets are put back afterwards."""
    saved = {k: os.environ.get(k) for k in MLFLOW_ENV}
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_tracking_uri_is_the_experiment_store_unless_the_environment_names_one(tmp_path, mlflow_env):
    assert tracking_uri(tmp_path / "exp") == (tmp_path / "exp" / "mlruns").resolve().as_uri()
    assert tracking_uri(tmp_path / "exp").startswith("file:///")
    os.environ["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:5000"
    assert tracking_uri(tmp_path / "exp") == "http://127.0.0.1:5000"


def test_metrics_keep_real_class_names_and_leave_out_undefined_values():
    from ensemble.tracking import ensemble_metrics

    row = {"recall": 0.5, "specificity": 0.75}
    metrics = {
        "ensemble": {"accuracy": 0.8, "macro_f1": 0.7, "balanced_accuracy": 0.6, "roc_auc_macro": None,
                     "ece": 0.05, "nll": 0.4, "per_class": {"Viral Pneumonia": row, "COVID": {**row, "recall": None}},
                     "ci95": {"sensitivity/Viral Pneumonia": [0.25, 0.75]}},
        "calibration": {"temperature": 1.5, "val": {"nll_before": 0.5, "nll_after": 0.45}},
    }
    got = ensemble_metrics(metrics)
    assert got["test_sensitivity_Viral_Pneumonia"] == 0.5 and got["test_specificity_COVID"] == 0.75
    assert got["test_sensitivity_Viral_Pneumonia_ci95_high"] == 0.75 and got["val_nll_after"] == 0.45
    assert "test_roc_auc_macro" not in got and "test_sensitivity_COVID" not in got  # null in metrics.json
    assert got["temperature"] == 1.5 and len(got) == 13  # 5 test + 3 per class + 2 bounds + T + 2 val


@pytest.mark.slow  # a whole build (about 20 s on 2 cores), for a run made by the CLI as a user makes it
def test_build_logs_a_run_beside_the_search(easy_split, untrained, tmp_path, capsys, mlflow_env):  # noqa: F811
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from ensemble.build import main
    from ensemble.tracking import log_ensemble_run

    folder = make_search(tmp_path / "tiny-search", easy_split, untrained, ["u0", "u1"])
    assert main(["--top", "2", "--results-dir", str(folder), "--mlflow", *QUICK]) == 0
    out = capsys.readouterr().out
    ens = folder / "ensemble"
    m = json.loads((ens / "metrics.json").read_text())

    store = (folder / "mlruns").as_uri()
    assert f"in experiment 'tiny-search' at {store}" in out
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("tiny-search")  # the search's name, as its trials use
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and f"run {run.info.run_id}" in out

    got, e, cal = run.data.metrics, m["ensemble"], m["calibration"]
    assert got["test_macro_f1"] == e["macro_f1"] and got["test_accuracy"] == e["accuracy"]
    assert got["test_ece"] == e["ece"] and got["test_nll"] == e["nll"]
    assert got["temperature"] == cal["temperature"]
    assert got["val_nll_before"] == cal["val"]["nll_before"] and got["val_nll_after"] == cal["val"]["nll_after"]
    assert got["val_ece_after"] == cal["val"]["ece_after"]
    for c in ("COVID", "Normal"):
        assert got[f"test_sensitivity_{c}"] == e["per_class"][c]["recall"]
        assert got[f"test_specificity_{c}"] == e["per_class"][c]["specificity"]
    assert [got["test_macro_f1_ci95_low"], got["test_macro_f1_ci95_high"]] == e["ci95"]["macro_f1"]

    params = run.data.params
    assert params["top"] == "2" and params["method"] == m["method"] and params["calibration"] == "temperature"
    assert params["members"] == ",".join(r["trial_id"] for r in m["members"]) and params["synthetic"] == "True"
    assert run.data.tags["synthetic"] == "true" and "SYNTHETIC" in run.data.tags["mlflow.note.content"]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    expected = {"report.md", "metrics.json", "confusion_matrix.png", "roc.png", "reliability.png"}
    if (ens / "MODEL_CARD.md").is_file():
        expected.add("MODEL_CARD.md")
    assert expected <= artifacts and artifacts <= expected | {p.name for p in ens.glob("*.png")}
    copy = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))
    assert json.loads(open(copy).read()) == m

    # MLFLOW_TRACKING_URI takes the run elsewhere; the experiment's own store is left alone.
    other = (tmp_path / "central").as_uri()
    os.environ["MLFLOW_TRACKING_URI"] = other
    logged = log_ensemble_run(folder, ens, m)
    assert logged.tracking_uri == other and len(client.search_runs([experiment.experiment_id])) == 1
    central = MlflowClient(tracking_uri=other)
    assert central.get_run(logged.run_id).data.metrics["test_macro_f1"] == e["macro_f1"]

    # A deleted experiment is named, not silently resurrected.
    central.delete_experiment(logged.experiment_id)
    with pytest.raises(ValueError, match="'tiny-search' is deleted"):
        log_ensemble_run(folder, ens, m)


def test_without_mlflow_the_flag_fails_before_building(easy_split, untrained, tmp_path,  # noqa: F811
                                                       capsys, monkeypatch, mlflow_env):
    from ensemble.build import main

    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an install without the extra looks like
    folder = make_search(tmp_path / "no-mlflow", easy_split, untrained, ["u0", "u1"])
    assert main(["--top", "2", "--results-dir", str(folder), "--mlflow", *QUICK]) == 2
    err = capsys.readouterr().err
    assert MLFLOW_EXTRA in err and "pip install 'covid-ray[mlflow]'" in err
    assert not (folder / "ensemble").exists()  # failed fast: nothing was built
