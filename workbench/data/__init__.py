"""Datasets: sources, the common :class:`Dataset` type, image decoding and few-shot sampling."""
from .dataset import Dataset, Sample, readable_name
from .images import UnreadableImage, open_rgb, to_rgb
from .sampling import FewShotSplit, sample_few_shot
from .sources import from_arrays, from_csv, from_folder, from_hub, from_hub_archive, from_npz, load_user_data
from .synthetic import synthetic_leaves, synthetic_shapes

__all__ = ["Dataset", "Sample", "readable_name", "UnreadableImage", "open_rgb", "to_rgb", "FewShotSplit",
           "sample_few_shot", "from_arrays", "from_csv", "from_folder", "from_hub", "from_npz",
           "synthetic_shapes", "synthetic_leaves", "from_hub_archive", "load_user_data"]
