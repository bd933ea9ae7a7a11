"""``galprof train-init SURVEY.yaml --out weights.pt``: train the initial-guess and mask networks
on stamps simulated for a survey (registered by :mod:`galprof.cli`; docs/nn_init.md)."""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch

from .survey import load_survey
from .train import TrainConfig, save_weights, train

log = logging.getLogger("galprof")

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    d = TrainConfig()
    p = subparsers.add_parser(
        "train-init", help="train the neural initial guesses and masks on simulated stamps of a survey",
        description="Simulate stamps of SURVEY.yaml with galprof's renderer and train the initial-guess network "
                    "(physics-informed loss) and the mask network; write both to --out (docs/nn_init.md). "
                    "Defaults take about 25 minutes on one CPU thread.")
    p.add_argument("survey", help="survey description (YAML; see galprof/nn/data/sdss_g.yaml)")
    p.add_argument("--out", required=True, help="weights file to write (.pt)")
    p.add_argument("--n-train", type=int, default=d.n_train, help="training stamps (default %(default)s)")
    p.add_argument("--n-val", type=int, default=d.n_val, help="validation stamps (default %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs of the parameter network (default %(default)s)")
    p.add_argument("--mask-epochs", type=int, default=d.mask_epochs,
                   help="epochs of the mask network (0: no mask network; default %(default)s)")
    p.add_argument("--batch", type=int, default=d.batch, help="batch size (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--lambda-chi2", type=float, default=d.lambda_chi2,
                   help="weight of the chi^2 term (0: MSE on the parameters alone; default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the simulation and training (default 0)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (default %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    return p


def run(args) -> int:
    survey = load_survey(args.survey)
    cfg = TrainConfig(n_train=args.n_train, n_val=args.n_val, epochs=args.epochs, batch=args.batch, lr=args.lr,
                      lambda_chi2=args.lambda_chi2, mask_epochs=args.mask_epochs, seed=args.seed,
                      threads=args.threads)
    cfg.validate()
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    log.info("training on survey %s (%s); load average %.2f, OMP_NUM_THREADS=%s", survey.name, args.survey,
             os.getloadavg()[0], os.environ.get("OMP_NUM_THREADS"))
    weights = train(survey, cfg, masks=args.mask_epochs > 0, device=args.device, dtype=dtype)
    weights["timing"]["load_end"] = os.getloadavg()[0]
    save_weights(weights, args.out)
    log.info("wrote %s (%.1f min; validation %s)", args.out, weights["timing"]["total_s"] / 60,
             json.dumps(weights["metrics"]["init"]["median_abs"]))
    return 0
