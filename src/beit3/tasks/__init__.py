"""Fine-tuning tasks: what the training engine needs for each benchmark, and their metrics.

* One module per task (``classification``, ``vqav2``, ``nlvr2``, ``retrieval``, ``captioning``,
  ``segmentation``, ``detection``), each declaring its :class:`beit3.catalogue.TaskSpec` on its
  task class. The catalogue imports ``BUILTIN_TASK_MODULES`` (with the pretraining tasks ``mdm``
  and ``itc`` of :mod:`beit3.pretraining.task`) on first use; importing this package alone loads
  none of them, so ``beit3 search`` or ``beit3 evaluate --help`` do not pay for every task.
* ``beit3.tasks.metrics``: top-k accuracy, VQA accuracy and soft score, retrieval recall, CIDEr-D
  and the COCO caption toolkit, the VQA submission file.
"""
BUILTIN_TASK_MODULES = (
    "beit3.tasks.captioning", "beit3.tasks.classification", "beit3.tasks.detection", "beit3.tasks.nlvr2",
    "beit3.tasks.retrieval", "beit3.tasks.segmentation", "beit3.tasks.vqav2", "beit3.pretraining.task",
)
