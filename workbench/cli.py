"""``workbench`` on the command line: list datasets and methods, run a comparison, summarise and report results.

Only ``argparse`` is imported before the arguments are parsed: ``workbench --help`` answers at
once, and torch, pandas and the methods load only for a command that needs them.
Relative paths on the command line (``--dataset``, ``--out``, results files) are taken from the
current directory, as a shell user expects.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

INTERRUPTED = "interrupted — rerun the same command to resume (finished runs are kept and skipped)."
EXIT_INTERRUPTED = 130  # the shell's convention for a process ended by Ctrl-C (128 + SIGINT)


def _ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4; got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer, e.g. 1,2,4")
    return values


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _dataset_argument(text: str) -> str:
    """A path that exists from the current directory is passed on absolute; anything else is a dataset name."""
    p = Path(text).expanduser()
    return str(p.resolve()) if p.exists() else text


def _wise_alpha(text: str):
    if text == "val":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'val', got {text!r}")
    return value


def _pairs_arguments(p: argparse.ArgumentParser, out: str, out_help: str) -> None:
    """The options ``retrieve`` and ``finetune-pairs`` share: the pairs, the backbone, the device, the output."""
    p.add_argument("--pairs", required=True, type=_dataset_argument,
                   help="a pair dataset name (workbench datasets --task retrieval, e.g. whu_rs19_pairs, the offline "
                        "set), a pair YAML, or a CSV with an image column and caption column(s)")
    p.add_argument("--image-column", default="image", help="a CSV's image-path column (default: %(default)s)")
    p.add_argument("--caption-columns", default="caption", type=_names,
                   help="a CSV's caption column(s), comma-separated, e.g. sent1,sent2 (default: %(default)s)")
    p.add_argument("--split-column", default=None,
                   help="a CSV's split column (train/val/test); default: val and test held out with a fixed seed")
    p.add_argument("--backbone", default="workbench-tiny", type=_dataset_argument,
                   help="open_clip architecture, backbone alias, hf-hub:ORG/REPO, or a backbone folder written by "
                        "finetune-pairs (default: %(default)s, the offline model)")
    p.add_argument("--pretrained", default="", help="pretrained tag or checkpoint path, e.g. openai (default: none)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: %(default)s)")
    p.add_argument("--out", default=out, help=f"{out_help}, relative to the current directory (default: %(default)s)")


def _load_pairs(args):
    """The pair dataset ``--pairs`` names: a CSV read with the column options, else a pair YAML or name."""
    import workbench as wb
    from workbench.data.pairs import pairs_from_csv

    if args.pairs.lower().endswith(".csv"):
        return pairs_from_csv(args.pairs, image_column=args.image_column, caption_columns=args.caption_columns,
                              split_column=args.split_column)
    return wb.load_pairs(args.pairs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="CLIP domain-adaptation workbench")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("datasets", help="list the dataset YAMLs in domains/, image–text pair sets (task retrieval) "
                                        "included (same as: domains list)")
    p.add_argument("--domain", default=None, help="only this domain (remote_sensing, medical, agriculture)")
    p.add_argument("--task", default=None,
                   help="only this task kind: single_label, multi_label or retrieval (the pair sets)")

    p = sub.add_parser("domains", help="the domain packs: list datasets, show one, list backbones")
    dsub = p.add_subparsers(dest="action", required=True)
    q = dsub.add_parser("list", help="datasets (optionally of one domain)")
    q.add_argument("domain", nargs="?", default=None)
    q = dsub.add_parser("show", help="one dataset's source, classes, templates, metric, licence, citation")
    q.add_argument("name")
    q = dsub.add_parser("backbones", help="backbone aliases and their loading recipes")
    q.add_argument("domain", nargs="?", default=None)

    sub.add_parser("methods", help="the registered methods: family, what each trains, reference, typical cost")

    p = sub.add_parser("run", help="compare methods on one dataset across shots and seeds", )
    p.add_argument("--dataset", required=True, type=_dataset_argument,
                   help="a dataset name from domains/ (workbench datasets), or a path: a dataset YAML, an image "
                        "folder (root/<class>/*.jpg), a CSV manifest or a MedMNIST-style .npz")
    p.add_argument("--methods", default="zero_shot,linear_probe", type=_names,
                   help="comma-separated method names (default: %(default)s); `workbench methods` lists them")
    p.add_argument("--shots", default="1,2,4", type=_ints,
                   help="comma-separated K, support images per class (default: %(default)s)")
    p.add_argument("--seeds", default="1,2,3", type=_ints,
                   help="comma-separated few-shot sampling seeds; results are mean ± std over them "
                        "(default: %(default)s)")
    p.add_argument("--backbone", default="workbench-tiny-scenes",
                   help="open_clip architecture, backbone alias or hf-hub:ORG/REPO "
                        "(default: %(default)s, the offline model)")
    p.add_argument("--pretrained", default="", help="pretrained tag or checkpoint path, e.g. openai (default: none)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: %(default)s)")
    p.add_argument("--metric", default=None,
                   help="metric of the printed summary (default: the dataset's primary metric from its YAML)")
    p.add_argument("--out", default="outputs/cli",
                   help="output folder (results.csv, runs/, splits, feature cache), relative to the current directory "
                        "(default: %(default)s)")
    p.add_argument("--unlabeled", default=None,
                   help="images nobody labelled, for transclip / tda: 'test' (transductive: the test images), a split "
                        "name, an image folder, a CSV or an .npz (default: none)")

    p = sub.add_parser("recommend", help="which method (and backbone) to use: chosen on the K-shot data only, "
                                         "with bootstrap intervals; the test split is scored once, afterwards")
    p.add_argument("--dataset", required=True, type=_dataset_argument,
                   help="a dataset name from domains/, or a path (dataset YAML, image folder, CSV, .npz)")
    p.add_argument("--backbones", default="workbench-tiny-scenes", type=_names,
                   help="comma-separated backbones, each NAME or NAME@PRETRAINED, e.g. ViT-B-16-quickgelu@openai, or "
                        "a saved backbone folder (a pairs fine-tune) (default: %(default)s, the offline model)")
    p.add_argument("--methods", default=None, type=_names,
                   help="comma-separated candidate methods (default: every method that fits --budget)")
    p.add_argument("--budget", default="minutes", choices=["seconds", "minutes", "hours"],
                   help="expected fit time per run on this device (default: %(default)s)")
    p.add_argument("--shots", default="4", type=_ints,
                   help="comma-separated K; the choice is made at the largest (default: %(default)s)")
    p.add_argument("--seeds", default="1,2,3", type=_ints, help="few-shot sampling seeds (default: %(default)s)")
    p.add_argument("--resplits", type=int, default=3,
                   help="re-splits of each K-shot split into fit / held-out parts (default: %(default)s)")
    p.add_argument("--metric", default=None, help="default: the dataset's primary metric (its YAML's metric:)")
    p.add_argument("--rule", default="mean", choices=["mean", "pooled", "p_best"],
                   help="how the held-out evidence chooses (default: %(default)s; see README)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: %(default)s)")
    p.add_argument("--unlabeled", default=None,
                   help="images nobody labelled, for transclip / tda (ranked in their own group when transductive): "
                        "'test', a split name, an image folder, a CSV or an .npz (default: none)")
    p.add_argument("--out", default="outputs/recommend",
                   help="output folder (runs, splits, features, the chosen model), relative to the current directory "
                        "(default: %(default)s)")

    p = sub.add_parser("retrieve", help="image–text retrieval of a backbone on a pair dataset: R@1/5/10 both ways "
                                        "and mean recall on its test split")
    _pairs_arguments(p, "outputs/retrieve", "output folder (results.csv, runs/, feature cache)")

    p = sub.add_parser("finetune-pairs", help="contrastive fine-tuning (FLYP) of a backbone on image–text pairs; "
                                              "saves a backbone folder that --backbone / wb.load_backbone read")
    _pairs_arguments(p, "outputs/finetune_pairs", "the backbone folder written (replaced if it exists)")
    p.add_argument("--method", default="pairs_lora", choices=["pairs_lora", "pairs_svd", "pairs_full"],
                   help="LoRA on q/k/v of both towers, CLIP-SVD's singular values, or every weight (default: "
                        "%(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: --epochs passes over the train split's captions)")
    p.add_argument("--epochs", type=int, default=10, help="passes over the train captions (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="pairs per step (default: %(default)s, FLYP)")
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate (default: 2e-4 for LoRA/SVD, 1e-5 for full, FLYP)")
    p.add_argument("--encoder", default="both", choices=["both", "vision", "text"],
                   help="which towers are adapted (default: %(default)s)")
    p.add_argument("--wise-alpha", default=None, type=_wise_alpha,
                   help="WiSE-FT: a number in [0, 1] (0 = pretrained, 1 = fine-tuned) or 'val' (chosen by mean "
                        "recall on the pairs' val split); default: the fine-tuned weights")
    p.add_argument("--checkpoint-dir", default=None,
                   help="checkpoint each epoch there; rerun the same command to resume (default: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches, augmentation, LoRA init")

    p = sub.add_parser("sweep", help="run or resume a sweep described by a YAML spec")
    p.add_argument("spec")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--engine", choices=["local", "dask"], default=None)
    p.add_argument("--allow-notebook-outside", action="store_true",
                   help="run the spec's notebook (runner: notebook) although it is not in notebooks/ — a notebook "
                        "is code: only for a spec you trust")

    p = sub.add_parser("report", help="tables and figures of a results table, written to a folder")
    p.add_argument("results", help="a results.csv written by compare, run or sweep")
    p.add_argument("--out", default=None, help="folder (default: <results folder>/report)")
    p.add_argument("--metric", default=None, help="default: each dataset's primary metric (its YAML's metric:)")

    p = sub.add_parser("summarize", help="mean ± std over seeds from a results CSV")
    p.add_argument("results", help="a results.csv written by compare, run or sweep")
    p.add_argument("--metric", default=None, help="default: each dataset's primary metric (its YAML's metric:)")
    return parser


def _run(args) -> int:
    import pandas as pd

    import workbench as wb

    pd.set_option("display.width", 160)
    if args.command == "datasets":
        print(wb.list_datasets(args.domain, args.task).to_string(index=False))
    elif args.command == "domains":
        if args.action == "list":
            print(wb.domains.list(args.domain).to_string(index=False))
        elif args.action == "show":
            print(wb.domains.show(args.name))
        else:
            print(wb.domains.backbones(args.domain).to_string(index=False))
    elif args.command == "methods":
        pd.set_option("display.max_colwidth", 80)
        print(wb.available_methods(details=True).to_string())
    elif args.command == "run":
        out = Path(args.out).expanduser().resolve()
        dataset = wb.load_dataset(args.dataset)  # before the backbone: a bad path fails in a second
        backbone = wb.load_backbone(args.backbone, args.pretrained or None, device=args.device)
        table = wb.compare(dataset, backbone, args.methods, args.shots, args.seeds,
                           cache=wb.FeatureCache(backbone, out / "features"), split_dir=out / "splits", out_dir=out,
                           unlabeled=args.unlabeled)
        from workbench.report import summary_text

        print(summary_text(table, args.metric))
        print(f"results: {out / 'results.csv'}")
    elif args.command == "recommend":
        from workbench.recommend import parse_backbones, recommend

        out = Path(args.out).expanduser().resolve()
        rec = recommend(args.dataset, parse_backbones(args.backbones), args.methods, args.shots, args.seeds,
                        args.budget, args.metric, resplits=args.resplits, rule=args.rule, device=args.device, out_dir=out,
                        split_dir=out / "splits", cache_dir=out / "features", unlabeled=args.unlabeled)
        print(rec.ranking().to_string(index=False))
        print(f"\n{rec.summary}\nchosen model: {rec.model_dir}")
    elif args.command == "retrieve":
        from workbench.report import retrieval_table

        out = Path(args.out).expanduser().resolve()
        pairs = _load_pairs(args)   # before the backbone: a bad file fails in a second
        backbone = wb.load_backbone(args.backbone, args.pretrained or None, device=args.device)
        table = wb.compare(pairs, backbone, ["zero_shot"], shots=[0], seeds=[0], protocol="retrieval", resume=False,
                           cache=wb.FeatureCache(backbone, out / "features"), out_dir=out)
        print(f"{pairs.describe()}\n{pairs.card}".rstrip())
        print(retrieval_table(table).to_string(index=False))
        print(f"results: {out / 'results.csv'}")
    elif args.command == "finetune-pairs":
        out = Path(args.out).expanduser().resolve()
        pairs = _load_pairs(args)
        backbone = wb.load_backbone(args.backbone, args.pretrained or None, device=args.device)
        params = {"steps": args.steps, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                  "encoder": args.encoder, "wise_alpha": args.wise_alpha, "seed": args.seed,
                  "checkpoint_dir": str(Path(args.checkpoint_dir).expanduser().resolve()) if args.checkpoint_dir
                  else None}
        fitted = wb.fine_tune_pairs(pairs, backbone, args.method, **params)
        folder = fitted.save(out)
        info = fitted.fit_info
        loss = info["loss"]
        print(f"{args.method} on {pairs.describe()}: {info['steps']} steps, {info['trainable_parameters']:,} "
              f"trainable parameters, lr {info['lr']:g}"
              + (f", loss {loss[0]:.4f} -> {loss[-1]:.4f}" if loss else "")
              + f"; saw {json.dumps(info['saw'])}; captions truncated: {info['captions_truncated']}")
        if info["wise_ft"]:
            print(f"WiSE-FT alpha {info['wise_ft']['alpha']:g} ({info['wise_ft']['chosen_on']})")
        print(f"backbone: {folder}\nnext: workbench retrieve --pairs {args.pairs} --backbone {folder}")
    elif args.command == "sweep":
        from workbench.sweep import sweep

        summary = sweep(args.spec, workers=args.workers, engine=args.engine,
                        allow_notebook_outside=args.allow_notebook_outside)
        print(f"results: {summary.output_dir / 'results.csv'}")
        return 1 if summary.failed else 0
    elif args.command == "report":
        from workbench.report import write_report

        out = Path(args.out) if args.out else Path(args.results).parent / "report"
        print(f"report: {write_report(args.results, out, metric=args.metric)}")
    elif args.command == "summarize":
        from workbench.report import results_table, summary_text

        from workbench.report import what_the_numbers_show

        table = results_table(args.results)
        print(summary_text(table, args.metric))
        print("\n" + what_the_numbers_show(table))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from workbench.errors import WorkbenchError

        return _run(args)
    except WorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # compare/sweep raise workbench.errors.Interrupted, which says what was kept
        print(f"\n{str(err) or INTERRUPTED}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
