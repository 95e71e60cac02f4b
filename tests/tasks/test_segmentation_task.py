from beit3.cli import main
from tests.data.test_dense import make_segmentation_folder


def test_finetune_segmentation_runs_on_the_engine(tmp_path):
    root = make_segmentation_folder(tmp_path / "data", count=4, size=32)
    code = main([
        "finetune", "--recipe", "configs/tiny_segmentation.yaml", f"data.root={root}",
        f"train.output_dir={tmp_path / 'run'}", "data.batch_size=2", "schedule.epochs=1", "model.image_size=32",
        "task.options.train_images=images", "task.options.train_labels=labels",
        "task.options.val_images=images", "task.options.val_labels=labels", "task.options.out_channels=32",
    ])
    assert code == 0
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("mIoU") >= 1


def test_the_final_folder_loads_as_the_task_model(tmp_path):
    from beit3.models import Beit3ForSemanticSegmentation, load_any_model

    root = make_segmentation_folder(tmp_path / "data", count=2, size=16)
    assert main(["finetune", "--recipe", "configs/tiny_segmentation.yaml", f"data.root={root}",
                 f"train.output_dir={tmp_path / 'run'}", "data.batch_size=2", "schedule.epochs=1",
                 "model.image_size=16", "task.options.train_images=images", "task.options.train_labels=labels",
                 "task.options.val_images=images", "task.options.val_labels=labels",
                 "task.options.out_channels=32"]) == 0
    model = load_any_model(tmp_path / "run" / "final")
    assert isinstance(model, Beit3ForSemanticSegmentation) and model.num_labels == 5
