"""Train-step time and peak memory of CLIP-LoRA, CLIP-SVD and CoOp next to two plain baselines.

Configurations (each in its own process, so that peak memory — max RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA — is its own; the same batch of random pixels, all
class prompts re-encoded every step):

* ``clip_lora``, ``clip_svd``: the methods' own ``_build`` (split attention, peft / SVDLinear);
* ``full_ft``: the Linear layers CLIP-SVD targets (q, k, v, out-proj, fc1, fc2 of both towers)
  made fully trainable, plain weight gradients. Any method that needs ``∂L/∂s`` needs the weight
  gradient ``dyᵀ·x`` of those layers (or an equally costly substitute), so this is CLIP-SVD's
  floor; LoRA never forms a weight gradient of the frozen ``W``;
* ``minimal_lora``: a bare hand-written rank-2 q/k/v LoRA (rsLoRA scale, dropout 0.25 per
  projection as the reference) patched *in place* into the backbone's own fused attention: no
  copy of the model, no split layers, no peft — the plain baseline for CLIP-LoRA's memory;
* ``coop``: the text encoder only, with learned context vectors.

Every process imports peft first, so that the library's own resident memory (about 50 MB)
is not counted as a difference between configurations. Step times are the min and median over the timed steps (after one warm-up step). Printed ratios:
CLIP-SVD / CLIP-LoRA and CLIP-SVD / full_ft step time (issue 13's goal: CLIP-SVD ≤ 1.3×
CLIP-LoRA), CLIP-LoRA / minimal_lora step time and peak memory (issue 16's goal: memory ≤ 1.05×).
``--counts`` prints the trainable-parameter counts of CLIP-LoRA and CLIP-SVD with their
reference defaults on ViT-B-16 (random weights: same shapes).

Usage:
  python bench/fine_tuning.py                                  # offline default model, CPU
  python bench/fine_tuning.py --backbone ViT-B-16-quickgelu    # e.g. on a GPU (random weights: same cost)
  python bench/fine_tuning.py --classes 10 --batch 8 --methods clip_lora,minimal_lora
  python bench/fine_tuning.py --counts                         # trainable parameters on ViT-B-16
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CLASSES = (10, 100, 1000)
METHODS = ("clip_lora", "clip_svd", "full_ft", "minimal_lora", "coop")


def minimal_qkv_lora(model, r: int = 2, alpha: float = 1.0, dropout: float = 0.25) -> list:
    """Rank-``r`` LoRA on q, k and v of every ``nn.MultiheadAttention`` of ``model``, in place.

    The fused ``in_proj_weight`` is used as it is (no split, no copy); each attention module's
    forward becomes ``in_proj(x) + cat_i(s·B_i·A_i·dropout_i(x))`` followed by the usual
    attention. Returns the new trainable parameters. Only open_clip's self-attention call
    (``attn(x, x, x, need_weights=False, attn_mask=...)``, batch first) is handled.
    """
    import math

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    params = []
    for module in list(model.modules()):
        if not isinstance(module, nn.MultiheadAttention):
            continue
        d, heads = module.embed_dim, module.num_heads
        a = nn.Parameter(torch.empty(3, r, d, device=module.in_proj_weight.device))
        for i in range(3):
            nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))
        b = nn.Parameter(torch.zeros(3, d, r, device=module.in_proj_weight.device))
        module.lora_a, module.lora_b = a, b
        drops = [nn.Dropout(dropout) for _ in range(3)]
        scale = alpha / math.sqrt(r)

        def forward(query, key, value, need_weights=False, attn_mask=None, _m=module, _a=a, _b=b, _drops=drops,
                    _d=d, _h=heads, **_):
            x = query if _m.batch_first else query.transpose(0, 1)
            n, length, _ = x.shape
            delta = torch.cat([F.linear(F.linear(drop(x), _a[i]), _b[i]) for i, drop in enumerate(_drops)], -1)
            qkv = F.linear(x, _m.in_proj_weight, _m.in_proj_bias) + scale * delta
            q, k, v = (t.view(n, length, _h, _d // _h).transpose(1, 2) for t in qkv.chunk(3, -1))
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(attn_mask, float("-inf"))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            out = _m.out_proj(out.transpose(1, 2).reshape(n, length, _d))
            return (out if _m.batch_first else out.transpose(0, 1)), None

        module.forward = forward
        for drop in drops:
            drop.train()
        params += [a, b]
    return params


def measure(method: str, n_classes: int, backbone_name: str, steps: int, device: str, batch: int = 32) -> dict:
    import warnings

    import torch
    import torch.nn.functional as F

    import workbench as wb
    from workbench.methods.prompts.coop import PromptLearner
    from workbench.towers import linear_layers, trainable_copy
    from workbench.towers.text import TextTower
    from workbench.training import TrainConfig, train

    import peft  # noqa: F401  every process pays the same library RSS (~50 MB on CPU), so configurations differ only by model memory

    from bench_device import BenchDevice

    warnings.simplefilter("ignore")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    bench_dev = BenchDevice(device)  # resolved once: every sync / peak / name call below names this device
    backbone = wb.load_backbone(backbone_name, device=bench_dev.device)
    dev = backbone.device
    names = [f"class number {i}" for i in range(n_classes)]
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, n_classes, (batch,), generator=g).to(dev)
    scale = backbone.logit_scale
    stamps = []

    def stamp():  # the start of each step's forward pass: consecutive stamps are whole steps
        bench_dev.synchronize()
        stamps.append(time.perf_counter())

    if method in ("clip_lora", "clip_svd", "full_ft", "minimal_lora"):
        if method in ("clip_lora", "clip_svd"):
            model, _ = wb.get_method(method)._build(backbone)
        elif method == "full_ft":  # the Linears CLIP-SVD targets, with plain weight gradients
            model = trainable_copy(backbone)
            cfg_svd = wb.get_method("clip_svd").config
            modules = dict(model.named_modules())
            for name in linear_layers(model, cfg_svd.encoder, cfg_svd.params, cfg_svd.blocks):
                modules[name].weight.requires_grad_(True)
        else:  # minimal_lora: in place on the backbone's own model, nothing copied
            model = backbone.model
            for p in model.parameters():
                p.requires_grad_(False)
            minimal_qkv_lora(model)
        tokens = backbone.tokenize([f"a photo of a {n}." for n in names]).to(dev)
        pixels = torch.randn(batch, 3, backbone.image_size, backbone.image_size, generator=g).to(dev)

        def loss_fn(batch_):
            stamp()
            img = F.normalize(model.encode_image(pixels).float(), dim=-1)
            txt = F.normalize(model.encode_text(tokens).float(), dim=-1)
            return F.cross_entropy(scale * img @ txt.T, labels)

        module, cfg = model, TrainConfig(epochs=1, max_steps=steps, optimizer="adamw", lr=2e-4, weight_decay=1e-2)
    else:
        for p in backbone.model.parameters():
            p.requires_grad_(False)
        tower = TextTower(backbone.model)
        module = PromptLearner(tower, backbone.tokenizer, names, 16, "", False, "end", 0.02, g)
        feats = F.normalize(torch.randn(batch, backbone.model.text_projection.shape[1], generator=g), dim=-1).to(dev)

        def loss_fn(batch_):
            stamp()
            txt = F.normalize(tower.encode(module(), module.tokens).float(), dim=-1)
            return F.cross_entropy(scale * feats @ txt.T, labels)

        cfg = TrainConfig(epochs=1, max_steps=steps, optimizer="sgd", lr=0.002, weight_decay=5e-4)

    def batches(epoch, gen):
        for _ in range(steps):
            yield None

    run = lambda n: train(module, loss_fn, batches, TrainConfig(**{**cfg.__dict__, "max_steps": n}),  # noqa: E731
                          device=dev, precision=backbone.precision, steps_per_epoch=steps, show_progress=False)
    run(1)  # warm-up
    bench_dev.synchronize()
    bench_dev.reset_peak()
    stamps.clear()
    run(steps)
    stamp()
    times = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    step, step_min = times[len(times) // 2], times[0]
    peak, name = bench_dev.peak_mib(), bench_dev.name()
    return {"method": method, "classes": n_classes, "batch": batch, "step_s": step, "step_min_s": step_min,
            "peak_mib": peak, "device": name, "precision": backbone.precision,
            "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad)}


def trainable_counts(backbone_name: str = "ViT-B-16") -> dict:
    """Trainable parameters of CLIP-LoRA and CLIP-SVD (reference defaults) on randomly initialised weights."""
    import types

    import open_clip
    import torch

    import workbench as wb

    from workbench.towers import linear_layers, trainable_copy

    model = open_clip.create_model(backbone_name, pretrained=None)
    fake = types.SimpleNamespace(model=model, device=torch.device("cpu"))  # _build reads only these
    adapted, names = wb.get_method("clip_lora")._build(fake)
    counts = {"clip_lora": (sum(p.numel() for p in adapted.parameters() if p.requires_grad), len(names))}
    # CLIP-SVD trains one singular value per min(out, in) of each targeted Linear (SVDLinear.s, tested
    # against add_svd in tests/test_towers.py); counted from the shapes, since 144 SVDs take minutes on a CPU
    cfg = wb.get_method("clip_svd").config
    split = trainable_copy(fake)
    names = linear_layers(split, cfg.encoder, cfg.params, cfg.blocks)
    modules = dict(split.named_modules())
    counts["clip_svd"] = (sum(min(modules[n].weight.shape) for n in names), len(names))
    return counts


def _ratio_line(label: str, results: dict, num: str, den: str, n: int, goal: str = "") -> str | None:
    """A ratio line; a zero (unmeasured) step time or peak prints ``n/a`` instead of dividing by it."""
    from bench_device import ratio

    if (num, n) not in results or (den, n) not in results:
        return None
    a, b = results[num, n], results[den, n]
    return (f"{label} at {n} classes: step median {ratio(a['step_s'], b['step_s'])}, "
            f"min {ratio(a['step_min_s'], b['step_min_s'])}; peak memory {ratio(a['peak_mib'], b['peak_mib'])}{goal}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="workbench-tiny")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=32, help="images per step (the methods' default is 32)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--classes", default=",".join(map(str, CLASSES)))
    ap.add_argument("--methods", default=",".join(METHODS), help=f"any of {', '.join(METHODS)}")
    ap.add_argument("--counts", action="store_true", help="only print trainable-parameter counts on ViT-B-16")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "CLASSES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.backbone, args.steps, args.device, args.batch)))
        return
    if args.counts:
        counts = trainable_counts()
        print("trainable parameters on ViT-B-16 (reference defaults): "
              f"CLIP-LoRA {counts['clip_lora'][0]:,} ({counts['clip_lora'][1]} layers; reference 184,320), "
              f"CLIP-SVD {counts['clip_svd'][0]:,} ({counts['clip_svd'][1]} layers; reference 92,160)")
        return
    print(f"backbone {args.backbone}, batch {args.batch}, {args.steps} timed steps per configuration, one process "
          f"each, {os.environ.get('OMP_NUM_THREADS', 'default')} threads")
    print(f"{'method':12s} {'classes':>7s} {'median (s)':>10s} {'min (s)':>8s} {'per class (ms)':>15s} "
          f"{'peak MiB':>9s} {'trainable':>11s}  device")
    results = {}
    for method in methods:
        for n in map(int, args.classes.split(",")):
            out = subprocess.run([sys.executable, __file__, "--one", method, str(n), "--backbone", args.backbone,
                                  "--steps", str(args.steps), "--device", args.device, "--batch", str(args.batch)],
                                 capture_output=True, text=True)
            if out.returncode:
                print(f"{method:12s} {n:7d}  failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[method, n] = r
            print(f"{method:12s} {n:7d} {r['step_s']:10.3f} {r['step_min_s']:8.3f} {1000 * r['step_s'] / n:15.2f} "
                  f"{r['peak_mib']:9.0f} {r['trainable']:11,d}  {r['device']} {r['precision']}", flush=True)
    for n in map(int, args.classes.split(",")):
        for line in (_ratio_line("CLIP-SVD / CLIP-LoRA", results, "clip_svd", "clip_lora", n, " (goal: step <= 1.3x)"),
                     _ratio_line("CLIP-SVD / full_ft", results, "clip_svd", "full_ft", n),
                     _ratio_line("CLIP-LoRA / minimal_lora", results, "clip_lora", "minimal_lora", n,
                                 " (goal: memory <= 1.05x)")):
            if line:
                print(line)


if __name__ == "__main__":
    main()
