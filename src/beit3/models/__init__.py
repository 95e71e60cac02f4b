"""BEiT-3 models: the backbone and one class per task head."""
from beit3._lazy import by_module, lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, by_module({
    "beit3.models.backbone": ("Beit3Model",),
    "beit3.models.base": ("Beit3PreTrainedModel", "count_parameters", "load_any_model"),
    "beit3.models.captioning": ("Beit3ForCaptioning",),
    "beit3.models.classification": ("Beit3ForImageClassification",),
    "beit3.models.convert": ("CheckpointError",),
    "beit3.models.dense": ("Beit3ForInstanceSegmentation", "Beit3ForSemanticSegmentation", "Beit3VisionBackbone",
                           "DetectionOutput"),
    "beit3.models.outputs": ("Beit3ModelOutput", "CaptioningOutput", "ClassifierOutput", "ModelOutput",
                             "RetrievalOutput"),
    "beit3.models.pretraining": ("Beit3ForPreTraining", "PreTrainingOutput", "StreamResult"),
    "beit3.models.retrieval": ("Beit3ForImageTextRetrieval",),
    "beit3.models.visual_reasoning": ("Beit3ForVisualReasoning",),
    "beit3.models.vqa": ("Beit3ForVisualQuestionAnswering",),
}))
