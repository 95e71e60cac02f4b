"""BEiT-3 end to end: models, tokenizers, processors, pipelines, pretraining and fine-tuning.

The public API is importable from the top level (``from beit3 import Beit3ForCaptioning``). Names
are resolved on first use, so ``import beit3`` stays fast and loads neither torch nor a model.
"""
from __future__ import annotations

from beit3._lazy import lazy_exports

TYPE_CHECKING = False  # not typing's: importing typing would double the cost of `import beit3`

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # models
    "Beit3Config": "beit3.config",
    "Beit3Model": "beit3.models",
    "Beit3PreTrainedModel": "beit3.models",
    "Beit3ForImageClassification": "beit3.models",
    "Beit3ForVisualQuestionAnswering": "beit3.models",
    "Beit3ForVisualReasoning": "beit3.models",
    "Beit3ForImageTextRetrieval": "beit3.models",
    "Beit3ForCaptioning": "beit3.models",
    "Beit3ForSemanticSegmentation": "beit3.models",
    "Beit3ForInstanceSegmentation": "beit3.models",
    "Beit3VisionBackbone": "beit3.models",
    "Beit3ForPreTraining": "beit3.models",
    "CheckpointError": "beit3.models",
    # outputs
    "Beit3ModelOutput": "beit3.models",
    "ClassifierOutput": "beit3.models",
    "RetrievalOutput": "beit3.models",
    "CaptioningOutput": "beit3.models",
    "DetectionOutput": "beit3.models",
    "PreTrainingOutput": "beit3.models",
    # loading any supported checkpoint as the right class
    "load_model": "beit3.auto",
    "Beit3AutoModel": "beit3.auto",
    # processing
    "Beit3Tokenizer": "beit3.processing",
    "Beit3ImageProcessor": "beit3.processing",
    "Beit3Processor": "beit3.processing",
    "BatchEncoding": "beit3.processing.batch",
    "load_image": "beit3.processing",
    "train_tokenizer": "beit3.processing",
    # inference
    "pipeline": "beit3.pipelines",
    "ImageIndex": "beit3.tasks.search",
    "RetrievalEncoder": "beit3.tasks.search",
    # the task catalogue
    "TaskSpec": "beit3.catalogue",
    "get_task": "beit3.catalogue",
    "all_tasks": "beit3.catalogue",
    "register_task": "beit3.catalogue",
}

__getattr__, __dir__, _names = lazy_exports(__name__, _EXPORTS)
__all__ = ["__version__", *_names]


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from beit3.auto import Beit3AutoModel, load_model  # noqa: F401
    from beit3.catalogue import TaskSpec, all_tasks, get_task, register_task  # noqa: F401
    from beit3.config import Beit3Config  # noqa: F401
    from beit3.models import (  # noqa: F401
        Beit3ForCaptioning,
        Beit3ForImageClassification,
        Beit3ForImageTextRetrieval,
        Beit3ForInstanceSegmentation,
        Beit3ForPreTraining,
        Beit3ForSemanticSegmentation,
        Beit3ForVisualQuestionAnswering,
        Beit3ForVisualReasoning,
        Beit3Model,
        Beit3ModelOutput,
        Beit3PreTrainedModel,
        Beit3VisionBackbone,
        CaptioningOutput,
        CheckpointError,
        ClassifierOutput,
        DetectionOutput,
        PreTrainingOutput,
        RetrievalOutput,
    )
    from beit3.pipelines import pipeline  # noqa: F401
    from beit3.processing import Beit3ImageProcessor, Beit3Processor, Beit3Tokenizer, load_image, train_tokenizer  # noqa: F401
    from beit3.processing.batch import BatchEncoding  # noqa: F401
    from beit3.tasks.search import ImageIndex, RetrievalEncoder  # noqa: F401
