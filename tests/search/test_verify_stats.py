"""The verification's statistics against a hand-computed case, and its verdict on real short trainings of
plug-in tasks where a shaping term is known to matter (tests/verify_tasks.py) or cannot (no Ray needed)."""

from __future__ import annotations

import math

import pytest

from losstune.search.verify_plan import shaping_weights, with_seed
from losstune.search.verify_stats import summarize
from losstune.search.verify_verdict import NO_DIFFERENCE, config_verdict, significant, verdict
from losstune.trainables.terms import matched_baseline

T_975_2DOF = 4.302652729911275  # Student's t, 97.5 % quantile, 2 degrees of freedom (3 seeds)


def _records(trial_id, tuned, baseline, seeds=(11, 12, 13)):
    out = []
    for arm, values in (("tuned", tuned), ("baseline", baseline)):
        for seed, v in zip(seeds, values):
            out.append({"trial_id": trial_id, "arm": arm, "seed": seed,
                        "metrics": {"composite": v, "mse": 1 - v, "epoch": 3.0, "epoch_time_s": 0.1}})
    return out


def test_summary_matches_hand_computed_numbers():
    # A: tuned 0.50 0.60 0.70, baseline 0.45 0.50 0.65 -> differences 0.05 0.10 0.05
    # B: tuned 0.55 0.65 0.62, baseline 0.40 0.50 0.46 -> differences 0.15 0.15 0.16
    s = summarize(_records("A", [0.50, 0.60, 0.70], [0.45, 0.50, 0.65])
                  + _records("B", [0.55, 0.65, 0.62], [0.40, 0.50, 0.46]))
    assert s["seeds"] == [11, 12, 13]
    assert s["metrics"] == ["composite", "mse"]  # every metric the runs report; epoch / timings are not metrics
    b, a = s["configs"]  # best tuned mean first: B 0.6067 > A 0.6
    assert (a["trial_id"], b["trial_id"]) == ("A", "B")

    # A's tuned mean: 0.6, sd 0.1 -> half-width t * 0.1 / sqrt(3)
    half = T_975_2DOF * 0.1 / math.sqrt(3)
    tuned = a["tuned"]["composite"]
    assert tuned["mean"] == pytest.approx(0.6)
    assert (tuned["low"], tuned["high"], tuned["n"]) == (pytest.approx(0.6 - half), pytest.approx(0.6 + half), 3)
    # A's paired difference: mean 1/15, sd sqrt(((-1/60)^2 * 2 + (1/30)^2) / 2) = 0.0288675
    sd = math.sqrt(((-1 / 60) ** 2 * 2 + (1 / 30) ** 2) / 2)
    half = T_975_2DOF * sd / math.sqrt(3)
    diff = a["difference"]["composite"]
    assert diff["mean"] == pytest.approx(1 / 15)
    assert (diff["low"], diff["high"]) == (pytest.approx(1 / 15 - half), pytest.approx(1 / 15 + half))
    assert diff["low"] < 0 < diff["high"] and not diff["excludes_zero"]  # [-0.0050, +0.1384]
    # B's: mean 0.46/3, sd 0.0057735 -> [0.1390, 0.1677], excludes 0
    sd = math.sqrt(((-1 / 300) ** 2 * 2 + (2 / 300) ** 2) / 2)
    half = T_975_2DOF * sd / math.sqrt(3)
    diff = b["difference"]["composite"]
    assert (diff["mean"], diff["low"], diff["high"]) == (pytest.approx(0.46 / 3), pytest.approx(0.46 / 3 - half),
                                                         pytest.approx(0.46 / 3 + half))
    assert diff["excludes_zero"]
    # mse = 1 - composite: its difference is the negative, same width
    assert b["difference"]["mse"]["mean"] == pytest.approx(-0.46 / 3)
    # ranks per seed by the tuned composite: seed 11 B (0.55) > A (0.50); 12 B > A; 13 A (0.70) > B (0.62)
    assert a["ranks"] == {11: 2.0, 12: 2.0, 13: 1.0} and b["ranks"] == {11: 1.0, 12: 1.0, 13: 2.0}
    assert a["mean_rank"] == pytest.approx(5 / 3)

    words = verdict(s, {"A": {"gradient_weight": 0.2}, "B": {"gradient_weight": 0.1}})
    assert words.splitlines()[0].startswith("verified winner: trial B, composite 0.6067")
    assert "best of the 2 configs on 2 of 3 seeds" in words.splitlines()[0]
    assert words.splitlines()[1].startswith("loss weights of trial B (gradient_weight 0.1) improve composite by "
                                            "+0.1533 [+0.139, +0.1677]")
    assert "other metrics whose paired interval excludes 0: mse -0.1533" in words.splitlines()[1]
    assert NO_DIFFERENCE in words.splitlines()[2] and "composite +0.06667 [-0.005044, +0.1384]" in words
    assert words.splitlines()[3] == ("(each interval is 95 % on its own: with 2 configs, one of them excluding 0 "
                                     "by chance alone has a probability of up to 10 %)")
    assert significant(s, "B") and not significant(s, "A")


def test_verdict_words_for_worse_and_pixel_only():
    s = summarize(_records("W", [0.40, 0.50, 0.45], [0.50, 0.61, 0.56])
                  + _records("P", [0.5, 0.6, 0.7], [0.5, 0.6, 0.7]))
    by_id = {c["trial_id"]: c for c in s["configs"]}
    worse = config_verdict(by_id["W"], "composite", {"gradient_weight": 0.3})
    assert "make composite worse by -0.1067" in worse and not significant(s, "W")
    # a pixel-only config is its own baseline: differences exactly 0, nothing claimed
    assert by_id["P"]["difference"]["composite"]["low"] == by_id["P"]["difference"]["composite"]["high"] == 0
    assert "is pixel-only itself" in config_verdict(by_id["P"], "composite", {"gradient_weight": 0.0})


def test_one_seed_gives_no_interval():
    s = summarize(_records("A", [0.5], [0.4], seeds=(1,)))
    assert s["configs"][0]["difference"]["composite"]["low"] is None
    assert "no interval" in config_verdict(s["configs"][0], "composite", {"gradient_weight": 0.2})


def _verify_by_training(task: str) -> dict:
    """The verification's numbers for one config on 3 fresh seeds, from real (short) trainings."""
    import torch

    from losstune.trainables.loop import train
    config = {"task": task, "epochs": 5, "batch_size": 4, "lr": 0.05, "device": "cpu", "amp": "off",
              "pixel_weight": 1.0, "gradient_weight": 1.0, "data": {"size": 16}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        records = [{"trial_id": "t1", "arm": arm, "seed": seed,
                    "metrics": train(with_seed(c, seed, config["epochs"])).metrics}
                   for arm, c in (("tuned", config), ("baseline", matched_baseline(config))) for seed in (1, 2, 3)]
    finally:
        torch.set_num_threads(threads)
    s = summarize(records)
    return {"summary": s, "verdict": verdict(s, {"t1": shaping_weights(config)})}


@pytest.fixture
def plugin_tasks_importable(monkeypatch):
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))


def test_a_term_that_matters_is_significant(plugin_tasks_importable):
    # the pixel term only sees 4x4 averages: the gradient term is what teaches the edges
    v = _verify_by_training("verify_tasks:build")
    assert significant(v["summary"], "t1"), v["verdict"]
    assert "loss weights of trial t1 (gradient_weight 1) improve composite by +" in v["verdict"]


def test_a_term_that_cannot_matter_is_no_significant_difference(plugin_tasks_importable):
    # the gradient term has no gradient (detached prediction): the same model trains either way
    v = _verify_by_training("verify_tasks:build_inert")
    assert not significant(v["summary"], "t1")
    assert NO_DIFFERENCE in v["verdict"], v["verdict"]
