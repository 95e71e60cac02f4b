"""BEiT-3 models: the backbone and one class per task head."""
from beit3.models.backbone import Beit3Model
from beit3.models.base import Beit3PreTrainedModel, count_parameters, load_any_model
from beit3.models.captioning import Beit3ForCaptioning
from beit3.models.classification import Beit3ForImageClassification
from beit3.models.convert import CheckpointError
from beit3.models.dense import (
    Beit3ForInstanceSegmentation,
    Beit3ForSemanticSegmentation,
    Beit3VisionBackbone,
    DetectionOutput,
)
from beit3.models.outputs import Beit3ModelOutput, CaptioningOutput, ClassifierOutput, RetrievalOutput
from beit3.models.pretraining import Beit3ForPreTraining, PreTrainingOutput, StreamResult
from beit3.models.retrieval import Beit3ForImageTextRetrieval
from beit3.models.visual_reasoning import Beit3ForVisualReasoning
from beit3.models.vqa import Beit3ForVisualQuestionAnswering

__all__ = [
    "Beit3Model", "Beit3PreTrainedModel", "Beit3ForImageClassification", "Beit3ForVisualQuestionAnswering",
    "Beit3ForVisualReasoning", "Beit3ForImageTextRetrieval", "Beit3ForCaptioning", "Beit3ModelOutput",
    "ClassifierOutput", "RetrievalOutput", "CaptioningOutput", "CheckpointError",
    "load_any_model", "Beit3ForSemanticSegmentation", "Beit3VisionBackbone", "Beit3ForInstanceSegmentation", "DetectionOutput", "count_parameters", "Beit3ForPreTraining", "PreTrainingOutput", "StreamResult",
]
