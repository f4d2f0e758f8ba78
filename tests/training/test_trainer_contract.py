"""The parts of ``transformers.Trainer`` that ``PackloraTrainer`` overrides or relies on, pinned.

A new transformers that renames a private method or changes its arguments would otherwise make an
override silently dead (the stock method runs instead: no atomic checkpoints, no per-example loss).
When this test fails, read the new ``Trainer`` source and adapt ``training/trainer.py`` or
``training/loss.py``, then update the expectations here."""
import inspect

import pytest
import transformers
from transformers import Trainer

from packlora.training.trainer import PackloraTrainer

# name -> the parameter names packlora's override is written against
OVERRIDDEN = {
    "_get_output_dir": ["self", "trial"],
    "_save_checkpoint": ["self", "model", "trial"],
    "_finalize_training": ["self", "trial", "num_train_samples", "start_time"],
    "_get_num_items_in_batch": ["self", "batch_samples", "device"],
    "compute_loss": ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
    "training_step": ["self", "model", "inputs", "num_items_in_batch"],
    "prediction_step": ["self", "model", "inputs", "prediction_loss_only", "ignore_keys"],
    "evaluation_loop": ["self", "dataloader", "description", "prediction_loss_only", "ignore_keys", "metric_key_prefix"],
    "log": ["self", "logs", "start_time"],
}


@pytest.mark.parametrize("name", sorted(OVERRIDDEN))
def test_overridden_trainer_method_still_exists_with_the_same_arguments(name):
    assert hasattr(Trainer, name), (
        f"transformers {transformers.__version__} has no Trainer.{name}; PackloraTrainer overrides it "
        "(training/trainer.py, training/loss.py): find what replaced it and move the override there")
    got = list(inspect.signature(getattr(Trainer, name)).parameters)
    assert got == OVERRIDDEN[name], (
        f"transformers {transformers.__version__} changed Trainer.{name}{tuple(got)}; packlora's override "
        f"expects {tuple(OVERRIDDEN[name])}: adapt training/trainer.py (or loss.py) to it")
    assert getattr(PackloraTrainer, name) is not getattr(Trainer, name)  # the override is really in place


def test_the_stock_checkpoint_save_still_asks_get_output_dir_and_records_the_best_checkpoint():
    """The atomic save redirects the stock save through ``_get_output_dir`` and renames the best
    checkpoint afterwards; both hooks must still be in ``Trainer._save_checkpoint``."""
    source = inspect.getsource(Trainer._save_checkpoint)
    assert "self._get_output_dir(" in source, "Trainer._save_checkpoint no longer asks _get_output_dir"
    assert "self.state.best_model_checkpoint" in source, "Trainer._save_checkpoint no longer sets the best checkpoint"


def test_the_stock_end_of_training_cleanup_still_runs_only_at_save_total_limit_1():
    """``PackloraTrainer._finalize_training`` skips the cleanup by setting ``save_total_limit`` to None
    for the call; that works only while the stock method tests for exactly 1."""
    source = inspect.getsource(Trainer._finalize_training)
    assert "self.args.save_total_limit == 1" in source
