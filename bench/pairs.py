"""Contrastive fine-tuning on pairs and retrieval metrics: time and memory against plain baselines.

1. Contrastive step (``--part steps``): one training step of the CLIP loss on a batch of (image,
   caption) pairs (default 64) for

   * ``pairs_lora``, ``pairs_svd``, ``pairs_full``: the methods' own ``_build`` (trainable copy,
     split attention, peft / SVDLinear; full: every weight of both towers) and loss;
   * ``plain_full``: the plain baseline — the open_clip model itself, every parameter trainable,
     the symmetric InfoNCE written inline on full-length (77-token) captions (what FLYP's loop
     does), no workbench code. The methods run the text tower only up to the longest caption.

   Each configuration runs in its own process, so its peak memory (max RSS on CPU,
   ``torch.cuda.max_memory_allocated`` on CUDA) is its own; step time is the min and median of the
   timed steps after one warm-up step. Printed ratios: each configuration / ``plain_full``.

2. Retrieval metrics (``--part retrieval``): R@1/5/10 both ways and mean recall for N images ×
   5N captions (default 10,000 × 50,000, 512-d random features) by ``workbench.retrieval`` (chunked)
   and by the plain baseline with the reference's footprint (RemoteCLIP ``retrieval.py`` /
   clip_benchmark ``recall_at_k``): the full texts × images score matrix at once, then ``topk``
   (its one-hot step replaced by a gather, which only speeds the baseline up). Both in this
   process; the recalls must agree; printed: seconds, peak extra memory (RSS) and the ratios.

Usage:
  python bench/pairs.py                                   # both parts, offline model, CPU
  python bench/pairs.py --part steps --batch 64 --steps 5
  python bench/pairs.py --part retrieval --images 10000
  python bench/pairs.py --backbone ViT-B-16 --batch 16   # random ViT-B/16 (same cost as trained weights)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = ("pairs_lora", "pairs_svd", "pairs_full", "plain_full")


def _peak_memory_mb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_step(config: str, backbone_name: str, batch: int, steps: int, device: str) -> dict:
    import warnings

    import torch
    import torch.nn.functional as F

    import peft  # noqa: F401  (imported by every configuration, so the library's memory is not a difference)
    import workbench as wb
    from workbench.methods.pairs.contrastive import clip_loss

    warnings.simplefilter("ignore")
    bb = wb.load_backbone(backbone_name, device=device, precision="fp32")
    dev = bb.device
    torch.manual_seed(0)
    pixels = torch.randn(batch, 3, bb.image_size, bb.image_size, device=dev)
    tokens = bb.tokenize([f"a satellite photo number {i} of a scene" for i in range(batch)]).to(dev)
    if config == "plain_full":
        model = bb.model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        inner = model
    else:
        method = wb.get_method(config)
        model, inner, _ = method._build(bb, method.config)
        model.train()
        from workbench.towers.text import TextTower

        tower = TextTower(inner)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def step():
        if config == "plain_full":
            img = F.normalize(model.encode_image(pixels), dim=-1)
            txt = F.normalize(model.encode_text(tokens), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.T
            target = torch.arange(batch, device=dev)
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        else:   # the methods' loss: captions run up to the longest real one (towers.text)
            img = F.normalize(model.encode_image(pixels).float(), dim=-1)
            txt = F.normalize(tower.encode(tower.embed(tokens), tokens).float(), dim=-1)
            loss = clip_loss(img, txt, inner.logit_scale.exp().clamp(max=100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"config": config, "min_s": times[0], "median_s": times[len(times) // 2],
            "peak_mb": _peak_memory_mb(dev), "trainable": sum(p.numel() for p in params)}


def part_steps(args) -> None:
    rows = {}
    for config in args.configs.split(","):
        cmd = [sys.executable, __file__, "--child", config, "--backbone", args.backbone, "--batch", str(args.batch),
               "--steps", str(args.steps), "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
        if out.returncode:
            print(out.stderr[-2000:])
            raise SystemExit(f"{config} failed")
        rows[config] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"contrastive step, {args.backbone}, batch {args.batch}, device {args.device}, {args.steps} timed steps")
    print(f"{'config':12s} {'trainable':>11s} {'min s':>8s} {'median s':>9s} {'peak MB':>9s} {'time/plain':>10s} "
          f"{'mem/plain':>9s}")
    base = rows.get("plain_full")
    for name, r in rows.items():
        rt = f"{r['median_s'] / base['median_s']:.2f}" if base else "-"
        rm = f"{r['peak_mb'] / base['peak_mb']:.2f}" if base else "-"
        print(f"{name:12s} {r['trainable']:11d} {r['min_s']:8.3f} {r['median_s']:9.3f} {r['peak_mb']:9.0f} "
              f"{rt:>10s} {rm:>9s}")


def plain_recalls(img, txt, owner, ks=(1, 5, 10)) -> dict:
    """The reference's footprint: the full texts x images score matrix at once, then ``torch.topk`` per
    direction (RemoteCLIP retrieval.py / clip_benchmark recall_at_k). Its one-hot of the top-k
    (texts x k x images) is replaced by a gather of the positives, which only makes this baseline faster."""
    import torch

    scores = txt @ img.T                                          # texts x images, all at once
    kmax = max(ks)
    t2i_top = torch.topk(scores, kmax, dim=1)[1]                  # texts x k
    t2i_hit = t2i_top == owner[:, None]
    i2t_top = torch.topk(scores.T, kmax, dim=1)[1]                # images x k (caption indices)
    i2t_hit = owner[i2t_top] == torch.arange(len(img))[:, None]
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float(i2t_hit[:, :k].any(1).double().mean()) * 100
    for k in ks:
        out[f"t2i_R@{k}"] = float(t2i_hit[:, :k].any(1).double().mean()) * 100
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def part_retrieval(args) -> None:
    import threading

    import torch
    import torch.nn.functional as F

    from workbench.retrieval import retrieval_recalls

    n_img, per, d = args.images, 5, 512
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(n_img, d, generator=g), dim=-1)
    owner = torch.arange(n_img).repeat_interleave(per)
    txt = F.normalize(img[owner] + 0.9 * torch.randn(len(owner), d, generator=g), dim=-1)

    def measured(fn):
        peak = {"mb": _rss_mb()}
        start_mb = peak["mb"]
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                peak["mb"] = max(peak["mb"], _rss_mb())
                time.sleep(0.02)
        th = threading.Thread(target=watch)
        th.start()
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        stop.set()
        th.join()
        return out, seconds, peak["mb"] - start_mb

    ours, t_ours, m_ours = measured(lambda: retrieval_recalls(img, txt, owner))
    plain, t_plain, m_plain = measured(lambda: plain_recalls(img, txt, owner))
    same = all(abs(ours[k] - plain[k]) < 1e-6 for k in ours)
    print(f"retrieval metrics, {n_img} images x {len(owner)} captions, {d}-d, {torch.get_num_threads()} threads")
    print(f"{'':22s} {'seconds':>8s} {'extra MB':>9s} {'mean recall':>12s}")
    print(f"{'workbench (chunked)':22s} {t_ours:8.2f} {m_ours:9.0f} {ours['mean_recall']:12.4f}")
    print(f"{'plain (full matrix)':22s} {t_plain:8.2f} {m_plain:9.0f} {plain['mean_recall']:12.4f}")
    print(f"ratio workbench/plain: time {t_ours / t_plain:.2f}, extra memory {m_ours / max(m_plain, 1e-9):.3f}; "
          f"recalls equal: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("steps", "retrieval", "both"), default="both")
    ap.add_argument("--backbone", default="workbench-tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_step(args.child, args.backbone, args.batch, args.steps, args.device)))
        return
    if args.part in ("steps", "both"):
        part_steps(args)
    if args.part in ("retrieval", "both"):
        part_retrieval(args)


if __name__ == "__main__":
    main()
