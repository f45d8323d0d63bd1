"""``workbench`` on the command line: list datasets, run a comparison, summarise a results table."""
from __future__ import annotations

import argparse
import sys


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="workbench", description="CLIP domain-adaptation workbench")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("datasets", help="list the dataset YAMLs in domains/ (same as: domains list)")
    p.add_argument("--domain", default=None)

    p = sub.add_parser("domains", help="the domain packs: list datasets, show one, list backbones")
    dsub = p.add_subparsers(dest="action", required=True)
    q = dsub.add_parser("list", help="datasets (optionally of one domain)")
    q.add_argument("domain", nargs="?", default=None)
    q = dsub.add_parser("show", help="one dataset's source, classes, templates, metric, licence, citation")
    q.add_argument("name")
    q = dsub.add_parser("backbones", help="backbone aliases and their loading recipes")
    q.add_argument("domain", nargs="?", default=None)

    p = sub.add_parser("run", help="compare methods on one dataset across shots and seeds")
    p.add_argument("--dataset", required=True, help="dataset name from domains/ or a YAML path")
    p.add_argument("--methods", default="zero_shot,linear_probe")
    p.add_argument("--shots", default="1,2,4", type=_ints)
    p.add_argument("--seeds", default="1,2,3", type=_ints)
    p.add_argument("--backbone", default="workbench-tiny")
    p.add_argument("--pretrained", default="")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="outputs/cli")

    p = sub.add_parser("sweep", help="run or resume a sweep described by a YAML spec")
    p.add_argument("spec")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--engine", choices=["local", "dask"], default=None)

    p = sub.add_parser("report", help="tables and figures of a results table, written to a folder")
    p.add_argument("results")
    p.add_argument("--out", default=None, help="folder (default: <results folder>/report)")
    p.add_argument("--metric", default="accuracy")

    p = sub.add_parser("summarize", help="mean ± std over seeds from a results CSV")
    p.add_argument("results")
    p.add_argument("--metric", default="accuracy")

    args = parser.parse_args(argv)
    import pandas as pd

    import workbench as wb
    from workbench.errors import WorkbenchError

    pd.set_option("display.width", 160)
    try:
        if args.command == "datasets":
            print(wb.list_datasets(args.domain).to_string(index=False))
        elif args.command == "domains":
            if args.action == "list":
                print(wb.domains.list(args.domain).to_string(index=False))
            elif args.action == "show":
                print(wb.domains.show(args.name))
            else:
                print(wb.domains.backbones(args.domain).to_string(index=False))
        elif args.command == "run":
            out = wb.resolve(args.out)
            backbone = wb.load_backbone(args.backbone, args.pretrained or None, device=args.device)
            dataset = wb.load_dataset(args.dataset)
            table = wb.compare(dataset, backbone, args.methods.split(","), args.shots, args.seeds,
                               cache=wb.FeatureCache(backbone, out / "features"), split_dir=out / "splits", out_dir=out)
            print(wb.summarize(table).to_string(index=False))
            print(f"results: {out / 'results.csv'}")
        elif args.command == "sweep":
            from workbench.sweep import sweep

            summary = sweep(args.spec, workers=args.workers, engine=args.engine)
            print(f"results: {summary.output_dir / 'results.csv'}")
            return 1 if summary.failed else 0
        elif args.command == "report":
            from pathlib import Path

            from workbench.report import write_report

            out = Path(args.out) if args.out else Path(args.results).parent / "report"
            print(f"report: {write_report(args.results, out, metric=args.metric)}")
        elif args.command == "summarize":
            from workbench.report import results_table

            print(wb.summarize(results_table(args.results), args.metric).to_string(index=False))
    except WorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
