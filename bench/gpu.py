"""Every GPU figure the README and the benchmarks promise, in one command (``make bench-gpu``), ≤ 8 minutes on one GPU.

Figures, each printed on its own labelled line (``[figure] label: value``):

1. encode images/s of ``Backbone.encode_images`` on ViT-B/16 (bf16 autocast, channels_last as the
   pipeline) and the fraction of the bf16 dense roofline it reaches (FLOPs counted on the model
   by ``torch.utils.flop_counter``; the peak from a small table of GPUs or ``--peak-tflops``);
2. the whole ``FeatureCache.get`` pipeline (decode + preprocess + encode) with the DataLoader
   workers ``num_workers="auto"`` gives, and its ratio to encode alone (goal ≥ 0.9 on a GPU);
3. step time (median / min) and peak memory of CLIP-LoRA, CLIP-SVD, CoOp (batch 32) and MaPLe
   (batch 4) — the reference batch sizes — under the device's default AMP (fp16 autocast with a
   gradient scaler on CUDA), each in its own process so each peak is its own, and CLIP-SVD /
   CLIP-LoRA;
4. a 16-shot CLIP-LoRA run end to end (sample, encode, fit, evaluate) on 10 classes with
   ``--e2e-iterations`` iterations, and the time the default 500 × 16 iterations would take
   (measured overhead + default iterations × measured step time, labelled "extrapolated");
5. fp16 and bf16 autocast against fp32: zero-shot logits of the same images, max and mean
   |Δ logit| and top-1 agreement.

Pretrained weights are used when they load offline (``--pretrained``, default ``openai``);
otherwise the weights are random (said in the header): step times, memory and throughput do not
depend on the weight values, agreement figures do a little. On a CPU (or with ``--tiny``) it runs
the offline ``workbench-tiny`` model at small sizes and says that these are not GPU figures;
tests/test_bench.py runs ``--tiny`` on CPU.

Usage: python bench/gpu.py [--device auto|cuda:N] [--tiny] [--peak-tflops T] [--e2e-iterations N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; --peak-tflops overrides
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0,
                    "RTX 6000 Ada": 364.0}


def peak_for(name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # the most specific name first
        if key.lower() in name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


def figure(label: str, value: str) -> None:
    print(f"[figure] {label}: {value}", flush=True)


def sizes(tiny: bool) -> dict:
    if tiny:
        return {"backbone": "workbench-tiny", "encode_n": 16, "encode_batch": 8, "pipe_n": 16, "pipe_batch": 8,
                "steps": 1, "classes": 3, "batch": 4, "maple_batch": 4, "shots": 2, "e2e_iterations": 2, "agree_n": 8,
                "maple_depth": 3, "in_process": True, "repeats": 1}
    return {"backbone": "ViT-B-16-quickgelu", "encode_n": 4096, "encode_batch": 256, "pipe_n": 2048,
            "pipe_batch": 128, "steps": 10, "classes": 10, "batch": 32, "maple_batch": 4, "shots": 16,
            "e2e_iterations": 300, "agree_n": 256, "maple_depth": 9, "in_process": False, "repeats": 3}


def load(name: str, pretrained: str | None, device, precision: str = "auto"):
    """(backbone, weights): the pretrained weights when they load offline, else random ones."""
    import workbench as wb
    from workbench.errors import BackboneError

    if pretrained and name != "workbench-tiny":
        try:
            return wb.load_backbone(name, pretrained, device=device, precision=precision), pretrained
        except (BackboneError, OSError, RuntimeError) as err:
            warnings.warn(f"{name} {pretrained} not reachable ({str(err).splitlines()[0][:120]}); random weights")
    return wb.load_backbone(name, None, device=device, precision=precision), "random-init"


def encode_figures(args, dev, sz) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import workbench as wb

    precision = "amp_bf16" if dev.cuda else "fp32"
    backbone, weights = load(sz["backbone"], args.pretrained, dev.device, precision)
    size, batch, n = backbone.image_size, sz["encode_batch"], sz["encode_n"]
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # FLOPs (2 per multiply-add) of one image
        backbone.model.encode_image(torch.zeros(1, 3, size, size, device=dev.device))
    gflop = counter.get_total_flops() / 1e9
    channels_last = wb.FeatureCache(backbone, None, show_progress=False).channels_last
    if channels_last:
        backbone.model.to(memory_format=torch.channels_last)
    pixels = torch.randn(batch, 3, size, size).pin_memory() if dev.cuda else torch.randn(batch, 3, size, size)

    def run():
        for _ in range(0, n, batch):
            x = pixels.to(dev.device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            backbone.encode_images(x, normalize=False)
        dev.synchronize()

    run()  # warm-up (cuDNN / kernels chosen)
    times = []
    for _ in range(sz["repeats"]):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    rate = n / statistics.median(times)
    layout = "channels_last" if channels_last else "contiguous"
    figure(f"encode alone, {backbone.name} ({weights}), {precision}, batch {batch}, {layout}",
           f"{rate:,.0f} img/s (median of {len(times)} x {n} images; best {n / min(times):,.0f})")
    peak = args.peak_tflops or (peak_for(dev.name()) if dev.cuda else None)
    achieved = rate * gflop / 1000
    if peak:
        figure("encode fraction of the bf16 dense roofline",
               f"{100 * achieved / peak:.1f}% ({achieved:.1f} of {peak:g} TFLOP/s; {gflop:.1f} GFLOP per image counted)")
    else:
        figure("encode fraction of the bf16 dense roofline",
               f"n/a ({achieved:.2f} TFLOP/s at {gflop:.2f} GFLOP per image; no peak known for this device: "
               "--peak-tflops)")
    del backbone
    return rate


def pipeline_figures(args, dev, sz) -> None:
    import torch

    import workbench as wb
    from workbench.data.dataset import Sample
    from workbench.features import resolve_num_workers

    backbone, weights = load(sz["backbone"], args.pretrained, dev.device)
    dataset = wb.load_dataset("whu_rs19_mini")
    files = [s for split in sorted(dataset.splits) for s in dataset.splits[split]]
    n, batch = sz["pipe_n"], sz["pipe_batch"]
    samples = [Sample(f"{i}:{files[i % len(files)].id}", files[i % len(files)].label, files[i % len(files)].ref)
               for i in range(n)]
    workers = resolve_num_workers("auto", n, batch) if dev.cuda else 0
    cache = wb.FeatureCache(backbone, None, batch_size=batch, num_workers=workers, show_progress=False)
    size = backbone.image_size
    pixels = torch.randn(batch, 3, size, size)

    def encode():
        for _ in range(0, n, batch):
            cache._encode_batch(pixels)  # the pipeline's own encode step (layout, chunking), on ready tensors
        dev.synchronize()

    def pipeline():
        wb.FeatureCache(backbone, None, batch_size=batch, num_workers=workers, show_progress=False).get(dataset, samples)
        dev.synchronize()

    rates = {}
    for name, fn in (("encode", encode), ("pipeline", pipeline)):
        fn()
        times = []
        for _ in range(sz["repeats"]):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        rates[name] = n / statistics.median(times)
    figure(f"pipeline (FeatureCache.get: decode + preprocess + encode), {workers} DataLoader workers, "
           f"{backbone.precision}, batch {batch}", f"{rates['pipeline']:,.0f} img/s; encode alone {rates['encode']:,.0f} img/s")
    figure("pipeline / encode ratio", f"{rates['pipeline'] / rates['encode']:.2f} (goal >= 0.9 on a GPU)")


def _measure(script: str, argv: list[str], in_process: bool) -> dict:
    """One configuration of ``bench/<script>.py --one ...``: its own process (its own peak memory) unless ``in_process``."""
    if in_process:  # --tiny: seconds matter more than separate peaks (the peak is then the shared process RSS)
        import contextlib
        import io

        module = __import__(script)
        buf = io.StringIO()
        old = sys.argv
        sys.argv = [script] + argv
        try:
            with contextlib.redirect_stdout(buf):
                module.main()
        finally:
            sys.argv = old
        return json.loads(buf.getvalue().strip().splitlines()[-1])
    out = subprocess.run([sys.executable, os.path.join(HERE, f"{script}.py")] + argv, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError((out.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_figures(args, dev, sz) -> None:
    from bench_device import ratio

    rows, batch, shared = {}, sz["batch"], " shared by all configurations" if sz["in_process"] else ""
    for label, method in (("CLIP-LoRA", "clip_lora"), ("CLIP-SVD", "clip_svd"), ("CoOp", "coop")):
        try:
            r = _measure("fine_tuning", ["--one", method, str(sz["classes"]), "--backbone", sz["backbone"], "--steps",
                                         str(sz["steps"]), "--device", str(dev.device), "--batch", str(batch)],
                         sz["in_process"])
        except Exception as err:
            figure(f"{label} step, batch {batch}", f"failed: {err}")
            continue
        rows[label] = r
        figure(f"{label} step, batch {batch}, {sz['classes']} classes, {r['precision']}",
               f"median {r['step_s']:.4f} s, min {r['step_min_s']:.4f} s; peak {r['peak_mib']:,.0f} MiB "
               f"({dev.peak_kind}{shared}); {r['trainable']:,} trainable")
    try:
        r = _measure("prompt_learners", ["--one", "maple", "--backbone", sz["backbone"], "--device", str(dev.device),
                                         "--classes", str(sz["classes"]), "--repeats", "5",
                                         "--maple-depth", str(sz["maple_depth"]), "--truncation", "on"],
                     sz["in_process"])
    except Exception as err:
        figure("MaPLe step, batch 4", f"failed: {err}")
    else:
        t, f = r["times"]["maple"]["on"], r["times"]["frozen"]["on"]
        figure(f"MaPLe step, batch 4, depth {sz['maple_depth']}, {sz['classes']} classes, {r['precision']}",
               f"median {t['median']:.4f} s, min {t['min']:.4f} s; peak {r['peak_mib']['on']:,.0f} MiB "
               f"({dev.peak_kind}{shared}); frozen forward + backward {f['median']:.4f} s "
               f"(MaPLe / frozen {ratio(t['median'], f['median'])}, goal <= 1.5x)")
    if "CLIP-SVD" in rows and "CLIP-LoRA" in rows:
        a, b = rows["CLIP-SVD"], rows["CLIP-LoRA"]
        figure("CLIP-SVD / CLIP-LoRA", f"step median {ratio(a['step_s'], b['step_s'])} (goal <= 1.3x), "
               f"peak memory {ratio(a['peak_mib'], b['peak_mib'])}")


def end_to_end_figure(args, dev, sz) -> None:
    import numpy as np

    import workbench as wb

    iterations = args.e2e_iterations or sz["e2e_iterations"]
    rng = np.random.default_rng(0)
    classes, shots = sz["classes"], sz["shots"]
    counts = {"train": shots + 4, "test": 10 if shots == 16 else 2}
    side = 64
    images = {s: rng.integers(0, 256, (classes * c, side, side, 3), dtype=np.uint8) for s, c in counts.items()}
    labels = {s: np.repeat(np.arange(classes), c) for s, c in counts.items()}
    for s in images:  # a class-coloured square so the task is learnable
        for i, y in enumerate(labels[s]):
            images[s][i, 16:48, 16:48] = (25 * y, 255 - 25 * y, 128)
    dataset = wb.data.from_arrays(images, labels, name="bench_gpu_10", class_names=[f"colour {i}" for i in range(classes)])
    t0 = time.perf_counter()
    backbone, weights = load(sz["backbone"], args.pretrained, dev.device)
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        run = wb.run_experiment(dataset, backbone, "clip_lora", shots=shots, seed=1, split_dir=tmp,
                                method_params={"iterations": iterations, "batch_size": sz["batch"]})
        dev.synchronize()
        total = time.perf_counter() - t1
    steps = run.method.fit_info.get("iterations", iterations)
    train_s = run.row.get("fit_seconds")  # fitting alone (text + training + WiSE-FT choice), without encode/evaluate
    figure(f"CLIP-LoRA {shots}-shot end to end, {classes} classes ({weights}, {backbone.precision}), batch "
           f"{sz['batch']}, {steps} iterations",
           f"{total:.1f} s (backbone load {t1 - t0:.1f} s not included)")
    if train_s:
        per_step = float(train_s) / max(int(steps), 1)
        default = 500 * shots
        figure(f"CLIP-LoRA {shots}-shot end to end at the default {default} iterations (extrapolated)",
               f"{total - float(train_s) + default * per_step:.0f} s (fit seconds / iterations = {per_step:.4f} s, "
               "which includes the fit's fixed costs: an upper bound)")


def agreement_figure(args, dev, sz) -> None:
    import torch
    import torch.nn.functional as F

    import workbench as wb

    backbone, weights = load(sz["backbone"], args.pretrained, dev.device, "fp32")
    dataset = wb.load_dataset("whu_rs19_mini")
    files = [s for split in sorted(dataset.splits) for s in dataset.splits[split]][:sz["agree_n"]]
    pixels = torch.stack([backbone.preprocess(dataset.load_image(s)) for s in files]).to(dev.device)
    tokens = backbone.tokenize([f"a satellite photo of a {c}." for c in dataset.class_names]).to(dev.device)
    model, scale = backbone.model, backbone.logit_scale

    def logits(dtype):
        ctx = torch.autocast(device_type=dev.device.type, dtype=dtype) if dtype else torch.autocast(dev.device.type, enabled=False)
        with torch.no_grad(), ctx:
            img = F.normalize(model.encode_image(pixels).float(), dim=-1)
            txt = F.normalize(model.encode_text(tokens).float(), dim=-1)
        return scale * img @ txt.T

    ref = logits(None)
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        try:
            out = logits(dtype)
        except Exception as err:  # e.g. an autocast dtype this device does not support
            figure(f"{name} autocast vs fp32 zero-shot logits", f"n/a on {dev.device} ({type(err).__name__})")
            continue
        diff = (out - ref).abs()
        agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
        figure(f"{name} autocast vs fp32 zero-shot logits ({len(files)} images x {len(dataset.class_names)} classes, "
               f"{weights})", f"max |d| {diff.max().item():.4f}, mean |d| {diff.mean().item():.5f}, "
               f"top-1 agreement {100 * agree:.1f}%")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--tiny", action="store_true", help="the offline workbench-tiny model at tiny sizes (seconds)")
    ap.add_argument("--pretrained", default="openai", help="weights to try first; random weights if they do not load")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the GPU's dense bf16 peak (else from the table)")
    ap.add_argument("--e2e-iterations", type=int, default=0, help="CLIP-LoRA iterations of the end-to-end run")
    ap.add_argument("--only", default="encode,pipeline,steps,e2e,agreement")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    import torch

    from bench_device import BenchDevice

    dev = BenchDevice(args.device)
    tiny = args.tiny or not dev.cuda
    sz = sizes(tiny)
    start = time.perf_counter()
    print(f"bench/gpu.py: {dev.header()}")
    print(json.dumps({"figure_context": dev.describe()}))
    if not dev.cuda:
        print("NOTE: not a GPU — workbench-tiny at small sizes; these figures show the script runs, they are not GPU "
              "figures" + (" (--tiny)" if args.tiny else ""))
    elif tiny:
        print("NOTE: --tiny — workbench-tiny at small sizes on the GPU; not the ViT-B/16 figures")
    print(f"backbone {sz['backbone']} (pretrained '{args.pretrained}' if it loads offline, else random weights), "
          f"torch threads {torch.get_num_threads()}")
    sections = {"encode": encode_figures, "pipeline": pipeline_figures, "steps": step_figures,
                "e2e": end_to_end_figure, "agreement": agreement_figure}
    for name in args.only.split(","):
        t = time.perf_counter()
        sections[name](args, dev, sz)
        if dev.cuda:
            torch.cuda.empty_cache()
        print(f"  ({name}: {time.perf_counter() - t:.1f} s)", flush=True)
    print(f"total {time.perf_counter() - start:.1f} s on {dev.name()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
