"""Model FLOPs of a training step, and the step time and model FLOPs utilisation (MFU) range `towerlab plan`
expects from them on the planned GPUs.

FLOPs are counted by torch's own FlopCounterMode on the meta device (no memory, no values): one forward and
backward of the recipe's towers on a batch of two samples, in training mode (so patch dropout shortens the image
sequence as it does in training) and without activation checkpointing (MFU counts model FLOPs, not the
recomputation). The loss adds its logit matmuls: per softmax direction a forward product and, in backward, the two
gradient products, 3 x 2 x rows x N x d per worker.

Expected time = FLOPs per worker per step / (peak bf16 FLOP/s x MFU). The MFU is an assumption, a range
(`ASSUMED_MFU`, what well-tuned CLIP-style training reaches on current NVIDIA GPUs), until the device check
(benchmarks/device_check.sh) has measured one: its results file names the GPU and the MFU of ViT-B/32 training, and
a plan for that GPU then uses the measured value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from towerlab.config import ConfigError, Recipe, resolve_batch

# Dense (not sparse) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets; the first name contained in the
# device's name wins (so "H100 PCIe" before "H100")
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0,
                    "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
ASSUMED_MFU = (0.35, 0.55)
DEFAULT_GPU = "H100"
MEASURED = Path("benchmarks/results/device_check.json")


def peak_tflops(gpu: str) -> float:
    """The bf16 peak of a GPU named like torch names it (e.g. "NVIDIA H100 80GB HBM3") or like the table."""
    for name, peak in PEAK_BF16_TFLOPS.items():
        if name.lower() in gpu.lower():
            return peak
    raise ConfigError(f"--gpu {gpu!r}: no bf16 peak known for it (known: {', '.join(PEAK_BF16_TFLOPS)}); give it "
                      "with --peak-tflops")


def tower_flops(recipe: Recipe, samples: int = 2) -> dict[str, float]:
    """Forward+backward FLOPs per sample of each tower of the recipe's model, counted on the meta device. A
    pretrained Hugging Face tower reads values while it builds its attention mask, which meta tensors lack: that
    tower is counted on the CPU instead, built from its configuration (random weights, nothing downloaded)."""
    out = {}
    for device in ("meta", "cpu"):
        model, inputs = _model_and_inputs(recipe, samples, device)
        for m, x in inputs.items():
            if m in out:
                continue
            try:
                out[m] = _count(model.towers[m], x) / samples
            except RuntimeError:
                if device == "cpu":
                    raise
        if len(out) == len(inputs):
            return out
    return out


def _model_and_inputs(recipe: Recipe, samples: int, device: str):
    import torch

    from towerlab.models import ContrastiveModel

    with torch.device(device):
        model = ContrastiveModel(recipe.model, temperature_init=recipe.loss.temperature_init, load_weights=False)
    model.train()
    for tower in model.towers.values():
        if hasattr(tower, "set_grad_checkpointing"):
            tower.set_grad_checkpointing(False)
    v, t = recipe.model.vision, recipe.model.text
    inputs = {"image": torch.zeros(samples, v.channels, v.image_size, v.image_size, device=device),
              "text": torch.ones(samples, t.context_length, dtype=torch.long, device=device)}
    if "signal" in model.towers:
        inputs["signal"] = torch.zeros(samples, recipe.model.signal.dim, device=device)
    return model, inputs


def _count(tower, x) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        f = tower(x)
        if f.requires_grad:
            f.sum().backward()
    return counter.get_total_flops()


def loss_flops(recipe: Recipe, rows: int, n: int) -> float:
    """The loss's logit matmuls per worker: forward and two gradient products per matrix (one for SigLIP)."""
    from towerlab.train.memory import logit_matrices

    return logit_matrices(recipe) * 3 * 2 * rows * n * recipe.model.embed_dim


@dataclass
class StepEstimate:
    gpu: str
    peak_tflops: float
    flops_per_sample: dict[str, float]  # per tower, forward + backward
    flops_per_worker: float  # one optimizer step
    mfu: tuple[float, float]  # low, high
    mfu_source: str

    @property
    def seconds(self) -> tuple[float, float]:
        """Step time at the high and at the low MFU (fast, slow)."""
        return tuple(self.flops_per_worker / (self.peak_tflops * 1e12 * m) for m in (self.mfu[1], self.mfu[0]))


def measured_mfu(path: Path, gpu: str, recipe: Recipe) -> float | None:
    """The MFU the device check measured on this GPU for the run closest to the recipe (compiled or not, with or
    without patch dropout), or None."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if peak_tflops_or_none(data.get("gpu", "")) != peak_tflops_or_none(gpu):
        return None
    key = f"compile={str(recipe.train.compile).lower()},patch_dropout={recipe.model.vision.patch_dropout > 0}"
    runs = {r.get("key"): r.get("mfu") for r in data.get("vit_b32", {}).get("runs", [])}
    return runs.get(key)


def peak_tflops_or_none(gpu: str) -> float | None:
    try:
        return peak_tflops(gpu)
    except ConfigError:
        return None


def estimate_step(recipe: Recipe, gpu: str | None = None, peak: float | None = None,
                  measured: Path | None = None) -> StepEstimate:
    """The expected step time of the recipe's layout on `gpu` (default: this machine's GPU 0, else an H100)."""
    if gpu is None:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else DEFAULT_GPU
    peak = peak if peak is not None else peak_tflops(gpu)
    if peak <= 0:
        raise ConfigError(f"--peak-tflops={peak}: must be positive")
    plan = resolve_batch(recipe.data.global_batch, recipe.train.workers, recipe.data.micro_batch)
    per_sample = tower_flops(recipe)
    rows = plan.per_worker
    total = rows * sum(per_sample.values())  # the step encodes every tower's modality
    total += loss_flops(recipe, rows, plan.global_batch)
    path = measured if measured is not None else MEASURED
    found = measured_mfu(Path(path), gpu, recipe)
    if found:
        return StepEstimate(gpu, peak, per_sample, total, (found, found), f"measured by the device check ({path})")
    return StepEstimate(gpu, peak, per_sample, total, ASSUMED_MFU,
                        f"assumed {ASSUMED_MFU[0]:.0%}-{ASSUMED_MFU[1]:.0%} of the bf16 peak (no device check "
                        f"measurement for this GPU in {path})")
