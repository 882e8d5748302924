"""Machine profiles for ``gradfuse-bench plan``: what ``calibrate`` measures, or a built-in
description of a common cluster from public figures (each with its sources).

A profile is a JSON object:
  name, source            what it describes and where its numbers come from
  gpus_per_node           the default for --gpus-per-node
  intra, inter            links {alpha_s, beta_s_per_byte}: a rank's link inside a node, and
                          a node's network (beta through all its NICs together); plan_model.py
  compute_flops_per_s     effective FLOP/s of one rank on convnet training (forward FLOPs x 3)
  compute_flops_per_s_alone  the same for a job of one rank (CPU: it gets every core)
  pack_bytes_per_s        fusion-buffer pack + unpack, bytes of gradient per second (CPU: one
                          thread, as the engine's executor copies)
  optimizer_params_per_s  fused LARS update, parameters per second
  negotiation_alpha_s     one hop of the engine's per-cycle negotiation (a tree of log2 p hops
                          each way); defaults to inter's (or intra's) alpha
  cores_per_node          CPU ranks only: ranks beyond this many per node share cores
  by_ranks                calibrate only: {"4": {"intra": {...}}, ...}, links measured with
                          that many ranks (on a shared-core host they differ by rank count)
  compute_by_ranks        calibrate only: {"4": FLOP/s, ...}, one rank's compute while that many
                          ranks compute at once on the host (shared cores and memory included)
"""

from __future__ import annotations

import json
import math

from .plan_model import Link

# ResNet-50 v1.5 training FLOPs per image (3 x 8.18 GFLOPs forward, plan_workload.resnet50),
# to turn published images/s into effective FLOP/s.
_RESNET50_TRAIN_FLOPS = 3 * 8.178e9


def _gbps(gbit_per_s: float, efficiency: float) -> float:
    """beta (s/byte) of a link of gbit_per_s line rate that delivers `efficiency` of it."""
    return 1.0 / (gbit_per_s * 1e9 / 8 * efficiency)


BUILTIN = {
    "dgx-h100": {
        "name": "DGX H100: 8 x H100 SXM per node, NVLink 4, 8 x 400 Gb/s InfiniBand NDR",
        "source": (
            "NVIDIA DGX H100 datasheet (NVLink 900 GB/s per GPU both ways, 8 ConnectX-7 "
            "400 Gb/s); intra beta from ~360 GB/s NCCL bus bandwidth (nccl-tests on DGX H100, "
            "as NVIDIA publishes); compute from ~3,000 ResNet-50 images/s per H100 (NVIDIA's "
            "published mixed-precision training throughput, order of magnitude); HBM3 "
            "3.35 TB/s for pack and LARS"
        ),
        "gpus_per_node": 8,
        "intra": {"alpha_s": 2e-6, "beta_s_per_byte": 1 / 360e9},
        "inter": {"alpha_s": 5e-6, "beta_s_per_byte": _gbps(8 * 400, 0.9)},
        "compute_flops_per_s": 3000 * _RESNET50_TRAIN_FLOPS,
        "pack_bytes_per_s": 0.6 * 3.35e12 / 2,
        "optimizer_params_per_s": 0.7 * 3.35e12 / 20,
    },
    "a100-ib200": {
        "name": "8 x A100 SXM per node, NVLink 3, 200 Gb/s InfiniBand HDR per GPU",
        "source": (
            "NVIDIA DGX A100 datasheet (NVLink 600 GB/s per GPU both ways, 8 x 200 Gb/s HDR); "
            "intra beta from ~230 GB/s NCCL bus bandwidth; compute from ~2,500 ResNet-50 "
            "images/s per A100 (NVIDIA's published mixed-precision figures, order of "
            "magnitude); HBM2e 2.0 TB/s"
        ),
        "gpus_per_node": 8,
        "intra": {"alpha_s": 3e-6, "beta_s_per_byte": 1 / 230e9},
        "inter": {"alpha_s": 6e-6, "beta_s_per_byte": _gbps(8 * 200, 0.9)},
        "compute_flops_per_s": 2500 * _RESNET50_TRAIN_FLOPS,
        "pack_bytes_per_s": 0.6 * 2.0e12 / 2,
        "optimizer_params_per_s": 0.7 * 2.0e12 / 20,
    },
    "v100-ib100": {
        "name": "DGX-1V: 8 x V100 SXM2 per node, NVLink 2, 4 x 100 Gb/s InfiniBand EDR",
        "source": (
            "NVIDIA DGX-1 (Volta) datasheet (hybrid cube-mesh NVLink, 4 x 100 Gb/s EDR per 8 "
            "GPUs); intra beta from ~130 GB/s NCCL bus bandwidth; compute from ~1,400 "
            "ResNet-50 images/s per V100 (NVIDIA's published mixed-precision figures, order "
            "of magnitude); HBM2 900 GB/s"
        ),
        "gpus_per_node": 8,
        "intra": {"alpha_s": 5e-6, "beta_s_per_byte": 1 / 130e9},
        "inter": {"alpha_s": 8e-6, "beta_s_per_byte": _gbps(4 * 100, 0.85)},
        "compute_flops_per_s": 1400 * _RESNET50_TRAIN_FLOPS,
        "pack_bytes_per_s": 0.6 * 900e9 / 2,
        "optimizer_params_per_s": 0.7 * 900e9 / 20,
    },
    "p40-25gbe": {
        "name": "The seeds' cluster: 8 x Tesla P40 per node on PCIe 3.0, 25 Gb/s Ethernet",
        "source": (
            "shared/seeds/002 (Tencent Jizhi, 'ImageNet in 4 minutes'): 1,024 / 2,048 Tesla "
            "P40, ResNet-50, batch 64K, 90 epochs, 8.7 / 6.6 min, fp16 gradients, tensor "
            "fusion and hierarchical all-reduce. The slides state neither the node size nor "
            "the network: 8 GPUs per node and one 25 Gb/s Ethernet NIC per node (RoCE, 85% "
            "of line rate, 25 us per step) are assumptions. PCIe 3.0 x16 inside the node "
            "(~10 GB/s, no NVLink on P40). Compute: the P40 datasheet's 11.76 TFLOPS fp32 "
            "peak (P40 runs fp16 arithmetic at 1/64 rate, so the math is fp32) at an assumed "
            "40% on ResNet-50; GDDR5 346 GB/s for pack and LARS"
        ),
        "gpus_per_node": 8,
        "intra": {"alpha_s": 10e-6, "beta_s_per_byte": 1 / 10e9},
        "inter": {"alpha_s": 25e-6, "beta_s_per_byte": _gbps(25, 0.85)},
        "compute_flops_per_s": 0.40 * 11.76e12,
        "pack_bytes_per_s": 0.6 * 346e9 / 2,
        "optimizer_params_per_s": 0.7 * 346e9 / 20,
    },
}
# The seeds' setting, for the validation and the tests: the published figures.
SEEDS = {
    "profile": "p40-25gbe",
    "images": 1_281_167,  # ImageNet-1k training set
    "epochs": 90,
    "batch": 65_536,
    "runs": {1024: 8.7 * 60, 2048: 6.6 * 60},  # GPUs -> seconds to train
    "wire": "fp16",
}


def seeds_step_s(gpus: int) -> float:
    """The seeds' published time per step: total time over 90 epochs of 64K-image steps."""
    steps = SEEDS["images"] * SEEDS["epochs"] / SEEDS["batch"]
    return SEEDS["runs"][gpus] / steps


class Profile:
    def __init__(self, spec: dict, where: str):
        self.where = where
        self.spec = spec
        try:
            self.name = str(spec.get("name", where))
            self.gpus_per_node = int(spec.get("gpus_per_node", 8))
            self.intra = _link(spec["intra"])
            self.inter = _link(spec["inter"]) if "inter" in spec else None
            self.compute_flops_per_s = float(spec["compute_flops_per_s"])
            self.compute_flops_per_s_alone = float(
                spec.get("compute_flops_per_s_alone", self.compute_flops_per_s)
            )
            self.pack_bytes_per_s = float(spec["pack_bytes_per_s"])
            self.optimizer_params_per_s = float(spec["optimizer_params_per_s"])
            alpha = (self.inter or self.intra).alpha_s
            self.negotiation_alpha_s = float(spec.get("negotiation_alpha_s", alpha))
            self.cores_per_node = int(spec.get("cores_per_node", 0))
            self.compute_by_ranks = {
                int(n): float(rate) for n, rate in spec.get("compute_by_ranks", {}).items()
            }
            self.by_ranks = {
                int(n): {lvl: _link(v) for lvl, v in levels.items()}
                for n, levels in spec.get("by_ranks", {}).items()
            }
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"--profile {where}: not a valid profile ({e!r}); see "
                "gradfuse/bench/plan_profiles.py for the fields"
            ) from None
        rates = (self.compute_flops_per_s, self.pack_bytes_per_s, self.optimizer_params_per_s)
        if min(rates, default=1) <= 0 or min(self.compute_by_ranks.values(), default=1) <= 0:
            raise ValueError(f"--profile {where}: rates must be > 0")
        if self.gpus_per_node < 1:
            raise ValueError(f"--profile {where}: gpus_per_node must be > 0")

    def links(self, p: int, k: int):
        """(intra, inter) for p ranks, k per node; a measured by_ranks entry wins."""
        measured = self.by_ranks.get(p, {})
        intra = measured.get("intra", self.intra)
        inter = measured.get("inter", self.inter)
        if p > k and inter is None:
            raise ValueError(
                f"--profile {self.where} has no inter-node link (calibrated on one host): it "
                f"can plan up to {k} ranks per node, not {p}"
            )
        return intra, inter or intra

    def negotiation_s(self, p: int) -> float:
        return 2 * math.ceil(math.log2(p)) * self.negotiation_alpha_s if p > 1 else 0.0


def _link(spec: dict) -> Link:
    return Link(float(spec["alpha_s"]), float(spec["beta_s_per_byte"]))


def load(name_or_path: str) -> Profile:
    if name_or_path in BUILTIN:
        return Profile(BUILTIN[name_or_path], name_or_path)
    try:
        with open(name_or_path) as f:
            spec = json.load(f)
    except OSError as e:
        raise ValueError(
            f"--profile {name_or_path!r}: neither a built-in profile ({', '.join(BUILTIN)}) "
            f"nor a readable file ({e.strerror})"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--profile {name_or_path!r}: not JSON ({e})") from None
    if not isinstance(spec, dict):  # the file's content is a bad value, not a bad type
        raise ValueError(f"--profile {name_or_path!r}: expected a JSON object")  # noqa: TRY004
    return Profile(spec, name_or_path)
