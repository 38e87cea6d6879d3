"""Loop throughput: ``trainables.loop.Trainer`` vs a plain hand-written PyTorch loop, microstructure task.

Both train the same model (same seed, same initial weights) on the same preloaded data with the same
batch size, AdamW (lr, weight decay), cosine schedule, gradient clipping and loss (the task's
``training_step``: pixel + gradient + perceptual with solidification weighting), one torch thread, CPU.
Epochs alternate Trainer / plain (after one warm-up epoch each) so machine noise hits both alike;
per-epoch medians are compared.

* train-phase ratio = Trainer's training phase (``run_epoch`` wall − its ``eval_time_s``) ÷ the plain
  loop's epoch. Goal ≤ 1.05.
* metric share = ``metrics_time_s`` (``losses.metrics.evaluate_all``) ÷ ``epoch_time_s``; also the whole
  validation's share (``eval_time_s``: val loss, predictions and metrics). Goal ≤ 5 % for the metrics.
* epoch ratio incl. validation = Trainer ``run_epoch`` ÷ (plain epoch + a plain validation pass that
  computes the val loss only): informative.
"""

from __future__ import annotations

import math
import time
from typing import Any

from benchmarks import common

NAME = "loop_throughput"
GOAL_RATIO = 1.05
GOAL_METRIC_SHARE = 0.05


def config_for(quick: bool) -> dict[str, Any]:
    data = ({"size": 16, "num_sequences": 4, "frames": 6, "seq_length": 2} if quick
            else {"size": 32, "num_sequences": 8, "frames": 10, "seq_length": 3})
    model = {"hidden_channels": [4, 8]} if quick else {"hidden_channels": [16, 32]}
    return {"task": "microstructure", "seed": 0, "epochs": 100, "batch_size": 8, "lr": 1.0e-3, "weight_decay": 1.0e-4,
            "lr_schedule": "cosine", "grad_clip": 1.0, "device": "cpu", "amp": "off", "preload": True,
            "pixel_loss": "mse", "gradient_weight": 0.1, "perceptual_weight": 0.05, "solidification_weighting": True,
            "data": data, "model": model}


class PlainLoop:
    """What one would write by hand: slice batches, forward, loss, backward, clip, step."""

    def __init__(self, config: dict[str, Any]):
        import torch

        from losstune.trainables.config import parse_train_config
        from losstune.trainables.registry import get_task_factory

        cfg = parse_train_config(config)
        torch.manual_seed(cfg.seed)
        self.task = task = get_task_factory(cfg.task)(cfg)
        self.model = task.build_model()
        self.data, self.val = task.train, task.val
        self.bs, self.clip = cfg.batch_size, cfg.grad_clip
        self.n = task.num_train
        self.steps = math.ceil(self.n / self.bs)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=cfg.epochs * self.steps)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0

    def epoch(self) -> float:
        import torch
        self.model.train()
        perm = torch.randperm(self.n, generator=self.gen)
        total_sum = torch.zeros(())
        for i in range(self.steps):
            idx = perm[i * self.bs:(i + 1) * self.bs]
            batch = {k: v[idx] for k, v in self.data.items()}
            total, _ = self.task.training_step(self.model, batch, self.step)
            self.opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.opt.step()
            self.sched.step()
            total_sum += total.detach()
            self.step += 1
        return float(total_sum) / self.steps

    def validate(self) -> float:
        import torch
        self.model.eval()
        n = self.task.num_val
        loss = 0.0
        with torch.no_grad():
            for start in range(0, n, self.bs):
                batch = {k: v[start:start + self.bs] for k, v in self.val.items()}
                loss += float(self.task.training_step(self.model, batch, self.step)[0]) * batch["target"].shape[0]
        return loss / n


def measure(config: dict[str, Any], epochs: int) -> dict[str, Any]:
    from losstune.trainables.loop import Trainer

    trainer = Trainer(config, num_threads=1)
    plain = PlainLoop(config)
    rows: list[dict[str, float]] = []
    for e in range(epochs + 1):  # epoch 0: warm-up of both
        order = (0, 1) if e % 2 == 0 else (1, 0)
        row: dict[str, float] = {}
        for which in order:
            if which == 0:
                t0 = time.perf_counter()
                report = trainer.run_epoch()
                wall = time.perf_counter() - t0
                m = report.metrics
                row.update({"trainer_wall_s": wall, "trainer_train_s": wall - m["eval_time_s"],
                            "trainer_epoch_time_s": m["epoch_time_s"], "trainer_eval_s": m["eval_time_s"],
                            "trainer_metrics_s": m["metrics_time_s"]})
            else:
                t0 = time.perf_counter()
                plain.epoch()
                t1 = time.perf_counter()
                plain.validate()
                t2 = time.perf_counter()
                row.update({"plain_train_s": t1 - t0, "plain_val_s": t2 - t1})
        if e > 0:
            rows.append(row)
    med = {k: common.median(r[k] for r in rows) for k in rows[0]}
    out: dict[str, Any] = {"epochs_measured": len(rows), "num_train": trainer.task.num_train,
                           "num_val": trainer.task.num_val, "median": med, "per_epoch": rows}
    out["train_phase_ratio"] = common.median(r["trainer_train_s"] / r["plain_train_s"] for r in rows)
    out["epoch_ratio_incl_validation"] = common.median(
        r["trainer_wall_s"] / (r["plain_train_s"] + r["plain_val_s"]) for r in rows)
    out["metrics_share"] = common.median(r["trainer_metrics_s"] / r["trainer_epoch_time_s"] for r in rows)
    out["eval_share"] = common.median(r["trainer_eval_s"] / r["trainer_epoch_time_s"] for r in rows)
    return out


def main(argv=None) -> dict[str, Any]:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    started = time.perf_counter()
    common.ensure_repo_on_path()
    common.set_single_thread()
    config = config_for(args.quick)
    epochs = 3 if args.quick else 12
    res = measure(config, epochs)
    med = res["median"]
    rows = [["Trainer.run_epoch (train + validation)", med["trainer_wall_s"], med["trainer_train_s"],
             med["trainer_eval_s"], med["trainer_metrics_s"]],
            ["plain loop (train; val loss only)", med["plain_train_s"] + med["plain_val_s"], med["plain_train_s"],
             med["plain_val_s"], 0.0]]
    text = common.table(["loop", "epoch s", "train phase s", "validation s", "metrics s"], rows)
    summary = common.table(["measure", "value"], [
        ["train-phase ratio Trainer ÷ plain", res["train_phase_ratio"]],
        ["epoch ratio incl. validation", res["epoch_ratio_incl_validation"]],
        ["metrics share of epoch (metrics_time_s ÷ epoch_time_s)", res["metrics_share"]],
        ["validation share of epoch (eval_time_s ÷ epoch_time_s)", res["eval_share"]]])
    print(f"\nLoop throughput: microstructure {config['data']} hidden {config['model']['hidden_channels']}, "
          f"{res['num_train']} train / {res['num_val']} val samples, batch {config['batch_size']}, 1 thread, "
          f"median of {res['epochs_measured']} alternating epochs{' (QUICK)' if args.quick else ''}")
    print(text)
    print(summary)
    goals = [common.goal("Trainer train phase ÷ plain loop", res["train_phase_ratio"], GOAL_RATIO),
             common.goal("metric evaluation share of an epoch", res["metrics_share"], GOAL_METRIC_SHARE)]
    common.print_goals(goals)
    path = common.write_result(NAME, args.out, quick=args.quick, settings={"config": config, "epochs": epochs},
                               results=res, goals=goals, table_text=text + "\n" + summary, started=started)
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
