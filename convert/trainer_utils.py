"""What the build's trainers share around transformers' Trainer: the command-line
flags of a training run, resuming from the newest checkpoint, and a wall-clock
limit for machines lent by the minute.

A run that reaches ``--time-limit`` minutes stops after its current step and saves
a checkpoint, so ``Trainer.train(resume_from_checkpoint=...)`` continues it; the
trainers record in their ``metrics.json`` whether the limit cut them short.
"""

import time
from pathlib import Path
from typing import Optional


def add_training_args(p, learning_rate: float, num_train_epochs: float, save_steps: int):
    """Adds the flags :func:`convert.finetune.train_and_evaluate` reads (transformers'
    ``TrainingArguments`` names) to the parser ``p``, with these defaults."""
    p.add_argument("--max-examples", type=int, default=None, help="Train on a seeded random subset")
    p.add_argument("--learning-rate", type=float, default=learning_rate)
    p.add_argument("--num-train-epochs", type=float, default=num_train_epochs)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--eval-steps", type=int, default=100)
    p.add_argument("--save-steps", type=int, default=save_steps)
    p.add_argument("--bf16", action="store_true")
    p.add_argument(
        "--time-limit", type=float, default=None, help="Minutes of training before it stops"
    )


def latest_checkpoint(output_dir: Path) -> Optional[str]:
    """The newest ``checkpoint-N`` in ``output_dir`` by step (not by name: 1000 > 250)."""
    found = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return str(found[-1]) if found else None


def time_limit_callback(minutes: float):
    """A ``TrainerCallback`` that stops training ``minutes`` after it is made."""
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        def __init__(self):
            self.deadline = time.monotonic() + minutes * 60
            self.reached = False

        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() >= self.deadline:
                self.reached = True
                control.should_training_stop = True
                control.should_save = True
            return control

    return TimeLimit()
