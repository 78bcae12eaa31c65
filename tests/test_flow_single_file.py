"""Single-file flow checkpoints, in the layouts they are published in, load to the same model.

FLUX is published as the transformer alone in Black Forest Labs' layout (``flux1-schnell.safetensors``),
SD3 / SD3.5 in Stability's MMDiT layout. The tests build the tiny diffusers pipelines, save them as
folders (the ``config`` a single file's other parts come from), write the transformer back in the
original layout (the inverses of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` /
``convert_sd3_transformer_checkpoint_to_diffusers``, below) and load the file through ``load_flow``:
the weights are the original's and so is the frame.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="the diffusion extra is not installed")

from safetensors.torch import save_file  # noqa: E402

from diffusion_fixtures import offline, one_torch_thread  # noqa: E402,F401  (fixtures)
from engine.diffusion.device import choose_device  # noqa: E402
from engine.diffusion.errors import ModelNotFound  # noqa: E402
from engine.diffusion.flow_configs import build_tiny_flow_pipeline  # noqa: E402
from engine.diffusion.flow_loading import FlowSpec, flux_to_diffusers, load_flow  # noqa: E402
from test_flow_hotpath import frames, make_stream  # noqa: E402

CPU = choose_device("cpu", "float32")
MMDIT = "model.diffusion_model."


def swap_halves(tensor):
    """diffusers' (scale, shift) <-> the originals' (shift, scale): the same swap both ways."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def flux_to_bfl(state: dict) -> dict:
    """A diffusers FLUX transformer's state dict in Black Forest Labs' layout."""
    out = {}
    ab = ("weight", "bias")
    pairs = {
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "context_embedder": "txt_in",
        "x_embedder": "img_in",
        "proj_out": "final_layer.linear",
    }
    doubles = {int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}
    singles = {int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")}
    for i in doubles:
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        pairs |= {
            d + "norm1.linear": o + "img_mod.lin",
            d + "norm1_context.linear": o + "txt_mod.lin",
            d + "ff.net.0.proj": o + "img_mlp.0",
            d + "ff.net.2": o + "img_mlp.2",
            d + "ff_context.net.0.proj": o + "txt_mlp.0",
            d + "ff_context.net.2": o + "txt_mlp.2",
            d + "attn.to_out.0": o + "img_attn.proj",
            d + "attn.to_add_out": o + "txt_attn.proj",
        }
        for kind in ab:
            out[o + f"img_attn.qkv.{kind}"] = torch.cat([state[d + f"attn.to_{x}.{kind}"] for x in "qkv"])
            out[o + f"txt_attn.qkv.{kind}"] = torch.cat([state[d + f"attn.add_{x}_proj.{kind}"] for x in "qkv"])
        for ours, theirs in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm")):
            out[o + theirs + ".scale"] = state[d + f"attn.{ours}.weight"]
        for ours, theirs in (("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            out[o + theirs + ".scale"] = state[d + f"attn.{ours}.weight"]
    for i in singles:
        s, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        pairs |= {s + "norm.linear": o + "modulation.lin", s + "proj_out": o + "linear2"}
        for kind in ab:
            parts = [state[s + f"attn.to_{x}.{kind}"] for x in "qkv"] + [state[s + f"proj_mlp.{kind}"]]
            out[o + f"linear1.{kind}"] = torch.cat(parts)
        out[o + "norm.query_norm.scale"] = state[s + "attn.norm_q.weight"]
        out[o + "norm.key_norm.scale"] = state[s + "attn.norm_k.weight"]
    for ours, theirs in pairs.items():
        for kind in ab:
            if f"{ours}.{kind}" in state:
                out[f"{theirs}.{kind}"] = state[f"{ours}.{kind}"]
    for kind in ab:
        out[f"final_layer.adaLN_modulation.1.{kind}"] = swap_halves(state[f"norm_out.linear.{kind}"])
    assert sum(t.numel() for t in out.values()) == sum(t.numel() for t in state.values())  # nothing left out
    return {k: v.contiguous() for k, v in out.items()}


def sd3_to_mmdit(state: dict) -> dict:
    """A diffusers SD3 transformer's state dict in Stability's MMDiT layout (``model.diffusion_model.``)."""
    out = {"pos_embed": state["pos_embed.pos_embed"]}
    pairs = {
        "pos_embed.proj": "x_embedder.proj",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
        "context_embedder": "context_embedder",
        "proj_out": "final_layer.linear",
    }
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")})
    for i in layers:
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == layers[-1]  # context_pre_only: no context output projection or MLP, a swapped norm
        pairs |= {
            d + "attn.to_out.0": x + "attn.proj",
            d + "norm1.linear": x + "adaLN_modulation.1",
            d + "ff.net.0.proj": x + "mlp.fc1",
            d + "ff.net.2": x + "mlp.fc2",
            d + "attn.norm_q": x + "attn.ln_q",
            d + "attn.norm_k": x + "attn.ln_k",
            d + "attn.norm_added_q": c + "attn.ln_q",
            d + "attn.norm_added_k": c + "attn.ln_k",
        }
        if not last:
            pairs |= {
                d + "attn.to_add_out": c + "attn.proj",
                d + "norm1_context.linear": c + "adaLN_modulation.1",
                d + "ff_context.net.0.proj": c + "mlp.fc1",
                d + "ff_context.net.2": c + "mlp.fc2",
            }
        for kind in ("weight", "bias"):
            out[x + f"attn.qkv.{kind}"] = torch.cat([state[d + f"attn.to_{q}.{kind}"] for q in "qkv"])
            out[c + f"attn.qkv.{kind}"] = torch.cat([state[d + f"attn.add_{q}_proj.{kind}"] for q in "qkv"])
            if last:
                out[c + f"adaLN_modulation.1.{kind}"] = swap_halves(state[d + f"norm1_context.linear.{kind}"])
    assert not any(".attn2." in k for k in state), "the tiny SD3 has no dual attention (SD3.5 Medium's)"
    for ours, theirs in pairs.items():
        for kind in ("weight", "bias"):
            if f"{ours}.{kind}" in state:
                out[f"{theirs}.{kind}"] = state[f"{ours}.{kind}"]
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = swap_halves(state[f"norm_out.linear.{kind}"])
    assert sum(t.numel() for t in out.values()) == sum(t.numel() for t in state.values())  # nothing left out
    return {MMDIT + k: v.contiguous() for k, v in out.items()}


def vae_to_ldm(state: dict, blocks: int) -> dict:
    """A diffusers AutoencoderKL's state dict in the LDM layout Stability's files keep it in
    (``first_stage_model.``): the inverse of diffusers' ``convert_ldm_vae_checkpoint``."""
    out = {}
    for key, tensor in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        for i in range(blocks):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{blocks - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{blocks - 1 - i}.upsample.")
        new = new.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.").replace("group_norm.", "norm.")
            new = new.replace("to_q.", "q.").replace("to_k.", "k.").replace("to_v.", "v.")
            new = new.replace("to_out.0.", "proj_out.")
            if tensor.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                tensor = tensor[:, :, None, None]
        out["first_stage_model." + new] = tensor.contiguous()
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny FLUX and SD3 pipelines, each saved as a diffusers folder."""
    root = tmp_path_factory.mktemp("flow")
    out = {}
    for kind in ("flux", "sd3"):
        pipe = build_tiny_flow_pipeline(kind)
        pipe.save_pretrained(root / kind)
        out[kind] = (pipe, root / kind)
    return out


def assert_same_weights(loaded, original) -> None:
    want, got = original.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key


def assert_same_frame(loaded, original) -> None:
    image = frames(1)[0]
    a, b = make_stream(original)(image), make_stream(loaded)(image)
    assert a is not None and np.array_equal(a, b)


def test_the_bfl_layout_here_is_what_diffusers_converts_and_detects_as_schnell():
    """The inverse above against diffusers' own converter, at the full model's width (which that
    converter assumes): one-column stand-ins of the right lengths, nothing big. diffusers' type
    inference reads the file as FLUX-schnell (no guidance_in) and as dev with it."""
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
        infer_diffusers_model_type,
    )

    width, g = 3072, torch.Generator().manual_seed(0)
    rows = {"qkv": 3 * width, "linear1": 3 * width + 4 * width, "adaLN_modulation": 2 * width}
    bfl = flux_to_bfl(build_tiny_flow_pipeline("flux").transformer.state_dict())
    stand_in = {}
    for key in bfl:
        n = next((r for part, r in rows.items() if f".{part}" in key and key.endswith(("weight", "bias"))), 2)
        stand_in[key] = torch.randn(n, 1, generator=g)
    ours = flux_to_diffusers(dict(stand_in), width)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(stand_in))
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert infer_diffusers_model_type(bfl) == "flux-schnell"
    guided = {**bfl, "guidance_in.in_layer.bias": torch.zeros(1)}
    assert infer_diffusers_model_type(guided) == "flux-dev"


@pytest.mark.parametrize("layout", ["bfl", "comfy", "diffusers"])
def test_a_flux_file_in_bfl_layout_loads_to_the_same_model(saved, tmp_path, layout):
    """flux1-schnell.safetensors is the transformer alone: the rest comes from the config folder.
    Also as ComfyUI saves it (``model.diffusion_model.`` before BFL's names) and in diffusers' names."""
    pipe, folder = saved["flux"]
    path = tmp_path / "tiny-flux1-schnell.safetensors"
    state = pipe.transformer.state_dict()
    written = {
        "bfl": lambda: flux_to_bfl(state),
        "comfy": lambda: {MMDIT + k: v for k, v in flux_to_bfl(state).items()},
        "diffusers": lambda: {k: v.contiguous() for k, v in state.items()},
    }[layout]()
    save_file(written, str(path))
    loaded = load_flow(FlowSpec(model=str(path), config=str(folder)), CPU)
    assert type(loaded).__name__ == "FluxImg2ImgPipeline"
    assert_same_weights(loaded.transformer, pipe.transformer)
    assert_same_frame(loaded, pipe)


def test_an_sd3_file_in_mmdit_layout_loads_to_the_same_model(saved, tmp_path):
    """The transformer in Stability's layout; the VAE and text encoders from the config folder.
    (diffusers cannot tell a tiny MMDiT's type from its keys: ``config`` says what it is.)"""
    from diffusers.loaders.single_file_utils import (
        convert_sd3_transformer_checkpoint_to_diffusers,
        infer_diffusers_model_type,
    )

    pipe, folder = saved["sd3"]
    mmdit = sd3_to_mmdit(pipe.transformer.state_dict())
    # diffusers tells SD3 from the 9216-wide modulation of SD3 / SD3.5 Medium (then pos_embed's length)
    # or from SD3.5 Large's 38th block; a tiny MMDiT has neither, and falls through to SD 1.x
    assert infer_diffusers_model_type(mmdit) == "v1"
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(mmdit))
    assert all(torch.equal(back[k], v) for k, v in pipe.transformer.state_dict().items())  # the inverse is exact
    path = tmp_path / "tiny-sd3.5.safetensors"
    save_file(mmdit, str(path))
    loaded = load_flow(FlowSpec(model=str(path), config=str(folder)), CPU)
    assert type(loaded).__name__ == "StableDiffusion3Img2ImgPipeline"
    assert_same_weights(loaded.transformer, pipe.transformer)
    assert_same_weights(loaded.vae, pipe.vae)
    assert_same_frame(loaded, pipe)


def test_an_sd3_file_with_its_vae_in_ldm_layout_loads_both_from_the_file(saved, tmp_path):
    """sd3.5_large_turbo.safetensors carries the VAE too (``first_stage_model.``): taken from the file,
    not from the config folder (whose VAE here has other weights, to tell the two apart)."""
    import shutil

    from diffusers import AutoencoderKL

    pipe, folder = saved["sd3"]
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    torch.manual_seed(7)
    AutoencoderKL.from_config(pipe.vae.config).save_pretrained(other / "vae")  # not the file's VAE
    blocks = len(pipe.vae.config.block_out_channels)
    path = tmp_path / "tiny-sd3.5-with-vae.safetensors"
    save_file({**sd3_to_mmdit(pipe.transformer.state_dict()), **vae_to_ldm(pipe.vae.state_dict(), blocks)}, str(path))
    loaded = load_flow(FlowSpec(model=str(path), config=str(other)), CPU)
    assert_same_weights(loaded.transformer, pipe.transformer)
    assert_same_weights(loaded.vae, pipe.vae)
    assert_same_frame(loaded, pipe)


def test_a_single_file_whose_other_parts_are_nowhere_is_one_line(saved, tmp_path):
    """A config folder with no text encoder weights: one line naming the part and the fix."""
    import shutil

    pipe, folder = saved["sd3"]
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    for weights in (bare / "text_encoder_3").glob("*.safetensors"):
        weights.unlink()
    path = tmp_path / "tiny-sd3.5.safetensors"
    save_file(sd3_to_mmdit(pipe.transformer.state_dict()), str(path))
    with pytest.raises(ModelNotFound) as caught:
        load_flow(FlowSpec(model=str(path), config=str(bare)), CPU)
    text = str(caught.value)
    assert "\n" not in text and "text_encoder_3" in text and str(bare) in text


def test_a_sana_sprint_single_file_is_refused_in_one_line(tmp_path):
    """diffusers has no single-file loader for SANA-Sprint's pipelines: say so, and what loads."""
    path = tmp_path / "tiny-sana-sprint.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="SANA-Sprint loads from a diffusers folder or hub id") as caught:
        load_flow(FlowSpec(model=str(path)), CPU)
    assert "\n" not in str(caught.value)
