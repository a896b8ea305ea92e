"""Does pretraining pay? ``recipes/pretrain_finetune.py`` against the same classifier from scratch.

    python -m benchmarks.pretraining                 # seeds 0-4 (~2 min on 2 cores)
    python -m benchmarks.pretraining --seeds 0,1 --labels 100

For each seed, two runs of the recipe through ``engineflow.run``: as written (pretrain, frozen,
finetune), and with ``pretrained=false`` (the frozen stage starts a fresh encoder and head that
train together for the frozen and finetune epochs, 150 with the defaults, at ``scratch_lr``; its
pretrain stage runs one epoch, whose result it throws away). Both use the same split, labelled
images and classifier. Reported per seed: the finetune stage's best validation accuracy (the run's
main metric), the last epoch's, and the test pass's accuracy; then the means and how many seeds the
pretrained classifier won. This measures accuracy, not speed, so it is not a harness family.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
from pathlib import Path
from typing import Any

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "pretrain_finetune.py"


def one_run(runs_dir: Path, seed: int, pretrained: bool, labels: int | None) -> dict[str, float]:
    import engineflow as ef

    overrides: dict[str, Any] = {"pretrained": pretrained}
    if not pretrained:
        overrides["pretrain_epochs"] = 1
    if labels is not None:
        overrides["labels"] = labels
    result = ef.run(RECIPE, overrides, seed=seed, device="cpu", runs_dir=runs_dir, stream=io.StringIO(), force=True)
    finetune = next(stage for stage in ef.load_run(result.run_id, runs_dir=runs_dir).record["stages"]
                    if stage["name"] == "finetune")
    return {"best_valid": result.best["value"], "last_valid": finetune["metrics"]["finetune/valid/accuracy"],
            "test": result.metrics["test/test/accuracy"], "seconds": result.duration_s}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pretraining", description=__doc__)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--labels", type=int, default=None, help="the labelled budget (default: the recipe's)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            pretrained = one_run(Path(tmp), seed, True, args.labels)
            rows.append((seed, pretrained, one_run(Path(tmp), seed, False, args.labels)))
    print("| seed | pretrained: best valid | last valid | test | scratch: best valid | last valid | test | "
          "margin (best valid) |")
    print("|---|---|---|---|---|---|---|---|")
    for seed, pre, scratch in rows:
        print(f"| {seed} | {pre['best_valid']:.4f} | {pre['last_valid']:.4f} | {pre['test']:.4f} | "
              f"{scratch['best_valid']:.4f} | {scratch['last_valid']:.4f} | {scratch['test']:.4f} | "
              f"{100 * (pre['best_valid'] - scratch['best_valid']):+.1f} |")
    mean = {key: (statistics.mean(r[1][key] for r in rows), statistics.mean(r[2][key] for r in rows))
            for key in ("best_valid", "last_valid", "test", "seconds")}
    print(f"| mean | {mean['best_valid'][0]:.4f} | {mean['last_valid'][0]:.4f} | {mean['test'][0]:.4f} | "
          f"{mean['best_valid'][1]:.4f} | {mean['last_valid'][1]:.4f} | {mean['test'][1]:.4f} | "
          f"{100 * (mean['best_valid'][0] - mean['best_valid'][1]):+.1f} |")
    wins = sum(pre["best_valid"] > scratch["best_valid"] for _, pre, scratch in rows)
    print(f"\npretrained won {wins} of {len(rows)} seeds on best validation accuracy; "
          f"mean run time {mean['seconds'][0]:.1f} s pretrained, {mean['seconds'][1]:.1f} s scratch")


if __name__ == "__main__":
    main()
