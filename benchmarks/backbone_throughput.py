"""Backbone training throughput against the machine's conv3d ceiling and MONAI's DiffusionModelUNet.

Usage::

    python benchmarks/backbone_throughput.py [--device cpu|cuda] [--patch D H W] [--batch B] [--quick]
                                             [--candidates] [--out DIR]

Measured in one run, on one device:

(a) the conv3d ceiling: the best FLOP/s of a few large 3x3x3 ``Conv3d`` forward+backward passes;
(b) our backbone (``UNet3d``), one diffusion training step = ``diffusion_loss`` forward + backward + Adam:
    steps/s, voxels/s, FLOPs per step (``torch.utils.flop_counter.FlopCounterMode``: convolutions and matrix
    products, forward and backward), achieved FLOP/s and its fraction of the ceiling;
(c) ``monai.networks.nets.DiffusionModelUNet`` (spatial_dims=3, same levels, same full-resolution width, same
    residual blocks per level, no attention except MONAI's fixed mid-block one, channel cap chosen so that the
    parameter count is the closest to ours), same step and measurements;
(d) the ratio ours / MONAI.

On CUDA both run under bf16 autocast with channels_last_3d; on CPU in float32 with channels_last_3d (pure bf16
conv3d was about 10x slower on the CPU this was first measured on; bf16 *autocast* on a CPU with AMX makes a
fine-tuning step 1.7x faster: ``FinetuneConfig.precision``). ``--candidates`` also times a few of our settings
(norm, blocks per level, activation, memory format). Step times are medians. Results go to
``benchmarks/results/backbone_throughput.{json,md}`` (``--quick`` only prints unless ``--out`` is given).
MONAI's model needs ``einops``. Each run takes one to three minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from DiffusionSegLib.diffusion import NoiseScheduler, diffusion_loss  # noqa: E402
from DiffusionSegLib.nets import UNet3d, UNet3dConfig  # noqa: E402

CANDIDATES: list[dict] = [
    {"norm": "batch", "num_res_blocks": 2},
    {"norm": "group", "num_res_blocks": 2},
    {"norm": "instance", "num_res_blocks": 2},
    {"norm": "batch", "num_res_blocks": 2, "act": "silu"},
    {"norm": "batch", "num_res_blocks": 1},
    {"norm": "group", "num_res_blocks": 1},
    {"norm": "batch", "num_res_blocks": 2, "channels_last": False},
]


CHOICE = """Why the default (`UNet3dConfig()`: batch norm, ReLU, 2 residual blocks per level, channels_last_3d):
batch norm is chosen unless another norm is clearly faster, because in eval mode it makes a voxel's feature
independent of the window it is computed in (group / instance norm normalise over the whole patch), which
sliding-window feature extraction relies on, and it is vox2vec's choice. Two blocks per level follow vox2vec;
one block per level is the option to take when a pretraining budget is counted in CPU minutes (about twice
the steps per second, half the depth)."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


TIMERS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_step(step: Callable[[], None], device: torch.device, warmup: int, steps: int, timer: str) -> list[float]:
    """Seconds (wall-clock, or CPU time of this process) of each of ``steps`` calls after ``warmup`` untimed ones."""
    clock = TIMERS[timer]
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        start = clock()
        step()
        sync(device)
        times.append(clock() - start)
    return times


def count_flops(step: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def conv3d_ceiling(device: torch.device, channels_last: bool, quick: bool, timer: str) -> dict:
    """Best FLOP/s of a few large 3x3x3 conv3d forward+backward passes."""
    if device.type == "cuda":
        configs = [(64, (4, 64, 128, 128)), (128, (4, 32, 64, 64)), (256, (4, 16, 32, 32))]
    else:
        configs = [(32, (2, 16, 64, 64)), (64, (2, 16, 32, 32)), (128, (2, 8, 16, 16))]
    rows = []
    for channels, (batch, *spatial) in configs[:2] if quick else configs:
        conv = torch.nn.Conv3d(channels, channels, 3, padding=1).to(device)
        x = torch.randn(batch, channels, *spatial, device=device)
        if channels_last:
            conv = conv.to(memory_format=torch.channels_last_3d)
            x = x.to(memory_format=torch.channels_last_3d)
        x.requires_grad_(True)

        def step(conv: torch.nn.Module = conv, x: torch.Tensor = x) -> None:
            with autocast(device):
                y = conv(x)
            y.float().square().mean().backward()

        flops = count_flops(step)
        seconds = statistics.median(time_step(step, device, warmup=1, steps=3 if quick else 5, timer=timer))
        rows.append({"channels": channels, "shape": [batch, channels, *spatial], "flops": flops,
                     "seconds": seconds, "flops_per_s": flops / seconds})  # fmt: skip
    return {"flops_per_s": max(r["flops_per_s"] for r in rows), "configs": rows}


def smooth_volume(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A CT-like smooth random volume in [0, 1] (blurred noise), shape (B, 1, D, H, W)."""
    x = torch.randn(shape, generator=generator)
    for _ in range(2):
        x = torch.nn.functional.avg_pool3d(x, kernel_size=5, stride=1, padding=2, count_include_pad=False)
    return (x - x.amin()) / (x.amax() - x.amin())


def coordinate_map(batch: int, spatial: tuple[int, int, int]) -> torch.Tensor:
    """Stand-in for the BPR map: three linear ramps in [-1, 1], shape (B, 3, D, H, W)."""
    axes = torch.meshgrid(*(torch.linspace(-1, 1, s) for s in spatial), indexing="ij")
    return torch.stack(axes)[None].expand(batch, -1, -1, -1, -1).contiguous()


def measure_training(model: torch.nn.Module, device: torch.device, channels_last: bool, patch: tuple[int, int, int],
                     batch: int, warmup: int, steps: int, timer: str) -> dict:  # fmt: skip
    """Time diffusion training steps (loss forward + backward + Adam) of ``model``."""
    model = model.to(device)
    generator = torch.Generator().manual_seed(0)
    x0 = smooth_volume((batch, 1, *patch), generator).to(device)
    condition = coordinate_map(batch, patch).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x0 = x0.to(memory_format=torch.channels_last_3d)
        condition = condition.to(memory_format=torch.channels_last_3d)
    scheduler = NoiseScheduler(num_timesteps=10).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    draw = torch.Generator(device=device).manual_seed(1)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = diffusion_loss(model, x0, condition, scheduler, generator=draw).loss
        loss.backward()
        optimizer.step()

    flops = count_flops(step)
    times = time_step(step, device, warmup=warmup, steps=steps, timer=timer)
    seconds = statistics.median(times)
    voxels = batch * patch[0] * patch[1] * patch[2]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "flops_per_step": flops,
        "step_seconds_median": seconds,
        "step_seconds_all": times,
        "steps_per_s": 1.0 / seconds,
        "voxels_per_s": voxels / seconds,
        "flops_per_s": flops / seconds,
    }


def monai_matched(ours: UNet3dConfig) -> tuple[torch.nn.Module, dict]:
    """MONAI DiffusionModelUNet with our levels, finest width and blocks; cap chosen to match our parameters."""
    from monai.networks.nets import DiffusionModelUNet

    def options(cap: int) -> dict:
        channels = [min(ours.base_channels * ours.channel_multiplier**level, cap) for level in range(ours.num_scales)]
        return {"spatial_dims": 3, "in_channels": ours.in_channels, "out_channels": ours.out_channels,
                "channels": channels, "num_res_blocks": ours.num_res_blocks,
                "attention_levels": [False] * ours.num_scales, "norm_num_groups": 8,
                "num_head_channels": channels[-1]}  # fmt: skip

    def params(cap: int) -> int:
        return sum(p.numel() for p in DiffusionModelUNet(**options(cap)).parameters())

    target = sum(p.numel() for p in UNet3d(ours).parameters())
    caps = list(range(max(8, ours.base_channels // 8 * 8), 2 * ours.max_channels + 1, 8))
    low, high = 0, len(caps) - 1  # parameters grow with the cap: bisect for the first cap at or above target
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if params(caps[middle]) < target else (low, middle)
    nearest = min(caps[max(low - 1, 0) : low + 1], key=lambda cap: abs(params(cap) - target))
    return DiffusionModelUNet(**options(nearest)), options(nearest)


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "threads": torch.get_num_threads(), "git_sha": sha,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip


def markdown(result: dict) -> str:
    m, a = result["machine"], result["args"]
    ceiling = result["conv3d_ceiling"]["flops_per_s"]
    lines = [
        "# Backbone training throughput",
        "",
        f"`python benchmarks/backbone_throughput.py {' '.join(a['argv'])}` — torch {m['torch']}, "
        f"{m['gpu'] or m['cpu']}, {m['threads']} threads, git {m['git_sha']}, {m['date']}. "
        f"Patch (D, H, W) = {tuple(a['patch'])}, batch {a['batch']}, "
        f"{'bf16 autocast' if a['device'] == 'cuda' else 'float32'}, channels_last_3d, median of {a['steps']} steps "
        f"timed by {'wall-clock' if a['timer'] == 'wall' else 'process CPU time'}. "
        f"conv3d ceiling: {ceiling / 1e9:.0f} GFLOP/s.",
        "",
        "One step = diffusion loss forward + backward + Adam. FLOPs: convolutions and matrix products counted by",
        "FlopCounterMode (norms, activations, pooling and the optimizer are not counted).",
        "",
        "| model | params (M) | GFLOP/step | steps/s | Mvoxel/s | GFLOP/s | % of conv3d ceiling |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["models"]:
        lines.append(
            f"| {row['name']} | {row['params'] / 1e6:.2f} | {row['flops_per_step'] / 1e9:.1f} | "
            f"{row['steps_per_s']:.3f} | {row['voxels_per_s'] / 1e6:.3f} | {row['flops_per_s'] / 1e9:.1f} | "
            f"{100 * row['flops_per_s'] / ceiling:.0f}% |"
        )
    ratio = result["ours_over_monai"]
    if ratio:
        lines += ["", f"Ours / MONAI DiffusionModelUNet at matched size: {ratio['steps_per_s']:.2f}x steps/s, "
                  f"{ratio['flops_per_s']:.2f}x achieved FLOP/s (MONAI: {result['monai_config']['channels']}, "
                  f"{result['monai_config']['num_res_blocks']} blocks/level)."]  # fmt: skip
    elif result.get("monai_error"):
        lines += ["", f"MONAI comparison skipped: {result['monai_error']}"]
    candidates = [row for row in result["models"] if row["name"].startswith("candidate")]
    if candidates:
        reference = result["models"][0]
        lines += ["", "## Candidates (speed relative to the first row: ours as given on the command line)", "",
                  "| candidate | steps/s vs first row | % of ceiling |", "| --- | ---: | ---: |"]  # fmt: skip
        for row in sorted(candidates, key=lambda r: -r["steps_per_s"]):
            speed, share = row["steps_per_s"] / reference["steps_per_s"], row["flops_per_s"] / ceiling
            lines.append(f"| {row['name'][len('candidate '):]} | {speed:.2f}x | {100 * share:.0f}% |")
        lines += ["", CHOICE]
    if result["machine"]["cpu"] and a["device"] == "cpu":
        lines += ["", "CPU timings on a machine shared with other jobs are noisy; compare rows of one run only."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--patch", type=int, nargs=3, metavar=("D", "H", "W"), default=None,
                        help="patch size (D, H, W) = (z, y, x); default 32 64 64 (CPU) or 64 128 128 (CUDA)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5, quick 2, CUDA 20)")
    parser.add_argument("--quick", action="store_true", help="smaller patch, fewer steps, print only")
    parser.add_argument("--candidates", action="store_true", help="also time several settings of our backbone")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--timer", choices=sorted(TIMERS), default="wall",
                        help="wall-clock, or this process's CPU time (steadier on a shared CPU with --threads 1)")
    parser.add_argument("--base-channels", type=int, default=UNet3dConfig.base_channels)
    parser.add_argument("--num-scales", type=int, default=UNet3dConfig.num_scales)
    parser.add_argument("--num-res-blocks", type=int, default=UNet3dConfig.num_res_blocks)
    parser.add_argument("--norm", default=UNet3dConfig.norm)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and args.timer != "wall":
        parser.error("--timer cpu is meaningless on cuda")
    default_patch = (32, 32, 32) if args.quick else (32, 64, 64) if device.type == "cpu" else (64, 128, 128)
    patch = tuple(args.patch or default_patch)
    steps = args.steps or (2 if args.quick else 5 if device.type == "cpu" else 20)
    warmup = 1 if args.quick or device.type == "cpu" else 5
    config = UNet3dConfig(in_channels=4, out_channels=1, base_channels=args.base_channels, num_scales=args.num_scales,
                          num_res_blocks=args.num_res_blocks, norm=args.norm)  # fmt: skip
    UNet3d(config).check_input(torch.empty(1, 4, *patch, device="meta"))
    result: dict = {"machine": machine_info(device), "args": {**vars(args), "out": str(args.out), "patch": patch,
                    "steps": steps, "argv": sys.argv[1:] if argv is None else argv}}  # fmt: skip
    print(f"conv3d ceiling on {device} ...", flush=True)
    result["conv3d_ceiling"] = conv3d_ceiling(device, channels_last=True, quick=args.quick, timer=args.timer)
    print(f"  {result['conv3d_ceiling']['flops_per_s'] / 1e9:.0f} GFLOP/s", flush=True)

    def run(name: str, model: torch.nn.Module, channels_last: bool, extra: dict) -> dict:
        torch.manual_seed(0)
        row = {"name": name, **extra, **measure_training(model, device, channels_last, patch, args.batch, warmup, steps,
                                                        args.timer)}
        print(f"  {name}: {row['steps_per_s']:.3f} steps/s, {row['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
        return row

    models = [run("ours (" + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items()
                                      if k in ("base_channels", "num_scales", "num_res_blocks", "norm", "act")) + ")",
                  UNet3d(config), True, {"config": dataclasses.asdict(config), "channels_last": True})]  # fmt: skip
    result["monai_config"], result["ours_over_monai"] = None, None
    try:
        monai_model, monai_kwargs = monai_matched(config)
        result["monai_config"] = monai_kwargs
        models.append(run(f"MONAI DiffusionModelUNet {monai_kwargs['channels']}", monai_model, True,
                          {"config": monai_kwargs, "channels_last": True}))  # fmt: skip
        result["ours_over_monai"] = {key: models[0][key] / models[1][key] for key in ("steps_per_s", "flops_per_s")}
    except ImportError as error:  # einops missing
        result["monai_error"] = f"{type(error).__name__}: {error}".splitlines()[0]
        print("  MONAI skipped:", result["monai_error"], flush=True)
    if args.candidates:
        for option in CANDIDATES:
            option = dict(option)
            channels_last = bool(option.pop("channels_last", True))
            cfg = dataclasses.replace(config, **option)
            name = "candidate " + ", ".join(f"{k}={v}" for k, v in option.items())
            name += "" if channels_last else ", NCDHW"
            models.append(run(name, UNet3d(cfg), channels_last, {"config": dataclasses.asdict(cfg),
                                                                   "channels_last": channels_last}))  # fmt: skip
    result["models"] = models
    text = markdown(result)
    print(text)
    out = args.out or (None if args.quick else REPO / "benchmarks" / "results")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "backbone_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "backbone_throughput.md").write_text(text)
        print(f"wrote {out / 'backbone_throughput.json'} and .md")
    return result


if __name__ == "__main__":
    main()
