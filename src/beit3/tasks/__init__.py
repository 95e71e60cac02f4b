"""Fine-tuning tasks: what the training engine needs for each benchmark, and their metrics.

* ``beit3.tasks.metrics``: top-k accuracy, VQA accuracy and soft score, NLVR2 accuracy, retrieval
  recall, CIDEr-D and the COCO caption toolkit, the VQA submission file.
* One module per task (``classification``, ``vqav2``, ``nlvr2``, ``retrieval``, ``captioning``),
  each registering its ``TrainTask`` with ``beit3.training.task.register_task``.
"""
