"""Distillation training of RaBiT students: losses, optimizers, lossless checkpoints and the trainer."""
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint, verify_checkpoint
from .losses import BlockOutputs, DistillLoss, distillation_loss, hidden_mse, kl_divergence
from .optim import OptimConfig, Optimizers, ParamSplit, prepare_student, split_parameters
from .trainer import Trainer, TrainConfig, TrainingDiverged, TrainResult, make_student

__all__ = ["BlockOutputs", "CheckpointError", "DistillLoss", "OptimConfig", "Optimizers", "ParamSplit",
           "TrainConfig", "TrainResult", "Trainer", "TrainingDiverged", "distillation_loss", "hidden_mse",
           "kl_divergence", "latest_checkpoint", "load_checkpoint", "make_student", "prepare_student",
           "save_checkpoint", "split_parameters", "verify_checkpoint"]
