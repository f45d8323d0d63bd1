"""Writes the tutorial notebooks in notebooks/ (run: python tools/build_notebooks.py)."""
from pathlib import Path

from nbtools import build

QUICKSTART = [
    ("md", """# 00 · Quickstart: zero-shot vs. linear probe, K shots, several seeds

This notebook loads a backbone and a dataset, samples K-shot splits, and compares adaptation
methods with mean ± std over seeds.

**About the defaults.** They run offline on two CPU cores in under a minute:
`backbone="workbench-tiny"` is a small *randomly initialised* open_clip model shipped with the
package, and `whu_rs19_mini` is 10 real WHU-RS19 images per class. They **demonstrate the
workflow only** — the tiny model has never seen a caption, so its zero-shot accuracy is chance.
For real numbers change one parameter: `backbone="ViT-B-16-quickgelu", pretrained="openai"`
(or a domain CLIP such as `"hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"`).

Run it in batch with other parameters, from any folder:
`papermill notebooks/00_quickstart.ipynb out.ipynb -p dataset pneumoniamnist_mini -p shots "[1, 4]"`""", []),
    ("code", """backbone: str = "workbench-tiny"  # open_clip architecture, 'hf-hub:ORG/REPO' or 'local-dir:PATH', e.g. "ViT-B-16-quickgelu"
pretrained: str = ""  # pretrained tag or checkpoint path, e.g. "openai"; "" = the offline default's seeded random weights
dataset: str = "whu_rs19_mini"  # a dataset name from domains/ (see wb.list_datasets()) or a YAML path
shots: list[int] = [1, 2, 4]  # K, support images per class
seeds: list[int] = [1, 2, 3]  # few-shot sampling seeds; results are mean ± std over these
methods: list[str] = ["zero_shot", "linear_probe"]  # methods to compare (see wb.available_methods())
device: str = "auto"  # auto, cpu, cuda, mps
output_dir: str = "outputs/quickstart"  # results, split files and feature cache; relative to the repository root""",
     ["parameters"]),
    ("code", """import workbench as wb

params = wb.notebook.check_parameters(globals(), "00_quickstart.ipynb")  # unknown name or bad value -> clear error
out = wb.resolve(output_dir)""", []),
    ("md", "## Load the backbone and the dataset", []),
    ("code", """model = wb.load_backbone(backbone, pretrained, device=device)
model""", []),
    ("code", """data = wb.load_dataset(dataset)
print(data.describe())
data.counts().T""", []),
    ("md", """## Compare methods across shots and seeds

Each run samples (or reuses) the K-shot split file for its seed, fits on the support and K-shot
validation images only, and is scored on the whole test split. Features are encoded once and
cached on disk.""", []),
    ("code", """cache = wb.FeatureCache(model, out / "features")
results = wb.compare(data, model, methods, shots, seeds, cache=cache, split_dir=out / "splits", out_dir=out)
results.head()""", []),
    ("code", """wb.summarize(results, data.metric)""", []),
    ("code", """wb.report.plot_accuracy_vs_shots(results, data.metric);""", []),
    ("md", """Every run's provenance (split ids, templates, backbone weights hash, package versions, device)
is in `outputs/quickstart/runs/<run_id>/provenance.json`; all rows are in `results.csv`.""", []),
    ("code", """print(out / "results.csv")""", []),
]

OFFLINE_NOTE = """**About the defaults.** They run offline on two CPU cores: `backbone="workbench-tiny"` is a small
*randomly initialised* open_clip model shipped with the package, so the numbers **demonstrate the
workflow only** (zero-shot is at chance; methods that learn from the support images do better).
For real numbers change one parameter: `backbone="ViT-B-16-quickgelu", pretrained="openai"`
(or e.g. BiomedCLIP for the medical sets)."""

TRAINING_FREE = [
    ("md", """# 02 · Training-free and cache baselines: Tip-Adapter, Tip-Adapter-F, GDA

Compares zero-shot, the linear probe, Tip-Adapter, Tip-Adapter-F and GDA across K shots, with
mean ± std over seeds. All five work from cached features: the images (and their augmented
views) are encoded once, then every method and hyper-parameter search runs on tensors.

**No test leakage.** The reference code tunes α/β on the full validation split (on ImageNet, on
the test set) and Tip-Adapter-F picks its epoch on test. Here every choice is made on the
K-shot validation set of the few-shot split (`selection="kshot_val"`); the papers' protocol is
available as `selection="full_val"` and is recorded in each run's provenance.

""" + OFFLINE_NOTE, []),
    ("code", """backbone: str = "workbench-tiny"  # open_clip architecture, 'hf-hub:ORG/REPO' or 'local-dir:PATH', e.g. "ViT-B-16-quickgelu"
pretrained: str = ""  # pretrained tag or checkpoint path, e.g. "openai"; "" = the offline default's seeded random weights
dataset: str = "pneumoniamnist_mini"  # a dataset name from domains/ (see wb.list_datasets()) or a YAML path
shots: list[int] = [1, 4, 16]  # K, support images per class
seeds: list[int] = [1, 2, 3]  # few-shot sampling seeds; results are mean ± std over these
methods: list[str] = ["zero_shot", "linear_probe", "tip_adapter", "tip_adapter_f", "gda"]  # methods to compare
selection: str = "kshot_val"  # where Tip-Adapter(-F)/GDA choose hyper-parameters: kshot_val or full_val (paper protocol)
device: str = "auto"  # auto, cpu, cuda, mps
output_dir: str = "outputs/training_free"  # results, split files and feature cache; relative to the repository root""",
     ["parameters"]),
    ("code", """import workbench as wb

params = wb.notebook.check_parameters(globals(), "02_training_free.ipynb")  # unknown name or bad value -> clear error
out = wb.resolve(output_dir)
method_params = wb.notebook.selection_params(methods, selection)""", []),
    ("code", """model = wb.load_backbone(backbone, pretrained, device=device)
data = wb.load_dataset(dataset)
print(model)
print(data.describe())""", []),
    ("md", "## Run every method on the same K-shot splits", []),
    ("code", """cache = wb.FeatureCache(model, out / "features")
results = wb.compare(data, model, methods, shots, seeds, cache=cache, method_params=method_params,
                     split_dir=out / "splits", out_dir=out)""", []),
    ("code", """wb.summarize(results, data.metric).pivot(index="method", columns="shots", values="mean")""", []),
    ("code", """wb.report.plot_accuracy_vs_shots(results, data.metric);""", []),
    ("md", """What each run chose (β, α, epochs, where it was selected) is in its provenance record, e.g.
`outputs/training_free/runs/<run_id>/provenance.json` → `method.fit_info`.""", []),
    ("code", """wb.report.fit_choices(out, methods=["tip_adapter", "tip_adapter_f", "gda"]).head(10)""", []),
]

# The loading cell of the single-run tutorials (03, 04): backbone, dataset, feature cache.
LOAD_CELL = ("code", """model = wb.load_backbone(backbone, pretrained, device=device)
data = wb.load_dataset(dataset)
cache = wb.FeatureCache(model, out / "features")
print(model)
print(data.describe())""", [])

PROMPT_TUNING = [
    ("md", """# 03 · Prompt tuning with CoOp

CoOp learns the words of the prompt: `n_ctx` context vectors in the text encoder's embedding
space replace "a photo of a", and only they are trained (SGD, lr 0.002, cosine after one warm-up
epoch, 50/100/100/200/200 epochs for K = 1/2/4/8/16, as the reference). The image encoder stays
frozen, so every epoch's fresh augmentation is encoded once into the feature cache and each step
only runs the text encoder, over all class prompts.

Initialised from `ctx_init="a photo of a"`, CoOp starts exactly at zero-shot CLIP with that
template; with `ctx_init=""` it starts from random vectors.

""" + OFFLINE_NOTE, []),
    ("code", """backbone: str = "workbench-tiny"  # open_clip architecture, 'hf-hub:ORG/REPO' or 'local-dir:PATH', e.g. "ViT-B-16-quickgelu"
pretrained: str = ""  # pretrained tag or checkpoint path, e.g. "openai"; "" = the offline default's seeded random weights
dataset: str = "pneumoniamnist_mini"  # a dataset name from domains/ (see wb.list_datasets()) or a YAML path
shots: int = 16  # K, support images per class
seed: int = 1  # few-shot sampling and training seed
n_ctx: int = 16  # number of learnable context vectors (ignored when ctx_init is set)
ctx_init: str = ""  # initialise the context from these words, e.g. "a photo of a"; "" = random N(0, 0.02)
csc: bool = False  # class-specific contexts instead of one shared set
class_token_position: str = "end"  # where the class name goes: end, middle or front
epochs: int = 0  # training epochs; 0 = the reference schedule by K (50/100/100/200/200)
device: str = "auto"  # auto, cpu, cuda, mps
output_dir: str = "outputs/prompt_tuning"  # results, splits, cache and the saved model; relative to the repository root""",
     ["parameters"]),
    ("code", """import workbench as wb

params = wb.notebook.check_parameters(globals(), "03_prompt_tuning.ipynb")  # unknown name or bad value -> clear error
out = wb.resolve(output_dir)
coop_params = dict(n_ctx=n_ctx, ctx_init=ctx_init, csc=csc, class_token_position=class_token_position,
                   epochs=epochs or None)""", []),
    LOAD_CELL,
    ("md", "## Train CoOp and compare it with zero-shot on the same split", []),
    ("code", """zero_shot = wb.run_experiment(data, model, "zero_shot", shots, seed, cache=cache, split_dir=out / "splits", out_dir=out)
coop = wb.run_experiment(data, model, "coop", shots, seed, cache=cache, method_params=coop_params,
                         split_dir=out / "splits", out_dir=out, save_model=True)
wb.report.rows(zero_shot, coop)""", []),
    ("code", """wb.report.plot_loss(coop);""", []),
    ("md", """## Reload the saved model and predict on new images

`save_model=True` wrote one folder with the learned context vectors, class names, templates,
backbone recipe and weights hash. `wb.load(folder)` needs no dataset and no training code.""", []),
    ("code", """predictor = wb.load(coop.model_dir)
examples = wb.report.sample_images(data, "test", n=6, seed=0)
predictions = predictor.predict([image for image, _ in examples])
predictions[["label", "confidence"]]""", []),
    ("code", """wb.report.show_predictions(examples, predictions);""", []),
]

LORA = [
    ("md", """# 04 · CLIP-LoRA

Low-rank adapters on the query, key and value projections of every attention block of both
encoders (r = 2, α = 1, scaled by α/√r, dropout 0.25), trained with AdamW (lr 2e-4, weight decay
0.01) on a cosine schedule, as in the CLIP-LoRA reference. open_clip's fused attention is split
into separate q/k/v layers first (same outputs), then peft adds the adapters.

The reference trains for 500 × K iterations; `iterations` below overrides that so the offline
default finishes quickly on a CPU. After training, `merge()` folds the adapters into the
weights: same predictions, no adapter overhead.

""" + OFFLINE_NOTE, []),
    ("code", """backbone: str = "workbench-tiny"  # open_clip architecture, 'hf-hub:ORG/REPO' or 'local-dir:PATH', e.g. "ViT-B-16-quickgelu"
pretrained: str = ""  # pretrained tag or checkpoint path, e.g. "openai"; "" = the offline default's seeded random weights
dataset: str = "pneumoniamnist_mini"  # a dataset name from domains/ (see wb.list_datasets()) or a YAML path
shots: int = 16  # K, support images per class
seed: int = 1  # few-shot sampling and training seed
r: int = 2  # LoRA rank
alpha: float = 1.0  # LoRA alpha (the update is scaled by alpha / sqrt(r))
dropout: float = 0.25  # dropout on the LoRA input
encoder: str = "both"  # which towers get adapters: vision, text or both
lora_params: list[str] = ["q", "k", "v"]  # which projections get adapters: any of q, k, v, o
lr: float = 2e-4  # AdamW learning rate
iterations: int = 120  # training iterations; 0 = the reference's 500 x K
device: str = "auto"  # auto, cpu, cuda, mps
output_dir: str = "outputs/lora"  # results, splits, cache and the saved model; relative to the repository root""",
     ["parameters"]),
    ("code", """import workbench as wb

params = wb.notebook.check_parameters(globals(), "04_lora.ipynb")  # unknown name or bad value -> clear error
out = wb.resolve(output_dir)
lora = dict(r=r, alpha=alpha, dropout=dropout, encoder=encoder, params=lora_params, lr=lr, iterations=iterations or None)""", []),
    LOAD_CELL,
    ("md", "## Train and compare with zero-shot", []),
    ("code", """zero_shot = wb.run_experiment(data, model, "zero_shot", shots, seed, cache=cache, split_dir=out / "splits", out_dir=out)
run = wb.run_experiment(data, model, "clip_lora", shots, seed, cache=cache, method_params=lora,
                        split_dir=out / "splits", out_dir=out, save_model=True)
wb.report.rows(zero_shot, run)""", []),
    ("code", """wb.report.plot_loss(run);""", []),
    ("md", "## Reload the saved adapters (peft format) and predict; then merge", []),
    ("code", """predictor = wb.load(run.model_dir)
examples = wb.report.sample_images(data, "test", n=6, seed=0)
predictions = predictor.predict([image for image, _ in examples])
wb.report.show_predictions(examples, predictions);""", []),
    ("code", """predictor.method.merge()
merged = predictor.predict([image for image, _ in examples])
print("largest probability change after merging:", float((merged[data.class_names] - predictions[data.class_names]).abs().max().max()))""", []),
]

DOMAINS = [
    ("md", """# 05 · Domain packs: medical, remote sensing, agriculture

Every dataset is a YAML file in `domains/<domain>/` — source, class ids and readable names,
the literature's prompt templates, the primary metric, licence, citation and recommended
backbones — so picking a dataset needs no code. Backbone aliases (`biomedclip`,
`remoteclip-vit-b-32`, …) with their exact loading recipes are in `domains/backbones.yaml`.

Each domain has one dataset that needs no network (`offline: true`), which is the default here.
With internet, run a real set by passing its YAML to papermill — its keys become this notebook's
parameters: `papermill notebooks/05_domains.ipynb out.ipynb -f domains/remote_sensing/eurosat.yaml
-p backbone remoteclip-vit-b-32`.

""" + OFFLINE_NOTE, []),
    ("code", """domain: str = "remote_sensing"  # remote_sensing, medical or agriculture
name: str = ""  # a dataset of that domain (listed below); "" = the domain's offline dataset. Same key as in the YAMLs
backbone: str = "workbench-tiny"  # a backbone alias (domains/backbones.yaml) or an open_clip name, e.g. "biomedclip"
pretrained: str = ""  # pretrained tag or checkpoint path for an open_clip name; "" for aliases and the offline default
shots: list[int] = [1, 2, 4]  # K, support images per class
seeds: list[int] = [1, 2]  # few-shot sampling seeds
methods: list[str] = ["zero_shot", "linear_probe", "tip_adapter", "gda"]  # methods to compare
device: str = "auto"  # auto, cpu, cuda, mps
output_dir: str = "outputs/domains"  # results, split files and feature cache; relative to the repository root""",
     ["parameters"]),
    ("code", """import workbench as wb

params = wb.notebook.check_parameters(globals(), "05_domains.ipynb", allow_dataset_spec=True)
data = wb.domains.dataset_from_parameters(globals())  # by name, or from the YAML keys given with papermill -f
out = wb.resolve(output_dir) / data.name""", []),
    ("md", "## What the domain pack offers", []),
    ("code", """wb.domains.list(data.domain)""", []),
    ("code", """wb.domains.backbones(data.domain)""", []),
    ("code", """print(data.describe())
print("templates:", data.templates, "| metric:", data.metric)""", []),
    ("md", "## Compare methods on it", []),
    ("code", """model = wb.load_backbone(backbone, pretrained, device=device)
results = wb.compare(data, model, methods, shots, seeds, cache=wb.FeatureCache(model, out / "features"),
                     split_dir=out / "splits", out_dir=out)
wb.summarize(results, data.metric).pivot(index="method", columns="shots", values="mean")""", []),
    ("code", """wb.report.plot_accuracy_vs_shots(results, data.metric);""", []),
]

ZERO_SHOT = [
    ("md", """# 01 · Zero-shot classification and prompts

Zero-shot CLIP needs no training images: each class becomes a text classifier, the mean of the
normalised embeddings of its prompts ("a satellite photo of {}.", …), and an image goes to the
class whose text it is most similar to. Which prompts you use matters, sometimes by many points.

Choose templates on the selection split (the dataset's validation split, or its training pool),
never on the test split: the table shows test accuracy only to report it.

""" + OFFLINE_NOTE, []),
    ("code", """backbone: str = "workbench-tiny"  # open_clip architecture or alias, e.g. "ViT-B-16-quickgelu" or "remoteclip-vit-b-32"
pretrained: str = ""  # pretrained tag or checkpoint path, e.g. "openai"; "" = the offline default's seeded random weights
dataset: str = "whu_rs19_mini"  # a dataset name from domains/ (see wb.list_datasets()) or a YAML path
template_sets: dict = {"photo": ["a photo of a {}."], "dataset YAML": [], "remote sensing ensemble": ["a satellite photo of {}.", "aerial imagery of {}.", "a satellite image of {}.", "an aerial photo of {}."]}  # name -> templates ([] = the dataset's)
device: str = "auto"  # auto, cpu, cuda, mps
output_dir: str = "outputs/zero_shot"  # cache and run records; relative to the repository root""", ["parameters"]),
    ("code", """import workbench as wb

params = wb.notebook.check_parameters(globals(), "01_zero_shot_prompts.ipynb")  # unknown name or bad value -> clear error
out = wb.resolve(output_dir)""", []),
    ("code", """model = wb.load_backbone(backbone, pretrained, device=device)
data = wb.load_dataset(dataset)
cache = wb.FeatureCache(model, out / "features")
print(data.describe())""", []),
    ("md", "## Compare template sets", []),
    ("code", """wb.prompts.compare_templates(data, model, template_sets, cache)""", []),
    ("md", "## Where zero-shot fails: recall per class", []),
    ("code", """run = wb.run_experiment(data, model, "zero_shot", 1, 1, cache=cache, out_dir=out)
wb.report.per_class_recall(out, run.row["run_id"]).head(10)""", []),
]

COMPARE = [
    ("md", """# 06 · Compare methods across datasets

Reads a results table (one row per run, from `wb.compare` or `workbench sweep`) and shows what a
paper would: mean ± std over seeds per (dataset, method, K), accuracy-vs-shots curves per
dataset, a ranking of methods across datasets and shots, per-class recall and calibration (ECE,
reliability diagram) of a chosen run. `workbench report RESULTS.csv` writes the same tables and
figures to a folder.

By default it first runs (or resumes) the offline demo sweep `sweeps/offline_demo.yaml`.

""" + OFFLINE_NOTE, []),
    ("code", """sweep_spec: str = "sweeps/offline_demo.yaml"  # a sweep YAML to run or resume first; "" = only read results_csv
results_csv: str = "outputs/sweep_demo/results.csv"  # the results table to compare; relative to the repository root
metric: str = "accuracy"  # accuracy, balanced_accuracy, macro_f1 or macro_auroc
run_id: str = ""  # the run whose per-class recall and calibration to show; "" = the best run""", ["parameters"]),
    ("code", """import workbench as wb

params = wb.notebook.check_parameters(globals(), "06_compare_methods.ipynb")  # unknown name or bad value -> clear error
summary = wb.sweep(wb.resolve(sweep_spec)) if sweep_spec else None
results = wb.report.results_table(wb.resolve(results_csv))
chosen = run_id or results.sort_values(metric, ascending=False)["run_id"].iloc[0]""", []),
    ("code", """wb.report.summary_table(results, metric)""", []),
    ("code", """wb.report.plot_curves(results, metric);""", []),
    ("code", """wb.report.ranking(results, metric)""", []),
    ("code", """wb.report.calibration_table(results).head(8)""", []),
    ("md", "## One run up close", []),
    ("code", """wb.report.per_class_recall(wb.resolve(results_csv).parent, chosen).head(8)""", []),
    ("code", """wb.report.plot_reliability(wb.resolve(results_csv).parent, chosen);""", []),
]

BYOD = [
    ("md", """# 07 · Bring your own data

A folder of images (`root/<class>/*.jpg`) or a CSV manifest (`path,label`) → pick a backbone →
compare methods on K-shot splits → save the best adapted model → predict on new images.
Readable class names (`footballfield` → "football field") and prompt templates are parameters.
Unreadable images are skipped and listed; if more than 5 % are bad the load stops with the list.

The defaults use the bundled WHU-RS19 sample (`data/whu_rs19_mini`, 10 images per class) so the
notebook runs offline. Point `images_folder` (or `csv_file`) at your data and `backbone` at a
real model.

""" + OFFLINE_NOTE, []),
    ("code", """images_folder: str = "data/whu_rs19_mini"  # a folder of class sub-folders; relative to the repository root
csv_file: str = ""  # or a CSV manifest with one row per image (then set images_folder to "")
path_column: str = "path"  # CSV column with the image path (relative to the CSV's folder)
label_column: str = "label"  # CSV column with the class id
class_names: dict = {"footballfield": "football field", "railwaystation": "railway station"}  # class id -> readable name, for ids that are not plain words
templates: list[str] = ["a satellite photo of {}.", "aerial imagery of {}."]  # prompt templates with one {}
backbone: str = "workbench-tiny"  # open_clip architecture or alias, e.g. "remoteclip-vit-b-32"
pretrained: str = ""  # pretrained tag or checkpoint path, e.g. "openai"
methods: list[str] = ["zero_shot", "linear_probe", "tip_adapter", "gda"]  # methods to compare
shots: list[int] = [1, 2, 4]  # K, support images per class
seeds: list[int] = [1, 2]  # few-shot sampling seeds
device: str = "auto"  # auto, cpu, cuda, mps
output_dir: str = "outputs/my_data"  # results, splits, cache and the saved model; relative to the repository root""",
     ["parameters"]),
    ("code", """import workbench as wb

params = wb.notebook.check_parameters(globals(), "07_bring_your_own_data.ipynb")  # unknown name or bad value -> clear error
out = wb.resolve(output_dir)
prompts = wb.prompts.validate_templates(templates)""", []),
    ("code", """data = wb.data.load_user_data(images_folder, csv_file, class_names=class_names, path_column=path_column,
                              label_column=label_column)
print(data.describe())
data.counts().T""", []),
    ("code", """model = wb.load_backbone(backbone, pretrained, device=device)
cache = wb.FeatureCache(model, out / "features")
results = wb.compare(data, model, methods, shots, seeds, cache=cache, templates=prompts,
                     split_dir=out / "splits", out_dir=out)
wb.report.summary_table(results, data.metric)""", []),
    ("code", """wb.report.plot_accuracy_vs_shots(results, data.metric);""", []),
    ("md", "## Save the best method and use it on new images", []),
    ("code", """best = wb.report.best_method(results, data.metric)
final = wb.run_experiment(data, model, best, max(shots), seeds[0], cache=cache, templates=prompts,
                          split_dir=out / "splits", out_dir=out, save_model=True)
print(best, "->", final.model_dir)""", []),
    ("code", """predictor = wb.load(final.model_dir)
examples = wb.report.sample_images(data, "test", n=6, seed=0)
wb.report.show_predictions(examples, predictor.predict([image for image, _ in examples]));""", []),
]

NOTEBOOKS = {"00_quickstart.ipynb": QUICKSTART, "01_zero_shot_prompts.ipynb": ZERO_SHOT,
             "06_compare_methods.ipynb": COMPARE, "07_bring_your_own_data.ipynb": BYOD, "02_training_free.ipynb": TRAINING_FREE,
             "03_prompt_tuning.ipynb": PROMPT_TUNING, "04_lora.ipynb": LORA, "05_domains.ipynb": DOMAINS}

if __name__ == "__main__":
    folder = Path(__file__).resolve().parents[1] / "notebooks"
    for name, cells in NOTEBOOKS.items():
        build(cells, folder / name)
