"""The estimated CPU time of a study's training and explaining, before it runs (``evidrift demo --full``).

``estimate_cpu_seconds(config, threads, bf16)`` adds up, per model and stage, the images the stage pushes
through the network (train steps, validation, the stage-1 feature pass, the test evaluation and the CAMs)
times their pixels, divided by the architecture's measured CPU throughput in pixels per second and thread
(``THROUGHPUT``). Measured on one thread of an AVX512-BF16 CPU (AMD EPYC, torch 2.13, batch 16; another
process sharing the machine), calibrated on the default demo (``CALIBRATION``): an estimate to about
±30%, not a promise. Data generation, the drift metrics and the report are left out (about a minute).
"""

from __future__ import annotations

from dataclasses import dataclass

from evidrift.classifier import models
from evidrift.studies.config import StudyConfig


@dataclass(frozen=True)
class Throughput:
    """Megapixels per second and thread in bf16 autocast + channels-last: ``train`` (forward + backward +
    AdamW step), ``infer`` (no-grad forward); ``fp32_slowdown``: how much slower fp32 trains."""

    train: float
    infer: float
    fp32_slowdown: float


#: Measured: resnetv2_50 at 160 px 12.3 train / 41.7 infer img/s (fp32 5.4 train), densenet201 at 160 px
#: 8.6 / 29.9 (fp32 4.2), inception_v3 at 208 px 10.3 / 36.6 (fp32 4.6), one thread each.
THROUGHPUT: dict[str, Throughput] = {
    "resnetv2_50": Throughput(0.315, 1.07, 2.3),
    "densenet201": Throughput(0.22, 0.765, 2.05),
    "inception_v3": Throughput(0.445, 1.58, 2.25),
}
#: Any other architecture: resnetv2_50's rates.
FALLBACK = THROUGHPUT["resnetv2_50"]
#: Two threads do not train twice as fast.
THREAD_EFFICIENCY = 0.85
#: What the throughput table misses (data loading and augmentation, small images' lower efficiency,
#: checkpoints): the default demo's stages, evaluation and explanation took 1,165 CPU s on one thread
#: (machine shared with other jobs) against 873 s estimated without this factor.
CALIBRATION = 1.33


def _split_sizes(config: StudyConfig) -> tuple[int, int, int]:
    n = config.data.phantom.n
    val, test = round(n * config.data.split.val), round(n * config.data.split.test)
    return n - val - test, val, test


def estimate_cpu_seconds(config: StudyConfig, threads: int = 1, bf16: bool = True) -> float:
    """Estimated wall seconds of stages 0-2, evaluation and explanation of the phantom study ``config`` on
    ``threads`` CPU threads (in ``bf16`` or fp32 training), from ``THROUGHPUT`` and each stage's images x
    epochs x pixels (stage 1 cached: one feature pass; the test evaluation and the CAMs, a forward and a
    backward per test image and stage counted as an fp32 training step, every test image explained)."""
    train, val, test = _split_sizes(config)
    n_source = config.data.phantom.n_source
    source_val = round(n_source * (config.data.split.val or 0.15))
    seconds = 0.0
    for model_cfg in config.models:
        rate = THROUGHPUT.get(models.resolve_arch(model_cfg.arch), FALLBACK)
        train_rate = rate.train * 1e6 * (1.0 if bf16 else 1.0 / rate.fp32_slowdown)
        infer_rate = rate.infer * 1e6 * (1.0 if bf16 else 1.0 / rate.fp32_slowdown)
        side = model_cfg.image_size or models.default_input_size(model_cfg.arch)
        for stage, cfg in (
            ("0", config.train.stage0),
            ("1", config.train.stage1),
            ("2", config.train.stage2),
        ):
            if stage == "0" and model_cfg.weights != "none":
                continue
            s = cfg.image_size or max(16, round(side * (cfg.image_scale or 1.0)))
            pixels = s * s
            n_train, n_val = (n_source - source_val, source_val) if stage == "0" else (train, val)
            if stage == "1" and cfg.cache_features is not False:
                seconds += (n_train + n_val) * pixels / infer_rate
                continue
            seconds += cfg.epochs * (n_train * pixels / train_rate + n_val * pixels / infer_rate)
        # evaluation and CAMs run in fp32 whatever the training precision (evidrift.classifier.precision)
        pixels, fp32 = side * side, 1e6 / rate.fp32_slowdown
        seconds += 2 * test * pixels / (rate.infer * fp32)  # evaluate: both stages
        seconds += 2 * test * pixels / (rate.train * fp32)  # explain: both stages
    return CALIBRATION * seconds / (max(threads, 1) * (THREAD_EFFICIENCY if threads > 1 else 1.0))


def format_duration(seconds: float) -> str:
    """``1 h 05 min``, ``12 min``, ``40 s``."""
    if seconds >= 3600:
        hours, rest = divmod(round(seconds / 60), 60)
        return f"{hours} h {rest:02d} min"
    if seconds >= 60:
        return f"{round(seconds / 60)} min"
    return f"{round(seconds)} s"
