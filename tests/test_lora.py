"""LoRA slots (``engine.diffusion.lora``): tiny random LoRAs made by peft, saved in diffusers'
and kohya's formats, loaded, blended and hot-swapped on the tiny UNet; then the realtime
scene's slot parameters through a real SceneWorker, and no recompile under torch.compile.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft", reason="the diffusion extra is not installed")

from diffusion_fixtures import offline, one_torch_thread, set_params, tiny, wait_for  # noqa: E402,F401  (fixtures)  # noqa: E402
from engine.diffusion.accel import CompileAccelerator  # noqa: E402
from engine.diffusion.device import choose_device  # noqa: E402
from engine.diffusion.lora import AdapterBank, random_lora, save_lora  # noqa: E402
from engine.diffusion.stream import LiveSettings, StreamConfig, StreamImg2Img  # noqa: E402
from test_diffusion_scene import P, model_folders, newest, show  # noqa: E402,F401

TARGET_RANK = 8


@pytest.fixture(scope="module")
def loras(tiny, tmp_path_factory) -> dict[str, str]:
    """a: rank 4 in both formats (the same weights); b: rank 8, kohya, with text-encoder keys;
    wide: rank 4 on more layers than a's (cannot hot-swap into a's adapter); bad: not a LoRA."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    root = tmp_path_factory.mktemp("loras")
    a = random_lora(tiny.unet, rank=4, seed=1)
    b = random_lora(tiny.unet, rank=8, seed=2, alpha=4)
    wide = random_lora(tiny.unet, rank=4, seed=3, targets=("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"))
    text_encoder = inject_adapter_in_model(
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), copy.deepcopy(tiny.text_encoder), adapter_name="te"
    )
    (root / "bad.safetensors").write_bytes(b"not a safetensors file")
    return {
        "a": str(save_lora(a, root / "a.safetensors")),
        "a_kohya": str(save_lora(a, root / "a_kohya.safetensors", kohya=True)),
        "b_kohya": str(
            save_lora(
                b,
                root / "b_kohya.safetensors",
                kohya=True,
                text_encoder=get_peft_model_state_dict(text_encoder, adapter_name="te"),
            )
        ),
        "wide": str(save_lora(wide, root / "wide.safetensors")),
        "bad": str(root / "bad.safetensors"),
    }


class UNetProbe:
    """The UNet on fixed inputs: one output to compare."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.sample = torch.randn((1, 4, 32, 32), generator=generator)
        self.text = torch.randn((1, 77, 32), generator=generator)

    @torch.no_grad()
    def __call__(self, unet) -> torch.Tensor:
        return unet(self.sample, torch.tensor([500]), encoder_hidden_states=self.text).sample


@pytest.fixture
def unet(tiny):
    return copy.deepcopy(tiny.unet)  # the bank adds adapters: each test gets its own UNet


def play(bank: AdapterBank, slot: int, source: str) -> None:
    bank.request(slot, source)
    bank.wait(60)
    change = bank.apply()
    assert change.error is None and change.files, change.error


@pytest.mark.parametrize("name", ["a", "a_kohya", "b_kohya"])
def test_each_format_loads_changes_the_output_and_weight_zero_is_the_base(unet, loras, name):
    probe = UNetProbe()
    base = probe(unet)
    bank = AdapterBank(unet, target_rank=TARGET_RANK)
    play(bank, 1, loras[name])
    assert bank.sources == {1: loras[name]}
    assert (probe(unet) - base).abs().max() > 1e-3
    bank.set_weight(1, 0.0)
    bank.apply()
    torch.testing.assert_close(probe(unet), base, atol=1e-6, rtol=0)


def test_kohya_and_diffusers_files_of_one_lora_play_the_same(tiny, loras):
    probe = UNetProbe()
    outputs = []
    for name in ("a", "a_kohya"):
        unet = copy.deepcopy(tiny.unet)
        play(AdapterBank(unet, target_rank=TARGET_RANK), 1, loras[name])
        outputs.append(probe(unet))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=0)


def test_text_encoder_weights_are_skipped_with_a_log_line(unet, loras, caplog):
    bank = AdapterBank(unet, target_rank=TARGET_RANK)
    with caplog.at_level(logging.INFO, logger="engine.diffusion.lora"):
        play(bank, 1, loras["b_kohya"])
    assert any("text-encoder tensors skipped" in r.getMessage() for r in caplog.records)


def test_a_blend_of_two_adapters_changes_the_output_continuously(unet, loras):
    probe = UNetProbe()
    bank = AdapterBank(unet, target_rank=TARGET_RANK)
    play(bank, 1, loras["a"])
    play(bank, 2, loras["b_kohya"])
    outputs = []
    for mix in np.linspace(0.0, 1.0, 9):
        bank.set_weight(1, 1.0 - mix)
        bank.set_weight(2, mix)
        assert bank.apply().changed
        outputs.append(probe(unet))
    total = (outputs[-1] - outputs[0]).abs().max()
    steps = [(after - before).abs().max() for before, after in zip(outputs, outputs[1:])]
    assert total > 1e-3
    assert all(0 < step < 0.5 * total for step in steps)  # small steps all the way, no jump


def test_a_file_swap_replaces_the_adapter_without_reloading_the_base(tiny, unet, loras):
    probe = UNetProbe()
    bank = AdapterBank(unet, target_rank=TARGET_RANK)
    play(bank, 1, loras["a"])
    base_weights = {k: v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}
    playing_a = probe(unet)
    play(bank, 1, loras["b_kohya"])
    assert bank.last_swap.hotswapped and bank.sources == {1: loras["b_kohya"]}
    after = {k: v for k, v in unet.state_dict().items() if "lora_" not in k}
    assert after.keys() == base_weights.keys()
    assert all(torch.equal(after[k], base_weights[k]) for k in after)  # the base model is untouched
    # b hot-swapped into a's (rank-padded) adapter plays exactly as b loaded on its own
    fresh = copy.deepcopy(tiny.unet)
    play(AdapterBank(fresh, target_rank=TARGET_RANK), 1, loras["b_kohya"])
    swapped = probe(unet)
    assert not torch.allclose(swapped, playing_a)
    torch.testing.assert_close(swapped, probe(fresh), atol=1e-6, rtol=0)


def test_a_file_on_other_layers_falls_back_to_a_new_adapter(unet, loras):
    bank = AdapterBank(unet, target_rank=TARGET_RANK)
    play(bank, 1, loras["a"])
    bank.request(1, loras["wide"])
    bank.wait(60)
    assert bank.apply().restructured  # it cannot hot-swap: a compiled stream must rebuild
    assert not bank.last_swap.hotswapped and bank.sources == {1: loras["wide"]}


@pytest.mark.parametrize("bad", ["bad", "missing"])
def test_a_bad_file_leaves_the_previous_adapters_playing(unet, loras, bad):
    probe = UNetProbe()
    bank = AdapterBank(unet, target_rank=TARGET_RANK)
    play(bank, 1, loras["a"])
    play(bank, 2, loras["b_kohya"])
    playing = probe(unet)
    source = loras["bad"] if bad == "bad" else loras["bad"].replace("bad.safetensors", "gone.safetensors")
    bank.request(1, source)
    bank.wait(60)
    change = bank.apply()
    message = change.error
    assert "\n" not in message and message.startswith("LoRA slot 1:") and source in message
    assert not change.files
    assert bank.sources == {1: loras["a"], 2: loras["b_kohya"]}
    torch.testing.assert_close(probe(unet), playing, atol=0, rtol=0)


def test_the_realtime_scene_slots_drive_the_adapters(show, loras):
    worker, params = show
    worker.request("realtime")
    plain = newest(worker).image
    set_params(params, {f"{P}/loras/1/file": loras["a"], f"{P}/loras/1/weight": 2.0})
    assert wait_for(lambda: not np.array_equal(newest(worker).image, plain)), worker.last_error
    set_params(params, {f"{P}/loras/1/weight": 0.0})  # weight 0: the plain image again
    assert wait_for(lambda: np.array_equal(newest(worker).image, plain)), worker.last_error
    set_params(params, {f"{P}/loras/1/weight": 2.0, f"{P}/loras/1/file": loras["bad"]})
    scene = worker.active
    assert wait_for(lambda: scene.warning is not None and "LoRA slot 1" in scene.warning)  # the HUD's error line
    playing = newest(worker).image  # a still plays, at the new weight
    assert not np.array_equal(playing, plain)
    assert np.array_equal(newest(worker, newest(worker).index).image, playing)
    assert worker.active_name == "realtime" and worker.last_error is None  # no frame was lost to it
    set_params(params, {f"{P}/loras/1/file": loras["a_kohya"]})  # a file that plays ends the complaint
    assert wait_for(lambda: scene.warning is None), scene.warning


def test_weight_changes_and_file_swaps_do_not_recompile(tiny, loras):
    """A compiled stream takes weight changes and hot-swaps with ``fail_on_recompile`` set.

    Dynamo's ``eager`` backend: recompiles are decided by dynamo's guards, the same for every
    backend (see test_diffusion_accel.py for why not aot_eager / inductor on this CPU)."""
    model = copy.deepcopy(tiny)
    bank = AdapterBank(model.unet, target_rank=TARGET_RANK)
    stream = StreamImg2Img(
        model,
        choose_device("cpu", "float32"),
        StreamConfig(size=(32, 32)),
        LiveSettings(similarity_threshold=0.0),
        accelerator=CompileAccelerator(backend="eager"),
        adapters=bank,
    )
    stream.prompts.wait()
    frame = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    play(bank, 1, loras["a"])  # a first file: new layers, before the first build

    def compiled_frame() -> np.ndarray:
        stream(frame)  # starts the build
        assert stream.wait_for_accel(300), stream.accel_error
        return stream(frame)

    first = compiled_frame()
    bank.request(2, loras["b_kohya"])  # a new slot: new layers, the stream rebuilds in the background
    bank.wait(60)
    assert stream.builds_started == 1
    stream(frame)  # swaps b in, goes eager, starts the new build (which may even finish during this frame)
    assert stream.builds_started == 2
    both = compiled_frame()
    assert not np.array_equal(both, first)
    with torch.compiler.set_stance("fail_on_recompile"):
        bank.set_weight(2, 0.0)
        assert np.array_equal(stream(frame), first)  # b off: a alone again
        bank.set_weight(2, 0.5)
        half = stream(frame)
        assert not np.array_equal(half, first) and not np.array_equal(half, both)
        bank.request(1, loras["a_kohya"])  # hot-swap a file into slot 1
        bank.request(2, loras["a"])
        bank.wait(60)
        swapped = stream(frame)
        assert bank.last_swap.hotswapped and not np.array_equal(swapped, half)
    assert stream.accel == "compile"
    stream.close()
    bank.close()
