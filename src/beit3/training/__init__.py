"""Training engine: recipes, optimizer policy, the loop, checkpoints and distribution.

Kept apart from ``beit3.models``: models declare ``no_weight_decay()``, ``layer_id(name)`` and
``config.num_layers``; tasks (:class:`TrainTask`) supply model, data, loss and metric; this package
does the rest. ``Trainer(load_config("configs/x.yaml", ["optim.lr=1e-4"]), task).fit()``.
"""
from beit3._lazy import by_module, lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, by_module({
    "beit3.training.config": ("RunConfig", "load_config"),
    "beit3.training.loop": ("Trainer", "TrainResult"),
    "beit3.training.task": ("TrainTask", "build_task", "register_task"),
}))
