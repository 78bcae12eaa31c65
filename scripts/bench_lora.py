"""LoRA slots on the full-size SD 1.5 UNet (random weights): what a weight change, a file
hot-swap and a plain unload + load cost, next to one UNet call.

    PYTHONPATH=$PWD python3 scripts/bench_lora.py                      # this machine's CPU
    PYTHONPATH=$PWD python3 scripts/bench_lora.py --device cuda --json lora.json

(from a checkout's root; with dreamdeck installed, PYTHONPATH is not needed)

The LoRAs are random rank-16 ones made by peft on the usual kohya targets (attention,
feed-forward, proj_in / proj_out), saved once in diffusers' format and once in kohya's.
Targets: a weight change under one frame at 60 Hz (16.7 ms), a file swap under 250 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from engine.diffusion.configs import ARCHITECTURES
from engine.diffusion.lora import AdapterBank, random_lora, save_lora

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float16 / float32 (default: float16 on cuda, else float32)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="file swaps and unload + loads measured")
    parser.add_argument("--size", type=int, default=512, help="image size of the UNet call (latents / 8)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    # 1. the SD 1.5 UNet with random weights, and two random LoRAs in the two formats
    with torch.device(device):
        unet = UNet2DConditionModel(**ARCHITECTURES["sd15"].unet).to(dtype).eval().requires_grad_(False)
    folder = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    files = [
        str(save_lora(random_lora(unet, rank=args.rank, seed=1, targets=TARGETS), folder / "a.safetensors")),
        str(
            save_lora(random_lora(unet, rank=args.rank, seed=2, targets=TARGETS), folder / "b.safetensors", kohya=True)
        ),
    ]
    megabytes = sum(Path(f).stat().st_size for f in files) / 2 / 1e6
    bank = AdapterBank(unet)
    bank.request(1, files[0])
    bank.wait()
    change = bank.apply()
    if change.error:
        raise SystemExit(f"bench_lora: {change.error}")
    first_load_ms = bank.last_swap.swap_ms + bank.last_swap.read_ms

    lora_layers = bank.layer_count(1)

    # 2. (a) a weight change: the next apply() writes the scaling tensors
    weight_ms = []
    for i in range(20):
        bank.set_weight(1, 0.25 + 0.5 * (i % 2))
        sync()
        started = time.perf_counter()
        bank.apply()
        sync()
        weight_ms.append((time.perf_counter() - started) * 1000)

    # 3. (b) a file hot-swap: read (background thread) + swap (between two frames)
    read_ms, swap_ms = [], []
    for i in range(args.repeats):
        bank.request(1, files[(i + 1) % 2])
        bank.wait()
        sync()
        change = bank.apply()
        sync()
        assert change.error is None and bank.last_swap.hotswapped, change.error
        read_ms.append(bank.last_swap.read_ms)
        swap_ms.append(bank.last_swap.swap_ms)

    # 4. (c) for comparison: unload the adapter and load the file as a new one (new layers)
    reload_ms = []
    for i in range(args.repeats):
        sync()
        started = time.perf_counter()
        unet.delete_adapters("slot1")
        state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(folder), weight_name=Path(files[i % 2]).name)
        unet.load_lora_adapter(state_dict, prefix="unet", network_alphas=alphas, adapter_name="slot1")
        sync()
        reload_ms.append((time.perf_counter() - started) * 1000)

    # 5. (d) one UNet call at the chosen size, for scale (with the adapter, then without)
    latents = torch.randn((1, 4, args.size // 8, args.size // 8), device=device, dtype=dtype)
    text = torch.randn((1, 77, 768), device=device, dtype=dtype)
    unet_ms = {}
    for label in ("with LoRA", "without LoRA"):
        if label == "without LoRA":
            unet.delete_adapters("slot1")
        with torch.no_grad():
            unet(latents, torch.tensor([500], device=device), encoder_hidden_states=text)  # warm-up
            sync()
            started = time.perf_counter()
            unet(latents, torch.tensor([500], device=device), encoder_hidden_states=text)
            sync()
        unet_ms[label] = (time.perf_counter() - started) * 1000
    bank.close()

    results = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "rank": args.rank,
        "lora_file_mb": round(megabytes, 1),
        "lora_layers": lora_layers,
        "first_load_ms": first_load_ms,
        "weight_change_ms": statistics.median(weight_ms),
        "hotswap_read_ms": statistics.median(read_ms),
        "hotswap_swap_ms": statistics.median(swap_ms),
        "hotswap_total_ms": statistics.median(r + s for r, s in zip(read_ms, swap_ms)),
        "unload_load_ms": statistics.median(reload_ms),
        "unet_call_ms": unet_ms["without LoRA"],
        "unet_call_with_lora_ms": unet_ms["with LoRA"],
    }
    rows = [
        ("(a) weight change (apply)", results["weight_change_ms"], "target < 16.7 ms"),
        ("(b) file hot-swap, total", results["hotswap_total_ms"], "target < 250 ms"),
        ("    read (background)", results["hotswap_read_ms"], ""),
        ("    swap (between frames)", results["hotswap_swap_ms"], ""),
        ("(c) unload + load as new", results["unload_load_ms"], "new layers: a compiled graph rebuilds"),
        ("    first load into a slot", results["first_load_ms"], ""),
        (f"(d) UNet call {args.size}px", results["unet_call_ms"], ""),
        (f"    with the LoRA (rank {args.rank}, padded to {bank.target_rank})", results["unet_call_with_lora_ms"], ""),
    ]
    print(
        f"{results['device']} {results['dtype']}; rank {args.rank}, {results['lora_layers']} LoRA layers, "
        f"{results['lora_file_mb']} MB per file"
    )
    for name, ms, note in rows:
        print(f"{name:<44} {ms:10.2f} ms  {note}")
    print(f"hot-swap / unload+load: {results['hotswap_total_ms'] / results['unload_load_ms']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
