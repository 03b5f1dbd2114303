"""What the conditional demo's model can do, measured. ``make demo`` trains a class-conditional Glow on the
digits (runs/demo-conditional); this script trains its unconditional twin (the same config with
``conditional=False``) and reports, on the held-out split:

    test bits/dim        -log2 p(x | y) / D of the conditional model (what the demo prints), its marginal
                         -log2 Σ_y p(y) p(x | y) / D (p(y): the training split's class shares), and the
                         unconditional twin's -log2 p(x) / D; dequantisation noise seeded as in training
    classify accuracy    model.classify on the held-out digits (argmax of the auxiliary classifier)
    sample recognition   per-class samples at temperature 0.7, quantised to the 17 levels, labelled by a
                         scikit-learn logistic regression fitted on the training split's 17-level pixels:
                         the share recognised as the class they were drawn for (and that classifier's own
                         accuracy on the real held-out digits, for scale)
    training time        wall seconds of each run (from its checkpoint) and the CPU seconds of the twin's

    python -m benchmarks.studies.conditional_demo_check [--run runs/demo-conditional] [--twin runs/demo-unconditional]
                                                [--json F]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from fastglow.app import checkpoint as ckpt_io
from fastglow.app.classes import classification_accuracy, split_labels
from fastglow.app.config import TrainConfig
from fastglow.app.data import dequantize, digit_levels, split_dataset, to_levels, to_pixels
from fastglow.app.labels import load_labels
from fastglow.app.distributed import Dist
from fastglow.app.loop import train
from fastglow.app.objective import build_model, evaluate

TEMPERATURE = 0.7
SAMPLES_PER_CLASS = 100


def load_run(out) -> tuple[torch.nn.Module, TrainConfig, dict]:
    """The newest checkpoint of a finished run folder -> (model in eval mode, its config, the checkpoint)."""
    found, _ = ckpt_io.scan_checkpoints(out)
    if found is None:
        raise SystemExit(f"{out}: no checkpoint; run `make demo` first")
    ckpt = found[1]
    cfg = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in TrainConfig.__dataclass_fields__})
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg, ckpt


def digits_split(cfg: TrainConfig):
    """The run's (train, test) digit levels and labels (the split of its config)."""
    levels = digit_levels()
    labels, _ = load_labels("digits", levels.shape[0])
    train_set, test_set = split_dataset(levels, cfg.test_fraction, torch.Generator().manual_seed(cfg.split_seed))
    train_labels, test_labels = split_labels(labels, cfg.test_fraction, cfg.split_seed)
    return train_set, test_set, train_labels, test_labels


@torch.no_grad()
def marginal_bits_per_dim(model, levels, class_share: torch.Tensor, n_bins: int, seed: int) -> float:
    """-log2 Σ_y p(y) p(x | y) / D averaged over ``levels`` (one dequantisation draw, seeded as ``evaluate``)."""
    x = dequantize(levels, n_bins, torch.Generator().manual_seed(seed))
    n_dims = math.prod(x.shape[1:])
    per_class = []
    for c in range(class_share.shape[0]):
        log_p, logdet, _ = model(x, torch.full((x.shape[0],), c, dtype=torch.int64))
        per_class.append(log_p + logdet + math.log(class_share[c]))
    log_px = torch.logsumexp(torch.stack(per_class), 0) - n_dims * math.log(n_bins)
    return float((-log_px / (n_dims * math.log(2))).mean())


@torch.no_grad()
def sample_recognition(model, train_set, train_labels, test_set, test_labels, n_bins: int, per_class: int,
                       seed: int = 0) -> dict:
    """Share of per-class samples at T=0.7 a logistic regression on the 17-level training pixels labels right."""
    from sklearn.linear_model import LogisticRegression

    def features(levels):  # levels 0..n_bins-1 scaled to [0, 1] (the solver converges faster)
        return levels.flatten(1).numpy() / (n_bins - 1)

    judge = LogisticRegression(max_iter=5000).fit(features(train_set), train_labels.numpy())
    n_classes = model.n_classes
    y = torch.arange(n_classes).repeat_interleave(per_class)
    images = model.sample(y.shape[0], TEMPERATURE, img_size=train_set.shape[-1], y=y,
                          generator=torch.Generator().manual_seed(seed))
    levels = to_levels(to_pixels(images, n_bins), n_bins)
    predicted = torch.from_numpy(judge.predict(features(levels)))
    hits = (predicted == y).float()
    return {"sample_recognition": float(hits.mean()),
            "sample_recognition_per_class": [round(float(h.mean()), 3) for h in hits.view(n_classes, -1)],
            "judge_accuracy_on_held_out": float(judge.score(features(test_set), test_labels.numpy()))}


def train_twin(cfg: TrainConfig, twin_out) -> dict:
    """The unconditional twin of a run (same config, conditional=False), trained or resumed -> timing."""
    options = {k: v for k, v in vars(cfg).items() if k not in ("n_bins", "n_classes", "class_names")}
    options.update(conditional=False, out=str(twin_out), progress=False, resume=True)
    cpu, wall = time.process_time(), time.perf_counter()
    summary = train(options)
    return {"twin_cpu_s_this_call": round(time.process_time() - cpu, 1),
            "twin_wall_s_this_call": round(time.perf_counter() - wall, 1), "twin_elapsed_s": summary["elapsed_s"]}


def measure(run, twin, per_class: int = SAMPLES_PER_CLASS) -> dict:
    """Every figure of the module docstring for the conditional run folder ``run`` (the twin goes to ``twin``)."""
    model, cfg, ckpt = load_run(run)
    if not cfg.conditional or cfg.data != "digits":
        raise SystemExit(f"{run}: not a class-conditional digits run")
    result = {"run": str(run), "step": ckpt["step"], "elapsed_s": round(ckpt.get("elapsed", 0.0), 1)}
    result.update(train_twin(cfg, twin))
    twin_model = load_run(twin)[0]
    train_set, test_set, train_labels, test_labels = digits_split(cfg)
    dist = Dist(0, 1, torch.device("cpu"))
    share = torch.bincount(train_labels, minlength=cfg.n_classes).double() / train_labels.shape[0]
    result.update(
        test_bpd=evaluate(model, test_set, cfg.n_bins, cfg.eval_batch, cfg.seed, dist, test_labels),
        test_bpd_marginal=marginal_bits_per_dim(model, test_set, share, cfg.n_bins, cfg.seed),
        twin_test_bpd=evaluate(twin_model, test_set, cfg.n_bins, cfg.eval_batch, cfg.seed, dist),
        classify_accuracy=classification_accuracy(model, test_set, test_labels, cfg.n_bins, cfg.eval_batch,
                                                  "cpu"),
        **sample_recognition(model, train_set, train_labels, test_set, test_labels, cfg.n_bins, per_class))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/demo-conditional", help="the conditional run (default: make demo's)")
    p.add_argument("--twin", default="runs/demo-unconditional", help="where the unconditional twin trains")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    result = measure(Path(args.run), Path(args.twin))
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
