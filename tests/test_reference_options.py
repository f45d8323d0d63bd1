"""Faithfulness differences found by the method audit (issue 28): each method follows its reference
by default, and the earlier behaviour stays available as an option."""
import pytest
import torch

import workbench as wb
from workbench.data import sample_few_shot, synthetic_shapes
from workbench.task import FewShotTask


@pytest.fixture(scope="module")
def small32():
    return synthetic_shapes(3, train_per_class=6, val_per_class=2, test_per_class=3, image_size=32)


def _task(ds, backbone, shots=2, seed=1):
    return FewShotTask(ds, sample_few_shot(ds, shots, seed), backbone, wb.FeatureCache(backbone, None, show_progress=False),
                       templates=["a photo of a {}."])


# -- BiomedCoOp: the text tower in train mode (dropout active) while the context learns ---------

@pytest.mark.parametrize("train_mode", [True, False])
def test_biomedcoop_trains_with_the_text_tower_in_the_references_mode(biomed_like, small32, train_mode, quiet):
    task = _task(small32, biomed_like)
    task.descriptions = {c: [f"a photo of a {c}.", f"{c}."] for c in task.class_names}
    modes = []
    hook = biomed_like.model.text.transformer.register_forward_hook(lambda m, i, o: modes.append(m.training))
    try:
        bio = wb.get_method("biomedcoop", epochs=2, batch_size=4, warmup_epochs=0, augment_views=1,
                            train_mode=train_mode).fit(task)
    finally:
        hook.remove()
    assert wb.get_method("biomedcoop").config.train_mode is True            # the reference's default
    drop = [m for m in biomed_like.model.text.modules() if isinstance(m, torch.nn.Dropout)]
    assert drop and drop[0].p > 0                                            # the BERT tower has dropout
    steps = bio.fit_info["steps"]
    assert steps >= 2 and sum(modes) == (steps if train_mode else 0)         # every training step, or none
    assert modes[-1] is False                                                # the classifier: eval mode
    assert not any(m.training for m in biomed_like.model.modules())          # the shared backbone is left in eval


# -- LP++: the epoch chosen on K validation images per class (reference) via val_shots=K --------

def test_lp_plus_plus_selects_on_k_validation_images_with_val_shots_k(backbone, quiet):
    data = synthetic_shapes(3, train_per_class=10, val_per_class=8, test_per_class=2, name="lpp_val")
    params = {"epochs": 20}
    default = wb.run_experiment(data, backbone, "lp_plus_plus", 8, 1, method_params=params)
    reference = wb.run_experiment(data, backbone, "lp_plus_plus", 8, 1, method_params=params, val_shots=8)
    assert default.method.fit_info["val_per_class"] == 4 and default.record["split"]["val_shots"] == 4
    assert reference.method.fit_info["val_per_class"] == 8 and reference.record["split"]["val_shots"] == 8
    assert reference.record["split"]["train_ids"] != [] and reference.row["run_id"] != default.row["run_id"]
