"""Real-time diffusion img2img (SD-turbo, LCM) for the ``realtime`` scene and the benchmark.

The modules here import torch and diffusers; this package file does not, so importing
``engine.diffusion`` (or the scene that uses it) costs nothing until a model is loaded.
Nothing here imports GL: the benchmark runs on a GPU machine with no display.

    loading.py      ModelSpec -> DiffusionModel (hub id, local folder, single file, LoRA, TAESD)
    configs.py      full-size and tiny architectures as config dicts (random-weight models)
    single_file.py  a model as one original-layout .safetensors (the inverse of diffusers' loader)
    device.py       device and precision: auto (cuda fp16, mps fp16, cpu fp32) or chosen
    schedule.py     the per-stage numbers of a stream batch (Euler / Euler ancestral / LCM)
    prompts.py      prompt embeddings encoded off the frame path, blended by slerp
    hotpath.py      one frame as one pure tensor function (encode, denoise, decode): one graph
    similarity.py   skip frames that show nothing new
    timing.py       per-stage timing, off in a show (CUDA events on a GPU, read a frame late)
    stream.py       StreamImg2Img: host frame in, host image out, one UNet call per frame
    lora.py         LoRA slots on the UNet: files read in the background, hot-swapped, blended live
    accel.py        eager / torch.compile / TensorRT frame, built in the background
    onnx_export.py  the UNet as ONNX with a dynamic batch (verified with onnxruntime)
    tensorrt.py     TensorRT engine build (cached) and runner: written, never run here
    bench.py        ``dreamdeck bench diffusion``
    options.py      the choices offered to the scene and the CLI (no torch)

    flow.py         flow matching (FLUX, SD3 / SD3.5, SANA-Sprint): schedule, transformer call, hot path
    flow_prompts.py their prompt embeddings (T5 + CLIP, Gemma) by each pipeline's encode_prompt, off the frame path
    flow_stream.py  FlowStream: the flow hot path as a stream (stream batch, fixed noise, background compile)
    flow_loading.py hub id / folder / single file, gated models, declared memory and the budget check
    flow_configs.py diffusers' tiny test components and the full-size architectures, random weights
    flow_bench.py   the sana-sprint / flux-schnell / sd35-turbo benchmark cases
"""

from engine.diffusion.errors import ModelNotFound

__all__ = ["ModelNotFound"]
