"""Fine-tuning tasks: what the training engine needs for each benchmark, and their metrics.

* One module per task (``classification``, ``vqav2``, ``nlvr2``, ``retrieval``, ``captioning``,
  ``segmentation``, ``detection``), each declaring its :class:`beit3.catalogue.TaskSpec` on its
  task class. Importing this package registers them, and the pretraining tasks (``mdm``, ``itc``)
  of :mod:`beit3.pretraining.task`, in the catalogue.
* ``beit3.tasks.metrics``: top-k accuracy, VQA accuracy and soft score, retrieval recall, CIDEr-D
  and the COCO caption toolkit, the VQA submission file.
"""
from beit3.tasks import captioning, classification, detection, nlvr2, retrieval, segmentation, vqav2  # noqa: F401
from beit3.pretraining import task as _pretraining  # noqa: F401,E402
