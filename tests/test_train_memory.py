"""The memory options of the train stage (components/train/memory.py, optim.py): stochastic rounding,
Easel's optimizers against their references, the fused backward pass, EMA placement, and where the
frozen parts are while samples are drawn. Runs of the whole trainer under each option are in
test_train.py."""

import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from components.config import TrainParams
from components.train.memory import EMA, FusedBackward, ema_horizon_steps, stochastic_round_
from components.train.optim import Adafactor, AdamW, build_optimizer
from tests.fake_accelerator import DEVICE, FakeAccelerator, device_of
from tests.test_models import tiny_params
from tests.test_train import captioned_set, train_params

# -- stochastic rounding -------------------------------------------------------------------------


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above each fp32 value (equal when it is one)."""
    down = (x.view(torch.int32) & -(1 << 16)).view(torch.float32)  # truncation: towards zero
    up = torch.nextafter(down.bfloat16(), torch.where(x < 0, -math.inf, math.inf).bfloat16()).float()
    exact = down == x
    return torch.where(exact, x, torch.minimum(down, up)), torch.where(exact, x, torch.maximum(down, up))


def test_stochastic_rounding_lands_on_a_neighbour_and_is_unbiased():
    x = torch.tensor([0.05 + 1e-6, -0.05 - 3e-6, 1.0 + 2**-10, 3.0, -7.25, 1e-3 + 1e-7])
    low, high = bf16_neighbours(x)
    draws = []
    for seed in range(4000):
        target = torch.empty_like(x, dtype=torch.bfloat16)
        stochastic_round_(target, x.clone(), torch.Generator().manual_seed(seed))
        draws.append(target.float())
    draws = torch.stack(draws)
    assert ((draws == low) | (draws == high)).all()  # never anything but the two neighbours
    assert torch.equal(draws[:, 3], torch.full((4000,), 3.0)) and (draws[:, 4] == -7.25).all()  # exact stays exact
    spacing = (high - low).clamp(min=1e-30)
    # The mean of 4000 draws is within 5 standard errors (sd <= spacing / 2) of the fp32 value.
    bias = (draws.mean(0) - x).abs() / spacing
    assert (bias < 5 * 0.5 / math.sqrt(4000)).all(), bias
    # round-to-nearest, for contrast, always gives the same neighbour
    assert (x.bfloat16().float() == low).logical_or(x.bfloat16().float() == high).all()


# -- Easel's optimizers against their references --------------------------------------------------


def fresh_parameters(seed: int, dtype=torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7,), (5, 6), (4, 3, 3, 3)]  # a bias, a matrix, a convolution: Adafactor factors the last two
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.05).to(dtype)) for s in shapes]


def run_steps(optimizer, params, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        optimizer.step()


@pytest.mark.parametrize(
    "options",
    [
        {"lr": 1e-3, "relative_step": False, "scale_parameter": False, "warmup_init": False},
        {"lr": None, "relative_step": True, "scale_parameter": True, "warmup_init": True},
        {"lr": 1e-3, "relative_step": False, "scale_parameter": True, "beta1": 0.9, "weight_decay": 0.01},
    ],
)
def test_easel_adafactor_is_transformers_adafactor(options):
    from transformers.optimization import Adafactor as Reference

    ours, theirs = fresh_parameters(1), fresh_parameters(1)
    run_steps(Adafactor(ours, **options), ours, 6)
    run_steps(Reference(theirs, **options), theirs, 6)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))  # bit for bit


def test_adafactor_factored_over_the_largest_two_dimensions():
    """largest_two: a matrix is factored as before, bit for bit; a convolution kernel over its output
    and input channels, with a state of 9 x (256 + 128) numbers instead of 2 x 256 x 128 x 3, and
    its weights still move against the gradients (cosine with their sum above 0.8, as last_two's)."""
    g = torch.Generator().manual_seed(4)
    matrix = [torch.nn.Parameter(torch.randn(256, 192, generator=g) * 0.05)]
    same = [torch.nn.Parameter(matrix[0].detach().clone())]
    run_steps(Adafactor(matrix, lr=1e-3, relative_step=False, factored_dims="largest_two"), matrix, 4)
    run_steps(Adafactor(same, lr=1e-3, relative_step=False), same, 4)
    assert torch.equal(matrix[0], same[0])
    for dims, state_size in (("last_two", 2 * 256 * 128 * 3), ("largest_two", 9 * (256 + 128))):
        conv = [torch.nn.Parameter(torch.randn(256, 128, 3, 3, generator=torch.Generator().manual_seed(5)) * 0.05)]
        start = conv[0].detach().clone()
        optimizer = Adafactor(conv, lr=1e-3, relative_step=False, factored_dims=dims, beta1=0.9)
        grads = torch.Generator().manual_seed(0)
        total = torch.zeros_like(start)
        for _ in range(3):
            conv[0].grad = torch.randn(conv[0].shape, generator=grads)
            total += conv[0].grad
            optimizer.step()
        state = optimizer.state[conv[0]]
        assert state["exp_avg_sq_row"].numel() + state["exp_avg_sq_col"].numel() == state_size
        moved = (conv[0].detach() - start).flatten()
        assert torch.nn.functional.cosine_similarity(moved, -total.flatten(), dim=0) > 0.8


def test_easel_adamw_is_torch_adamw():
    ours, theirs = fresh_parameters(2), fresh_parameters(2)
    run_steps(AdamW(ours, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01), ours, 6)
    run_steps(torch.optim.AdamW(theirs, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01), theirs, 6)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-9) for a, b in zip(ours, theirs, strict=True))


def test_fp32_moments_of_bf16_weights_survive_a_checkpoint():
    """torch casts optimizer state to the parameter's dtype on load; Easel's keep fp32."""
    params = fresh_parameters(3, torch.bfloat16)
    optimizer = AdamW(params, lr=1e-3)
    run_steps(optimizer, params, 2)
    saved = optimizer.state_dict()
    again = AdamW(fresh_parameters(3, torch.bfloat16), lr=1e-3)
    again.load_state_dict(saved)
    state = again.state[again.param_groups[0]["params"][1]]
    assert state["exp_avg"].dtype == torch.float32
    assert torch.equal(state["exp_avg_sq"], optimizer.state[params[1]]["exp_avg_sq"])


# -- the quality test: full_bf16 against the fp32-master trajectory -------------------------------


def regression_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    y = x @ (torch.randn(256, 256, generator=g) * 0.05).t()
    w0 = torch.randn(256, 256, generator=g) * 0.05  # weights of SDXL's typical size (|w| ~ 0.05)
    return x, y, w0


def descend(optimizer_of, weight: torch.Tensor, steps: int) -> list[float]:
    """`steps` full-batch steps of a least-squares fit; the loss (in float64) before and after."""
    x, y, _ = regression_problem()
    param = torch.nn.Parameter(weight.clone())
    optimizer = optimizer_of([param])

    def loss_of(w):
        return ((x.double() @ w.double().t() - y.double()) ** 2).mean().item()

    start = loss_of(param.detach())
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((x.to(param.dtype) @ param.t()).float() - y).pow(2).mean()
        loss.backward()
        optimizer.step()
    return [start, loss_of(param.detach())], param.detach().float()


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_full_bf16_follows_the_fp32_trajectory_and_nearest_rounding_stalls(name):
    """1,000 steps at SDXL's learning rate, 4e-7, on weights of about 0.05, where bf16's spacing is
    2.4e-4, 600 times the step. Three runs of the same optimizer maths:
    - fp32 master weights (what accelerate's mixed bf16 keeps): the reference trajectory;
    - `full_bf16` (bf16 weights, Easel's optimizer with stochastic rounding): its weights move along
      the reference's displacement (least-squares coefficient within 1 +- 0.1, i.e. 10 %) and its loss
      falls by the reference's amount within 10 %;
    - bf16 weights with round-to-nearest (the reference optimizer on bf16 weights, which is what the
      plain libraries do): the coefficient and the loss decrease are under 5 % of the reference's.
    """
    _, _, w0 = regression_problem()
    lr, steps = 4e-7, 1000
    params = TrainParams(
        optimizer=name, learning_rate=lr, mixed_precision="bf16", full_bf16=True, optimizer_args={"weight_decay": 0.0}
    )
    if name == "adafactor":
        from transformers.optimization import Adafactor as Reference

        def reference(p):
            return Reference(p, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False)
    else:

        def reference(p):
            return torch.optim.AdamW(p, lr=lr, weight_decay=0.0)

    (start, end32), w32 = descend(reference, w0, steps)
    (_, end_sr), w_sr = descend(lambda p: build_optimizer(p, params), w0.bfloat16(), steps)
    (_, end_rn), w_rn = descend(reference, w0.bfloat16(), steps)
    moved = w32 - w0
    base = w0.bfloat16().float()
    assert moved.abs().mean() > 4 * lr * steps / 10  # the reference did move (about lr per step)

    def along(w):
        return float(((w - base) * moved).sum() / (moved * moved).sum())

    assert along(w_sr) == pytest.approx(1.0, abs=0.1)
    assert (start - end_sr) == pytest.approx(start - end32, rel=0.1)
    assert abs(along(w_rn)) < 0.05 and abs(start - end_rn) < 0.05 * (start - end32)


# -- the fused backward pass ---------------------------------------------------------------------


def tiny_unet(tiny_models) -> UNet2DConditionModel:
    unet = UNet2DConditionModel.from_pretrained(tiny_models / "sdxl", subfolder="unet")
    unet.enable_gradient_checkpointing()
    unet.train()
    return unet


def unet_loss(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    embeds, pooled = torch.randn(2, 77, 64, generator=g), torch.randn(2, 32, generator=g)
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)
    pred = unet(
        latents, torch.tensor([10, 500]), embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
    ).sample
    return pred.pow(2).mean()


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_fused_backward_pass_is_the_same_step_without_all_the_gradients(tiny_models, name):
    """Stepping each parameter inside backward gives the same weights as stepping after it, bit for
    bit (gradient checkpointing on), while at most one parameter's gradient exists at any time
    (after a plain backward they all do)."""
    params = TrainParams(optimizer=name, learning_rate=1e-3, fused_backward_pass=True, max_grad_norm=None)
    plain, fused = tiny_unet(tiny_models), tiny_unet(tiny_models)
    plain_opt = build_optimizer(plain.parameters(), params)
    fused_opt = build_optimizer(fused.parameters(), params)
    hooks = FusedBackward(fused_opt, fused.parameters())
    alive = []
    step_param = fused_opt.step_param

    def counting(p, group):
        alive.append(sum(q.grad is not None for q in fused.parameters()))
        step_param(p, group)

    fused_opt.step_param = counting
    norms = []
    for seed in range(3):
        unet_loss(plain, seed).backward()
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in plain.parameters()])))
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        unet_loss(fused, seed).backward()
        assert hooks.finish_step() == pytest.approx(norms[-1], rel=1e-5)  # the global norm, still logged
        assert all(p.grad is None for p in fused.parameters())
    count = sum(1 for _ in fused.parameters())
    assert len(alive) == 3 * count and max(alive) == 1
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), fused.parameters(), strict=True))
    hooks.remove()


# -- EMA and the device bugs (a fake accelerator: see tests/fake_accelerator.py) ------------------


def test_ema_matches_diffusers_ema_and_its_bf16_copy_does_not_stall():
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 64) * 0.05)]
    ours = EMA(params, decay=0.99, device=torch.device("cpu"), dtype=torch.float32)
    theirs = EMAModel(params, decay=0.99)
    half = EMA(params, decay=0.99, device=torch.device("cpu"), dtype=torch.bfloat16, seed=1)
    for _ in range(200):
        with torch.no_grad():
            params[0].add_(1e-5)  # a slow drift, far below bf16's spacing at 0.05 each step
        ours.step(params)
        theirs.step(params)
        half.step(params)
    assert torch.allclose(ours.weights()[0], theirs.shadow_params[0], rtol=0, atol=1e-7)
    drift = ours.weights()[0] - params[0].detach().bfloat16().float()  # the EMA trails the weights
    error = half.weights()[0].float() - ours.weights()[0]
    assert error.mean().abs() < 0.05 * drift.abs().mean()  # unbiased in aggregate: no stall


def test_ema_lives_where_it_is_told_beside_an_accelerator_unet(tmp_path, tiny_models):
    """The U-Net on a (fake) CUDA device, as accelerate.prepare leaves it. diffusers' EMAModel, built
    from the parameters before they moved (the old code), fails on its first update with a device
    mismatch; the trainer's EMA, built after, updates on the accelerator or from CPU memory. Only
    devices are checked here (fake tensors hold no numbers); test_train.py checks the values."""
    from diffusers.training_utils import EMAModel

    from components.train.loop import Trainer, load_training_items

    captions = captioned_set(tmp_path)
    items = load_training_items(captions)
    for device in ("accelerator", "cpu"):
        params = train_params(tmp_path, ema={"enabled": True, "device": device})
        trainer = Trainer(params, tiny_params(tiny_models), items, progress=False)
        unet = trainer.parts.unet
        old = EMAModel(unet.parameters())
        with FakeAccelerator():
            unet.to(DEVICE)  # what prepare does on a GPU
            trainer.device = DEVICE
            with pytest.raises(RuntimeError, match="same device"):
                old.step(unet.parameters())
            ema = trainer._build_ema(unet)
            ema.step(unet.parameters())
            ema.step(unet.parameters())
        expected = DEVICE if device == "accelerator" else torch.device("cpu")
        assert {t.device for t in ema.weights()} == {expected}


def sampling_probe(record):
    """Stands in for components.sdxl.generation.generate under the fake accelerator: the calls sampling
    makes on every part (both text encoders through encode_prompt, the U-Net, the VAE decoder),
    without the scheduler loop, whose branches read tensor values that fake tensors do not have."""

    def probe(pipe, prompts, negatives, seeds, settings, output_type="pil"):
        device = device_of(pipe.unet)
        cond, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, device=device, do_classifier_free_guidance=True, negative_prompt=negatives
        )
        latents = torch.zeros(len(prompts), 4, settings.height // 8, settings.width // 8, device=device)
        time_ids = torch.tensor(
            [[settings.height, settings.width, 0, 0, settings.height, settings.width]] * len(prompts)
        )
        noise = pipe.unet(
            latents.to(cond.dtype),
            torch.tensor(999, device=device),
            encoder_hidden_states=cond,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.to(device, cond.dtype)},
        ).sample
        pipe.vae.decode(noise.to(torch.float32) / pipe.vae.config.scaling_factor)
        record.update(
            {name: device_of(getattr(pipe, name)) for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
        )
        return [Image.new("RGB", (settings.width, settings.height))] * len(prompts)

    return probe


def test_samples_with_cached_latents_and_embeddings_have_every_part_on_the_accelerator(
    tmp_path, tiny_models, monkeypatch
):
    """With both caches on, the VAE and the text encoders leave the accelerator once the caches are
    filled. Sampling (the old code) then mixed a CPU VAE and CPU encoders with the U-Net on the GPU;
    the fake accelerator shows that mismatch, and that the trainer's samples now bring every part to
    the U-Net's device for their duration and send it back after. Devices only: the images drawn
    on the CPU by the real sampler are checked in test_train.py."""
    import components.sdxl.generation
    from components.train.loop import Trainer, load_training_items

    captions = captioned_set(tmp_path)
    params = train_params(
        tmp_path, cache_latents=True, cache_text_embeddings=True, sample_prompts=["a poster"], sample_steps=2
    )
    trainer = Trainer(params, tiny_params(tiny_models), load_training_items(captions), progress=False)
    record: dict = {}
    probe = sampling_probe(record)
    monkeypatch.setattr(components.sdxl.generation, "generate", probe)
    with FakeAccelerator():
        trainer.device = trainer.frozen.device = DEVICE
        trainer.parts.unet.to(DEVICE)
        trainer._frozen_parts()
        trainer._send_cached_parts_away()  # what the trainer does once the caches are filled
        assert {device_of(getattr(trainer.parts, n)).type for n in ("vae", "text_encoder", "text_encoder_2")} == {"cpu"}
        with pytest.raises(RuntimeError, match="same device"):
            probe(trainer.pipeline(trainer.parts.unet), ["a poster"], [""], [0], trainer_settings(params))
        trainer.sample_images(trainer.parts.unet, 1, tmp_path / "out", None)
    assert set(record.values()) == {DEVICE}
    assert {device_of(getattr(trainer.parts, n)).type for n in ("vae", "text_encoder", "text_encoder_2")} == {"cpu"}
    assert (tmp_path / "out" / "samples" / "step-00000001" / "00.png").is_file()


def trainer_settings(params):
    from components.sdxl.generation import GenerationSettings

    return GenerationSettings(num_inference_steps=2, height=params.resolution, width=params.resolution)


@pytest.mark.parametrize("warmup", [False, True])
def test_the_ema_looks_back_as_far_as_the_run_states(warmup):
    """A weight that grows by one every optimizer step: the EMA trails it by how far back it looks.
    Without warm-up that is the set decay's horizon, update_every / (1 - decay) steps (less one
    update), as params say; with diffusers' warm-up, the shorter horizon it reached, which the run
    states instead of the set one (0.999 every 10 steps looked back about 230 steps after 2,000)."""
    decay, every, steps = 0.98, 10, 2000
    param = [torch.nn.Parameter(torch.zeros(1))]
    ema = EMA(param, decay, device=torch.device("cpu"), dtype=torch.float32, warmup=warmup)
    for step in range(1, steps + 1):
        param[0].data.fill_(step)
        if step % every == 0:
            ema.step(param)
    lag = steps - ema.weights()[0].item()
    stated = ema_horizon_steps(decay, every, warmup, steps)
    assert stated["set_horizon_steps"] == pytest.approx(500)
    if warmup:
        assert stated["horizon_steps"] == pytest.approx(10 / (1 - 200 / 209))  # 232 steps, not 500
        assert lag == pytest.approx(stated["horizon_steps"] - every, rel=0.15)
    else:
        assert stated["horizon_steps"] == pytest.approx(500)
        assert lag == pytest.approx(stated["horizon_steps"] - every, rel=0.03)
        assert stated["first_update_share"] == pytest.approx(decay**199)
    # A horizon longer than the run: the average is still mostly the first update's weights.
    long = ema_horizon_steps(0.999, every, False, steps)
    assert long["horizon_steps"] == pytest.approx(10_000) and long["first_update_share"] > 0.8
