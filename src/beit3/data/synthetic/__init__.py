"""The built-in synthetic world: seeded scenes of coloured shapes, written in every format the library reads."""
from beit3.data.synthetic.scene import Scene, SceneObject, random_scene, render
from beit3.data.synthetic.world import CLASSES, WORLD_SIZES, WorldSize, generate, write_shards

__all__ = ["CLASSES", "WORLD_SIZES", "Scene", "SceneObject", "WorldSize", "generate", "random_scene", "render", "write_shards"]
