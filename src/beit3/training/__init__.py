"""Training engine: recipes, optimizer policy, the loop, checkpoints and distribution.

Kept apart from ``beit3.models``: models declare ``no_weight_decay()``, ``layer_id(name)`` and
``config.num_layers``; tasks (:class:`TrainTask`) supply model, data, loss and metric; this package
does the rest. ``Trainer(load_config("configs/x.yaml", ["optim.lr=1e-4"]), task).fit()``.
"""
from beit3.training.config import RunConfig, load_config
from beit3.training.loop import Trainer, TrainResult
from beit3.training.task import TrainTask, build_task, register_task

__all__ = ["RunConfig", "TrainResult", "TrainTask", "Trainer", "build_task", "load_config", "register_task"]
