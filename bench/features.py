"""Feature-extraction benchmark: decode alone, encode alone, the whole pipeline, and the baselines.

Prints, in one run, min and median over ``--repeats`` (>= 5) timed runs after a warm-up:
* images/s of decoding + preprocessing alone (the DataLoader over the image files, no encoder),
  with the workers ``num_workers="auto"`` gives and with none (the old serial path);
* images/s of encoding alone on pre-processed tensors: ``Backbone.encode_images`` against a bare
  ``model.encode_image`` loop on the same tensors (goal: ratio >= 0.9), both in the pipeline's memory
  layout (``channels_last`` on CUDA, reordered on the device after the copy, as ``FeatureCache`` does);
* images/s of the whole ``FeatureCache.get`` path (decode + preprocess + encode, no disk), serial
  and with workers, and the pipeline / encode ratio (goal >= 0.9 on a GPU, where decoding is the
  usual bottleneck; on a CPU the encoder and the decoders share the same cores);
* on CUDA, the fraction of the bf16/fp16 roofline the encoder reaches (FLOPs per image counted on the
  model, 2 per multiply-add: 33.7 G for ViT-B/16 at 224 px — the often quoted 17.6 counts multiply-adds
  and halved the fraction; ``--peak-tflops``, e.g. 989 for an H100 SXM's dense bf16);
* the time of a second identical ``FeatureCache.get`` from disk and how many images it encoded (goal: 0).

Usage: python bench/features.py [--backbone workbench-tiny] [--pretrained ""] [--n 512] [--batch 64]
       [--device auto] [--repeats 5] [--workers auto]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch.utils.data import DataLoader

import workbench as wb
from workbench.data.dataset import Sample
from workbench.features import _collate, _ImageSet, resolve_num_workers

from bench_device import BenchDevice


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up (and worker start-up costs paid once, as in a long encode)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def line(label: str, n: int, times: list[float]) -> float:
    """Print the fastest and the median run as images/s; return the median rate."""
    best, median = n / min(times), n / statistics.median(times)
    print(f"{label:46s}: max {best:8.1f} img/s, median {median:8.1f} img/s")
    return median


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="workbench-tiny")
    ap.add_argument("--pretrained", default="")
    ap.add_argument("--dataset", default="whu_rs19_mini", help="a dataset of image files")
    ap.add_argument("--n", type=int, default=512, help="images per timed run (the dataset's files, cycled)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", default="auto", help="DataLoader workers of the parallel runs ('auto' or a number)")
    ap.add_argument("--gflop-per-image", type=float, default=0.0,
                    help="encoder forward FLOPs (2 per multiply-add); default: counted on the model (ViT-B/16: 33.7)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the GPU's dense bf16/fp16 peak, for the roofline")
    args = ap.parse_args()
    if args.repeats < 5:
        ap.error("--repeats must be at least 5 (min and median over >= 5 runs)")

    dev = BenchDevice(args.device)  # resolved once; every synchronize and the device name use it
    backbone = wb.load_backbone(args.backbone, args.pretrained or None, device=dev.device)
    dataset = wb.load_dataset(args.dataset)
    files = [s for split in sorted(dataset.splits) for s in dataset.splits[split]]
    samples = [Sample(f"{i}:{files[i % len(files)].id}", files[i % len(files)].label, files[i % len(files)].ref)
               for i in range(args.n)]
    workers = args.workers if args.workers == "auto" else int(args.workers)
    n_workers = resolve_num_workers(workers, args.n, args.batch)
    size = backbone.image_size
    cuda = dev.cuda
    # "encode alone" runs in the pipeline's memory layout: FeatureCache's own choice (channels_last on CUDA)
    channels_last = wb.FeatureCache(backbone, None, show_progress=False).channels_last
    print(f"backbone {backbone.name} ({backbone.pretrained or 'random-init'}), {dev.header()}, "
          f"precision {backbone.precision}, {args.n} images "
          f"({len(files)} files of {dataset.name}, cycled) at {size}px, batch {args.batch}, torch threads "
          f"{torch.get_num_threads()}, parallel runs with {n_workers} DataLoader workers, "
          f"{'channels_last' if channels_last else 'contiguous'} pixels; min/median over {args.repeats} runs")

    def decode(w):
        def run():
            loader = DataLoader(_ImageSet(dataset, samples, backbone.preprocess, 1, None), batch_size=args.batch,
                                num_workers=w, collate_fn=_collate, pin_memory=cuda)
            for _ in loader:
                pass
        return run

    torch.manual_seed(0)
    pixels = torch.randn(args.n, 3, size, size)

    if channels_last:  # the patch convolution's weights, as FeatureCache sets them for the pipeline
        backbone.model.to(memory_format=torch.channels_last)

    def to_device(x):  # copy first, reorder on the device (as the pipeline does)
        x = x.to(dev.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def bare():
        with torch.no_grad(), backbone.autocast():
            for i in range(0, args.n, args.batch):
                backbone.model.encode_image(to_device(pixels[i:i + args.batch]))
        dev.synchronize()

    def workbench_encode():
        for i in range(0, args.n, args.batch):
            backbone.encode_images(to_device(pixels[i:i + args.batch]), normalize=False).cpu()

    def pipeline(w):
        def run():
            wb.FeatureCache(backbone, None, batch_size=args.batch, num_workers=w, show_progress=False).get(dataset, samples)
        return run

    decode_serial = line("decode + preprocess, no workers", args.n, timed(decode(0), args.repeats))
    decode_par = line(f"decode + preprocess, {n_workers} workers", args.n, timed(decode(n_workers), args.repeats))
    print(f"{'':46s}  workers / serial decode: {decode_par / decode_serial:.2f}x")
    bare_rate = line("encode alone: bare model.encode_image loop", args.n, timed(bare, args.repeats))
    encode_rate = line("encode alone: Backbone.encode_images", args.n, timed(workbench_encode, args.repeats))
    print(f"{'':46s}  workbench / bare encode: {encode_rate / bare_rate:.3f} (goal >= 0.9)")
    serial_rate = line("whole pipeline (FeatureCache.get), no workers", args.n, timed(pipeline(0), args.repeats))
    par_rate = line(f"whole pipeline (FeatureCache.get), {n_workers} workers", args.n,
                    timed(pipeline(n_workers), args.repeats))
    print(f"{'':46s}  pipeline / encode alone: serial {serial_rate / encode_rate:.2f}, with workers "
          f"{par_rate / encode_rate:.2f} (goal >= 0.9 on a GPU)")
    if cuda and args.peak_tflops:
        gflop = args.gflop_per_image
        if not gflop:  # 17.6, the figure usually quoted for ViT-B/16, counts multiply-adds; the peak counts 2 each
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter, torch.no_grad():
                backbone.model.encode_image(torch.zeros(1, 3, size, size, device=dev.device))
            gflop = counter.get_total_flops() / 1e9
        achieved = encode_rate * gflop / 1000
        print(f"encoder: {achieved:.1f} TFLOP/s = {100 * achieved / args.peak_tflops:.1f}% of the "
              f"{args.peak_tflops:g} TFLOP/s {backbone.precision} roofline")

    with tempfile.TemporaryDirectory() as tmp:
        wb.FeatureCache(backbone, tmp, batch_size=args.batch, show_progress=False).get(dataset, files)
        fresh = wb.FeatureCache(backbone, tmp, batch_size=args.batch, show_progress=False)
        t = time.perf_counter()
        fresh.get(dataset, files)
        second = time.perf_counter() - t
        print(f"second identical request ({len(files)} files, new cache object, same disk): {second * 1000:.1f} ms, "
              f"images encoded: {fresh.stats['images_encoded']} (goal 0)")


if __name__ == "__main__":
    main()
