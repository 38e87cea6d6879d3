"""What ``losstune report`` shows, as typed data: the page's header and its sections, each with its own
content (the leaderboard's rows, the Pareto front, the verification table, the image panel's pairs,
importances ...), its notes and, once drawn, its figure. Built from a sweep by :mod:`search.report_builder`;
:mod:`search.report_figures` draws each section's figure from its content; ``report.html.j2``
lays out the page. Values are raw (numbers, ids, arrays); the page formats them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Union

import numpy as np
import pandas as pd


@dataclass
class LeaderboardRow:
    rank: int
    trial_id: str
    mse_only: bool
    values: dict[str, Any]  # every searched parameter and metric of the leaderboard
    epochs: int
    status: str


@dataclass
class Leaderboard:
    params: list[str]
    metrics: tuple[str, ...]
    rows: list[LeaderboardRow]  # the top trials, best first
    total: int  # trials in the sweep

    @property
    def columns(self) -> list[str]:
        return ["rank", "trial_id", *self.params, *self.metrics, "epochs", "status"]


@dataclass
class ParetoFront:
    metrics: dict[str, str]  # objective metric -> "max" | "min", Optuna's order first
    params: list[str]
    front: pd.DataFrame  # the non-dominated trials
    ranked: pd.DataFrame  # every ranked trial


@dataclass
class VerificationRow:
    trial_id: str
    first: bool  # the config's first row (the one that names it and its mean rank)
    metric: str
    tuned: Mapping[str, Any] | None  # mean, low, high over the seeds
    baseline: Mapping[str, Any] | None
    difference: Mapping[str, Any]  # paired by seed; {} when there is none
    mean_rank: Any
    highlight: bool  # the best config's objective


@dataclass
class Verification:
    sweep_dir: Path
    summary: Mapping[str, Any] | None  # verify/summary.json; None: not verified
    rows: list[VerificationRow] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)  # the metrics of the interval figure

    @property
    def verdict_lines(self) -> list[str]:
        return (self.summary or {}).get("verdict", "").splitlines()


@dataclass
class Panel:
    """Validation samples: image columns (label, N×C×H×W), then for each (label, prediction) of ``compared``
    its gradient difference to ``target``."""
    verified: ClassVar[bool] = False  # the verified winner against its matched baseline (else the sweep's trials)
    columns: list[tuple[str, np.ndarray]]
    compared: list[tuple[str, np.ndarray]]
    target: np.ndarray
    title: str


@dataclass
class VerifiedPanel(Panel):
    verified: ClassVar[bool] = True
    trial: str  # the verified winner, against its matched baseline
    seed: Any


@dataclass
class TrialsPanel(Panel):
    best_id: str
    best_params: str
    mse_id: str | None  # the best MSE-only trial
    mse_shown: bool


@dataclass
class Curves:
    histories: dict[str, list[Mapping[str, Any]]]
    labels: dict[str, str]
    top: int  # the top trials shown
    with_mse: bool  # the best MSE-only trial added after them


@dataclass
class Importance:
    importances: dict[str, dict[str, float]]  # objective -> parameter -> fANOVA importance


@dataclass
class History:
    values: dict[str, list[tuple[int, float]]]  # objective -> (Optuna trial number, value)
    directions: dict[str, str]


@dataclass
class Slices:
    ranked: pd.DataFrame
    params: list[str]
    log: list[str]  # the parameters searched on a log scale
    highlight: dict[str, str]  # trial id -> "best" | "MSE-only"
    order: dict[str, int]  # trial id -> start order


SectionContent = Union[Leaderboard, ParetoFront, Verification, VerifiedPanel, TrialsPanel, Curves, Importance,
                       History, Slices]


@dataclass
class Section:
    key: str  # also the figure's file name and the page anchor
    title: str
    content: SectionContent | None = None  # None: nothing to show but the notes
    notes: list[str] = field(default_factory=list)
    image: Path | None = None  # the figure, once drawn
    inline: bool = True  # show the image in the page (the leaderboard is there as a table already)


@dataclass
class BestTrial:
    trial_id: str
    values: Mapping[str, Any]  # its row of the trials table
    params: str  # its searched values, "name=value, ..."
    best_yaml: Path


@dataclass
class Header:
    name: str
    sweep_dir: Path
    status: str
    status_counts: list[tuple[str, int]]  # (trial status, trials), sorted by status
    trials: int
    objective: str
    task: str
    max_epochs: Any
    experiment: str | None
    parent_run_id: str | None  # None: MLflow was off
    tracking_uri: str | None
    generated: str  # ISO time, UTC
    best: BestTrial | None
    verified_headline: str | None  # None: not verified


@dataclass
class ReportData:
    header: Header
    sections: list[Section]
    best_id: str | None
    mse_id: str | None
    verified: bool
    notes: list[str] = field(default_factory=list)  # about the report as a whole (no study ...)

    def all_notes(self) -> list[str]:
        return self.notes + [note for sec in self.sections for note in sec.notes]
