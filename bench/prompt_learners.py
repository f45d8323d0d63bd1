"""Step cost of the prompt learners against CoOp and against a frozen backbone, baselines in the same process.

* CoCoOp conditions the context on each image, so a batch of B images needs B × C prompts
  through the text encoder. The workbench builds them by broadcasting and runs one batched call;
  the reference loops over images. Printed: CoCoOp's batched step at batch 32 against CoOp's step
  (C prompts), against 32 × CoOp's text encode (forward + backward of the C prompts to the
  context, nothing else) and against the per-image loop.
* Every text tower runs only up to the longest real prompt (``TextTower.truncate``, exact); each
  step is timed with truncation and, in the same process, without it (the full context length,
  as before) — the before/after effect. ``--truncation on|off`` times one only.
* MaPLe runs images and prompts through both (frozen, prompted) encoders. Printed: its step at
  the reference batch (4) against a plain forward + backward of the same images and class prompts
  through the frozen backbone (gradients to the pixels and token embeddings, the same depth of
  backward, the same truncation), goal ≤ 1.5×.

Each configuration runs in its own process with its baselines (CoCoOp with CoOp's step and
CoOp's text encode, the per-image loop with the batched step, MaPLe with the frozen
forward + backward): every (step, truncation) pair gets one warm-up, then they alternate step by
step for ``--repeats`` (≥ 5) rounds, so a change of the machine's load hits all alike; min and
median per pair, ratios of the medians (and of the mins) within one process. Peak memory is the
configuration's own (max RSS on CPU: its truncated warm-up runs first in the process, so the
truncated peak is its own and the full-length one is the peak after both;
``torch.cuda.max_memory_allocated`` of its own steps on CUDA).

Usage:
  OMP_NUM_THREADS=2 python bench/prompt_learners.py                 # offline model, CPU
  python bench/prompt_learners.py --backbone ViT-B-16-quickgelu     # e.g. on a GPU (random weights: same cost)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings

STEPS = ("coop", "coop_text", "cocoop_batched", "cocoop_loop", "frozen", "maple")
#: steps timed in the same process as each configuration, for the ratios
BASELINES = {"cocoop_batched": ("coop", "coop_text"), "cocoop_loop": ("cocoop_batched",), "maple": ("frozen",)}
LABELS = {"coop": "CoOp, batch 32 (C prompts)", "coop_text": "CoOp text encode alone (C prompts)",
          "cocoop_batched": "CoCoOp, batch 32, batched (32 x C prompts)",
          "cocoop_loop": "CoCoOp, batch 32, per-image loop (reference)",
          "frozen": "frozen backbone forward + backward, batch 4", "maple": "MaPLe, batch 4"}
MODES = {"on": "truncated", "off": "full length"}


def build_steps(names_needed, args):
    """``{name: (step, text towers)}`` on one backbone, plus facts about the run."""
    import torch
    import torch.nn.functional as F

    import workbench as wb
    from workbench.methods.prompts.cocoop import conditional_logits
    from workbench.methods.prompts.coop import PromptLearner

    from bench_device import BenchDevice

    warnings.simplefilter("ignore")
    bench_dev = BenchDevice(args.device)  # resolved once: every sync / peak / name call names this device
    backbone = wb.load_backbone(args.backbone, device=bench_dev.device)
    dev, model = backbone.device, backbone.model
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    names = [f"class number {i}" for i in range(args.classes)]
    g = torch.Generator().manual_seed(0)
    dim = int(backbone.encode_images(torch.zeros(1, 3, backbone.image_size, backbone.image_size)).shape[-1])
    feats32 = F.normalize(torch.randn(32, dim, generator=g), dim=-1).to(dev)
    labels32 = torch.randint(0, args.classes, (32,), generator=g).to(dev)
    pixels = torch.randn(4, 3, backbone.image_size, backbone.image_size, generator=g).to(dev)
    scale = backbone.logit_scale
    tower, conditional = wb.get_method("cocoop")._build(backbone, names, dim, seed=0)
    learner = PromptLearner(tower, backbone.tokenizer, names, 4, "a photo of a", False, "end", 0.02, g)
    steps = {}

    def coop():  # the text side only: image features come from the cache
        txt = F.normalize(tower.encode(learner(), learner.tokens).float(), dim=-1)
        F.cross_entropy(scale * feats32 @ txt.T, labels32).backward()

    def coop_text():  # CoOp's text encode alone: C prompts forward + backward to the context
        tower.encode(learner(), learner.tokens).float().sum().backward()

    def cocoop_batched():  # one text-encoder call on 32 x C prompts
        F.cross_entropy(conditional_logits(conditional, tower, feats32, scale, 0.0), labels32).backward()

    def cocoop_loop():  # the reference's loop over images
        loss = sum(F.cross_entropy(conditional_logits(conditional, tower, feats32[i:i + 1], scale, 0.0),
                                   labels32[i:i + 1]) for i in range(32)) / 32
        loss.backward()

    for name, fn in [("coop", coop), ("coop_text", coop_text), ("cocoop_batched", cocoop_batched),
                     ("cocoop_loop", cocoop_loop)]:
        steps[name] = (fn, [tower])
    if "frozen" in names_needed:  # the same 4 images and C prompts, gradients through both frozen towers
        tokens = backbone.tokenize([f"a photo of a {n}." for n in names]).to(dev)
        embeddings = tower.embed(tokens).detach()

        def frozen():
            px, emb = pixels.clone().requires_grad_(True), embeddings.clone().requires_grad_(True)
            img = F.normalize(model.encode_image(px).float(), dim=-1)
            txt = F.normalize(tower.encode(emb, tokens).float(), dim=-1)
            F.cross_entropy(scale * img @ txt.T, labels32[:4]).backward()
        steps["frozen"] = (frozen, [tower])
    if "maple" in names_needed:  # MaPLe at the reference batch of 4: images stream through the prompted encoder
        maple_method = wb.get_method("maple", prompt_depth=args.maple_depth)
        text, vision, prompts = maple_method._build(backbone, names, seed=0)

        def maple():
            shallow, deep = prompts.vision_prompts()
            with vision.prompts(shallow, deep):
                img = F.normalize(model.encode_image(pixels).float(), dim=-1)
            txt = maple_method._text_features(text, prompts)
            F.cross_entropy(scale * img @ txt.T, labels32[:4]).backward()
        steps["maple"] = (maple, [text.tower])
    facts = {"device": bench_dev.name(), "bench_device": bench_dev,
             "precision": backbone.precision, "context_length": int(backbone.tokenize(["x"]).shape[-1]),
             "active_length": tower.active_length(backbone.tokenize([f"a photo of a {n}." for n in names]))}
    return {k: v for k, v in steps.items() if k in names_needed}, backbone, facts


def measure(which: str, args) -> dict:
    """Times of ``which`` and its baselines, both truncation modes, alternating; ``which``'s peak memory."""
    steps, backbone, facts = build_steps((which, *BASELINES.get(which, ())), args)
    bench_dev = facts.pop("bench_device")
    pairs = [(which, m) for m in args.modes] + [(b, m) for b in BASELINES.get(which, ()) for m in args.modes]

    sync, peak_mib = bench_dev.synchronize, bench_dev.peak_mib

    def run(name, mode):
        step, towers = steps[name]
        for t in towers:
            t.truncate = mode == "on"
        bench_dev.reset_peak()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - t0

    times, peaks = {p: [] for p in pairs}, {}
    with backbone.autocast():
        for p in pairs:  # warm-up; `which` first, so that its peak memory is its own
            run(*p)
            peaks[p] = peak_mib()
        for _ in range(args.repeats):
            for p in pairs:
                times[p].append(run(*p))
                if bench_dev.cuda:
                    peaks[p] = max(peaks[p], peak_mib())
    out = {**facts, "which": which, "times": {}}
    for (name, mode), ts in times.items():
        out["times"].setdefault(name, {})[mode] = {"min": min(ts), "median": statistics.median(ts)}
    out["peak_mib"] = {mode: peaks[(which, mode)] for mode in args.modes}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="workbench-tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--truncation", choices=["both", "on", "off"], default="both",
                    help="time with sequence truncation (on), at the full context length (off), or both in one process")
    ap.add_argument("--maple-depth", type=int, default=None, help="MaPLe prompt depth (default 9; 3 on workbench-tiny)")
    ap.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS), help="configurations to run")
    ap.add_argument("--one", choices=STEPS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats < 5:
        ap.error("--repeats must be at least 5 (min and median over >= 5 steps)")
    args.maple_depth = args.maple_depth or (3 if args.backbone == "workbench-tiny" else 9)
    args.modes = ["on", "off"] if args.truncation == "both" else [args.truncation]
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    rows = {}
    for which in args.only:  # one process each, so that each peak memory is its own
        cmd = [sys.executable, __file__, "--one", which, "--backbone", args.backbone, "--device", args.device,
               "--classes", str(args.classes), "--repeats", str(args.repeats), "--maple-depth", str(args.maple_depth),
               "--truncation", args.truncation]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{which}: failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        rows[which] = json.loads(out.stdout.strip().splitlines()[-1])
    if not rows:
        return
    first = next(iter(rows.values()))
    print(f"backbone {args.backbone} on {first['device']} ({first['precision']}), {args.classes} classes, "
          f"{args.repeats} rounds (forward + backward); text runs to {first['active_length']} of "
          f"{first['context_length']} positions when truncated; MaPLe depth {args.maple_depth}")
    head = "".join(f"{MODES[m] + ': min / median s, peak MiB':>38s}" for m in args.modes)
    print(f"{'own process':48s}{head}" + ("   full / truncated (median)" if len(args.modes) == 2 else ""))
    for which, r in rows.items():
        own = r["times"][which]
        cells = "".join(f"{own[m]['min']:14.4f} {own[m]['median']:9.4f} {r['peak_mib'][m]:12.0f}" for m in args.modes)
        effect = f"   {own['off']['median'] / own['on']['median']:8.2f}x" if len(args.modes) == 2 else ""
        print(f"{LABELS[which]:48s}{cells}{effect}")

    def ratio(row, a, b, mode, stat, factor=1, mode_b=None):
        t = rows[row]["times"]
        return t[a][mode][stat] / (factor * t[b][mode_b or mode][stat])

    print("ratios within one process: median (min)")
    for mode in args.modes:
        print(f"-- {MODES[mode]}")
        lines = [("cocoop_batched", "cocoop_batched", "coop", 1, "CoCoOp batched / CoOp step", ""),
                 ("cocoop_batched", "cocoop_batched", "coop_text", 32, "CoCoOp batched / (32 x CoOp text encode)",
                  " (goal: < 1)"),
                 ("cocoop_loop", "cocoop_batched", "cocoop_loop", 1, "CoCoOp batched / per-image loop", ""),
                 ("maple", "maple", "frozen", 1, "MaPLe / frozen forward + backward", " (goal: <= 1.5)")]
        for row, a, b, factor, label, goal in lines:
            if row in rows:
                print(f"{label:48s} {ratio(row, a, b, mode, 'median', factor):6.2f} "
                      f"({ratio(row, a, b, mode, 'min', factor):.2f}){goal}")
    if len(args.modes) == 2 and "cocoop_batched" in rows:
        print(f"{'CoCoOp batched truncated / (32 x CoOp text encode at full length, as before)':48s} "
              f"{ratio('cocoop_batched', 'cocoop_batched', 'coop_text', 'on', 'median', 32, 'off'):6.2f} "
              f"({ratio('cocoop_batched', 'cocoop_batched', 'coop_text', 'on', 'min', 32, 'off'):.2f})")


if __name__ == "__main__":
    main()
