"""Writing each trial's pending state into its child run (the writer thread's MLflow calls).

A trial's child run is found before it is made (the runs book, else a search by the tags
``losstune.trial_id`` + ``mlflow.parentRunId``), so a restart or a resume never makes a second one,
and its id is saved in ``mlflow_runs.json`` at once. Each epoch's ``predictions.png`` and its
``predictions.webp`` thumbnail (both made by the trial) become an MLflow image series, filed under the
names ``MlflowClient.log_image(key=..., step=...)`` would use but without its decode / re-encode /
resize (~30 ms per image, benchmarks/mlflow_cost.py).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from typing import Mapping

from losstune.search.status import TrialStatus
from losstune.search.tracking.pending import PendingWrites, TrialState
from losstune.search.tracking.run import STATUS_TAG, RunHandle
from losstune.search.tracking.runs_file import RunsBook
from losstune.search.tracking.store import artifact_repository, missing_params

logger = logging.getLogger("losstune.tracking")

STAGE_TAG = "stage"  # every child run: "search" (a sweep trial) or "verify" (a verification run)
TRIAL_TAG = "losstune.trial_id"
PARENT_TAG = "mlflow.parentRunId"
IMAGE_KEY = "predictions"  # the image series' key in the MLflow UI
METRICS_EVERY_S = 5.0  # a running trial's metrics reach MLflow at least this often (Ray's results have them)


def thumbnail_of(png: bytes) -> bytes:
    """MLflow's image-series thumbnail of a PNG (for trials that sent none)."""
    import io

    from PIL import Image

    from losstune.search.artifacts import save_thumbnail
    out = io.BytesIO()
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        save_thumbnail(image, out)
    return out.getvalue()


class ChildRuns:
    """The child runs of one sweep (or verification round) in one experiment, under one parent run.

    ``tracking_uri``: the store of ``client`` when the client is an in-process ``MlflowClient``; a run's
    artifacts then go straight to its artifact repository once its artifact URI is known
    (:func:`~losstune.search.tracking.store.artifact_repository`), else through ``client.log_artifacts``.
    """

    def __init__(self, client, experiment_id: str | None, parent_run_id: str | None, tags: Mapping[str, str],
                 book: RunsBook, tracking_uri: str | None = None):
        self.client = client
        self.tracking_uri = tracking_uri
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.tags = dict(tags)
        self.book = book
        self.num_batches = 0  # log_batch calls of metrics

    def find(self, trial_id: str) -> RunHandle | None:
        """The trial's child run already in the store, if any."""
        filt = f"tags.`{TRIAL_TAG}` = '{trial_id}'"
        if self.parent_run_id:
            filt += f" and tags.`{PARENT_TAG}` = '{self.parent_run_id}'"
        runs = self.client.search_runs([self.experiment_id], filter_string=filt, max_results=1)
        return RunHandle(self.client, runs[0].info.run_id, runs[0].info.artifact_uri) if runs else None

    def sync(self, pending: PendingWrites, everything: bool = False) -> None:
        """Write what is pending (raises on the first MLflow failure: what was not written stays pending).

        A run's params, tags, metrics and images go out together in one ``log_batch`` and one upload, at most
        :data:`METRICS_EVERY_S` after the run was made or its last batch: one batch carries several results (its
        fixed cost is most of a batch's cost), and a trial shorter than that costs one batch in all. A trial's end
        and ``everything`` (a flush, the end of the sweep) do not wait.
        """
        now = time.monotonic()
        for state in list(pending.trials.values()):
            if state.run_id is None and (state.started or state.metrics or state.end):
                self._open(state)
            if state.run_id is not None:
                self._write(state, everything or now - state.written_at >= METRICS_EVERY_S)

    def _open(self, state: TrialState) -> None:
        # a trial this sweep first saw now, and whose entry is on disk, cannot have a run yet (runs are
        # made only after that save): no search for it, unless a create_run was sent and failed (the store
        # may have made the run before the answer was lost)
        new = self.book.new_and_saved(state.trial_id) and not state.create_tried
        run = None if new else self.find(state.trial_id)
        if run is None:
            tags = {TRIAL_TAG: state.trial_id, STAGE_TAG: "search", **self.tags}
            if self.parent_run_id:
                tags[PARENT_TAG] = self.parent_run_id
            state.create_tried = True
            run = RunHandle.create(self.client, self.experiment_id, state.name, tags)
            state.params_pending = missing_params(state.params, {})  # sent with the run's first batch
        else:
            state.reopen = True
        state.written_at = time.monotonic()
        state.run_id, state.artifact_uri = run.run_id, run.artifact_uri
        self.book.set_run_id(state.trial_id, state.run_id)
        self.book.save()  # before anything else: a driver killed from here on finds the run again

    def _write(self, state: TrialState, batch_due: bool) -> None:
        """When ``batch_due`` or the trial ends: one ``log_batch`` (params, metrics, tags: the status tag too
        when the run ends) and one artifact upload (the image series; the files when the trial ends); then the
        run's end."""
        from mlflow.entities import Param, RunTag
        run = RunHandle(self.client, state.run_id, state.artifact_uri)
        if state.reopen:
            if state.end is None:
                RunHandle.reopen(self.client, state.run_id)
                state.tags[STATUS_TAG] = TrialStatus.RUNNING.value
            # a driver killed before the run's first batch left it without params: they go with the next batch
            if state.params:
                state.params_pending = missing_params(state.params, self.client.get_run(state.run_id).data.params)
            state.reopen = False
        tags = {**state.tags, STATUS_TAG: state.end.value} if state.end else state.tags
        # DATA_PARAMS: the same value on every result of a trial, logged once
        params = {**state.params_pending, **{k: str(v) for k, v in state.data_params.items()}}
        if (batch_due or state.end) and (state.metrics or tags or params):
            run.log_batch(metrics=state.metrics, params=[Param(k, v) for k, v in params.items()],
                          tags=[RunTag(k, v) for k, v in tags.items()])
            self.num_batches += 1
            state.written_at = time.monotonic()
            state.data_params_logged.update(state.data_params)
            state.metrics, state.tags, state.params_pending, state.data_params = [], {}, {}, {}
        # the image series (every epoch's image, uploaded with the metrics' batch: one upload per batch); the
        # newest predictions.png / config.yaml once, when the trial ends
        if (state.images and (batch_due or state.end)) or (state.files and state.end):
            self._log_artifacts(run, state)
        if state.end:
            run.terminate(state.end.run_status)
            state.end = None
            state.started = False

    def _log_artifacts(self, run: RunHandle, state: TrialState) -> None:
        """The pending images as MLflow's image series and, when the trial ends, its files: one upload.

        The images are named as ``MlflowClient.log_image(key=..., step=...)`` names them (the UI's image chart
        reads that layout), but the trial's PNG bytes go as they are and its thumbnail is used when it sent
        one: ``log_image`` would decode, re-encode (~20 ms) and make the thumbnail (~10 ms) per image here.
        """
        images = list(state.images)
        files = dict(state.files) if state.end else {}
        if state.config_logged:
            files.pop("config.yaml", None)
        with tempfile.TemporaryDirectory(prefix="losstune-artifacts-") as tmp:
            if images:
                os.mkdir(os.path.join(tmp, "images"))
            for step, ts, png, thumbnail in images:
                stem = os.path.join(tmp, "images", f"{IMAGE_KEY}+step+{step}+timestamp+{ts}+{uuid.uuid4()}")
                try:
                    webp = thumbnail if thumbnail is not None else thumbnail_of(png)
                except (ImportError, OSError, ValueError) as err:  # an unreadable image: skip it, not the run
                    logger.warning("trial %s: predictions image of step %s not logged: %s", state.trial_id, step, err)
                    continue
                with open(stem + ".png", "wb") as f:
                    f.write(png)
                with open(stem + "+compressed.webp", "wb") as f:
                    f.write(webp)
            for name, data in files.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            repository = None
            if self.tracking_uri is not None and run.artifact_uri is not None:
                repository = artifact_repository(run.artifact_uri, self.tracking_uri)
            if repository is not None:
                repository.log_artifacts(tmp)
            else:
                run.log_artifacts(tmp)
        del state.images[:len(images)]
        if state.end:
            state.config_logged = state.config_logged or "config.yaml" in files
            state.files = {}
