"""Benchmark: six gradient CAMs at the last stage, evidrift vs one inference forward vs pytorch-grad-cam.

For each architecture (timm, ``pretrained=False``: random weights of realistic scale; speed does not depend
on the values) one batch [B, 3, S, S] is explained for its predicted classes with gradcam, gradcam++,
layercam, xgradcam, hirescam and gradcam_elementwise at ARCHITECTURE §4's default layer. Timed, interleaved in
each repeat so that machine load affects every side alike (medians reported):

* ``forward``   — one plain ``torch.inference_mode`` forward of the batch (the physical limit);
* ``evidrift``  — ``CAMEngine``: one forward + one backward down to the target layer, all six maps;
* ``grad-cam``  — pytorch-grad-cam computing the same six maps (one forward + full backward per method).

Targets (ARCHITECTURE §8): evidrift / forward ≤ 1.15 and grad-cam / evidrift ≥ 10.

    .venv/bin/python benchmarks/cam_engine.py                      # defaults: 3 archs, 224 px, batch 16
    .venv/bin/python benchmarks/cam_engine.py --archs resnetv2_50 --batch 4 --size 160 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from evidrift.cam import CAMEngine

LAYERS = {"densenet201": "features.norm5", "resnetv2_50": "norm", "inception_v3": "Mixed_7c"}
METHODS = ["gradcam", "gradcam++", "layercam", "xgradcam", "hirescam", "gradcam_elementwise"]


def reference_classes() -> dict[str, type]:
    """pytorch-grad-cam's classes for METHODS (imported after evidrift)."""
    import pytorch_grad_cam as pgc

    classes = [
        pgc.GradCAM,
        pgc.GradCAMPlusPlus,
        pgc.LayerCAM,
        pgc.XGradCAM,
        pgc.HiResCAM,
        pgc.GradCAMElementWise,
    ]
    return dict(zip(METHODS, classes, strict=True))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(arch: str, batch: int, size: int, repeats: int) -> dict[str, float]:
    import timm
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    reference_cams = reference_classes()
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False).eval()
    layer = LAYERS[arch]
    module = dict(model.named_modules())[layer]
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        targets = model(x).argmax(dim=1)

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    def ours() -> None:
        with CAMEngine(model, [layer]) as engine:
            engine(x, targets, methods=METHODS)

    def reference() -> None:
        wrapped = [ClassifierOutputTarget(int(t)) for t in targets]
        for cls in reference_cams.values():
            with cls(model, [module]) as cam:
                cam(x, wrapped)
        model.zero_grad(set_to_none=True)

    forward(), ours()  # warm-up (allocator, lazy init); grad-cam's warm-up is its own first method
    times: dict[str, list[float]] = {"forward": [], "evidrift": [], "grad-cam": []}
    for _ in range(repeats):
        times["forward"].append(timed(forward))
        times["evidrift"].append(timed(ours))
        times["grad-cam"].append(timed(reference))
        times["forward"].append(timed(forward))
        times["evidrift"].append(timed(ours))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--archs", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"batch {args.batch}, {args.size} px, {torch.get_num_threads()} threads, {args.repeats} repeats, "
        f"six CAMs: {', '.join(METHODS)}"
    )
    print(
        f"{'arch':<14}{'layer':<16}{'forward s':>10}{'evidrift s':>11}{'grad-cam s':>11}"
        f"{'evidrift/forward':>18}{'grad-cam/evidrift':>19}"
    )
    for arch in args.archs:
        t = bench(arch, args.batch, args.size, args.repeats)
        print(
            f"{arch:<14}{LAYERS[arch]:<16}{t['forward']:>10.3f}{t['evidrift']:>11.3f}{t['grad-cam']:>11.3f}"
            f"{t['evidrift'] / t['forward']:>17.2f}x{t['grad-cam'] / t['evidrift']:>18.1f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
