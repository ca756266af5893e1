"""nnU-Net trainer with a small budget, for side-by-side training timings with autoseg.

benchmarks/nnunet_env.sh copies this file to the top of nnU-Net's trainer package
(``nnunetv2/training/nnUNetTrainer/autoseg_budget_trainer.py``), where nnU-Net's
recursive class lookup finds it; its own variant trainers import timm/torchvision,
which do not load beside the CPU torch. Rerun nnunet_env.sh after editing this file.

Everything but the budget is nnU-Net's default ``nnUNetTrainer``. The budget comes from
environment variables set by benchmarks/nnunet_train_timing.py (defaults in brackets):
AUTOSEG_BENCH_EPOCHS [3], AUTOSEG_BENCH_ITERATIONS [20], AUTOSEG_BENCH_VAL_ITERATIONS [2].

Two additions, both outside the timed training iterations:

* "Train time: X s" is written to the training log after each epoch's training
  iterations (nnU-Net's own "Epoch time" also covers the validation iterations);
* the final full-volume validation is skipped: the benchmark compares training.
"""

import os
import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_autosegBench(nnUNetTrainer):
    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 - nnU-Net's own signature
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("AUTOSEG_BENCH_EPOCHS", 3))
        self.num_iterations_per_epoch = int(os.environ.get("AUTOSEG_BENCH_ITERATIONS", 20))
        self.num_val_iterations_per_epoch = int(os.environ.get("AUTOSEG_BENCH_VAL_ITERATIONS", 2))
        self._train_started = None

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._train_started = time.perf_counter()

    def on_train_epoch_end(self, train_outputs):
        self.print_to_log_file(f"Train time: {time.perf_counter() - self._train_started:.3f} s")
        super().on_train_epoch_end(train_outputs)

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("autoseg benchmark: final validation skipped")
