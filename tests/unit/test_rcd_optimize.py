"""RCD optimise / distill in plain torch: layer plan, attention capture through ComfyUI's hook
protocol, SDPA under autograd with inference tensors, the latent steps (scale, schedule, refinement,
inference mode), teacher pooling and cache."""

import math

import pytest
import torch
import torch.nn.functional as F

from fake_unet import CrossAttention, run_layer
from rcca_core.rcd.distill import TeacherCache, TeacherFeatures, TeacherRecorder, assemble_teachers, fingerprint
from rcca_core.rcd.losses import RCDLossConfig, attention_control_loss
from rcca_core.rcd.optimize import (AttentionCapture, CaptureDone, LatentOptimizer, LayerPlan, RCDError, RCDOptions,
                                    block_levels, parse_thresholds, plan_layers, sdpa_attention)


# --------------------------------------------------------------------------- UNet layout

class Downsample(torch.nn.Module):
    pass


class Upsample(torch.nn.Module):
    pass


class _TB(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn2 = torch.nn.Identity()


class _ST(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([_TB()])


def _block(attn=False, down=False, up=False):
    mods = [torch.nn.Identity()]
    if attn:
        mods.append(_ST())
    if down:
        mods = [Downsample()]
    if up:
        mods.append(Upsample())
    return torch.nn.Sequential(*mods)


class ToyUNet(torch.nn.Module):
    """ComfyUI's UNet block structure: SD1.5 (4 levels, attention on the first 3) or the tiny test layout."""

    def __init__(self, sd15=True):
        super().__init__()
        if sd15:
            ins = [_block()] + [_block(True), _block(True), _block(down=True)] * 1 + [_block(True), _block(True),
                   _block(down=True), _block(True), _block(True), _block(down=True), _block(), _block()]
            outs = [_block(), _block(), _block(up=True), _block(True), _block(True), _block(True, up=True),
                    _block(True), _block(True), _block(True, up=True), _block(True), _block(True), _block(True)]
        else:
            ins = [_block(), _block(True), _block(down=True), _block(True)]
            outs = [_block(True), _block(True, up=True), _block(True), _block(True)]
        self.input_blocks = torch.nn.ModuleList(ins)
        self.middle_block = _block(True)
        self.output_blocks = torch.nn.ModuleList(outs)


def test_block_levels_and_plan_of_an_sd15_layout():
    unet = ToyUNet()
    levels = block_levels(unet)
    assert [levels[("input", i)] for i in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [levels[("output", i)] for i in range(12)] == [3, 3, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0]
    plan = plan_layers(unet)  # 1/4 of the latent: SD1.5's 16 x 16 layers at 512 px
    assert plan.level == 2
    assert plan.map_layers == {("input", 7, 0), ("input", 8, 0), ("output", 3, 0), ("output", 4, 0), ("output", 5, 0)}
    assert plan.last_map_layer == ("output", 5, 0) and plan.feature_blocks == {7, 8}
    assert plan_layers(unet, fd_blocks="all_down").feature_blocks == {1, 2, 4, 5, 7, 8}


def test_plan_falls_back_to_the_deepest_level_with_cross_attention():
    plan = plan_layers(ToyUNet(sd15=False))  # two levels only (the tiny test model)
    assert plan.level == 1
    assert plan.map_layers == {("input", 3, 0), ("output", 0, 0), ("output", 1, 0)} and plan.feature_blocks == {3}
    with pytest.raises(RCDError, match="fd_blocks"):
        plan_layers(ToyUNet(), fd_blocks="mid")
    with pytest.raises(RCDError, match="input_blocks"):
        block_levels(torch.nn.Linear(2, 2))


def test_parse_thresholds():
    assert parse_thresholds("0:0.05, 10:0.5;20 : 0.8") == ((0, 0.05), (10, 0.5), (20, 0.8))
    assert parse_thresholds("  ") == ()
    for bad in ("0.5", "a:0.1", "3:1.5", "1:0.1, 1:0.2"):
        with pytest.raises(RCDError):
            parse_thresholds(bad)


def test_options_validate():
    with pytest.raises(RCDError):
        RCDOptions(k=-1)
    with pytest.raises(RCDError):
        RCDOptions(step_size=float("nan"))
    o = RCDOptions()
    assert (o.t_f, o.t_a, o.k, o.step_size, o.delta) == (25, 15, 1, 10.0, 1.5)
    assert o.delta_at(14) == 1.5 and o.delta_at(15) == 0.0


# --------------------------------------------------------------------------- attention capture

KEY = ("input", 1, 0)
PLAN = LayerPlan(frozenset({KEY}), frozenset({1}), 1)


def manual_maps(layer, x, context, positions, columns, h, w, temperature=100.0):
    b = x.shape[0]
    q, k = layer.to_q(x), layer.to_k(context)
    d = q.shape[-1] // layer.heads
    qh = q.reshape(b, -1, layer.heads, d).transpose(1, 2)
    kh = k.reshape(b, -1, layer.heads, d).transpose(1, 2)
    probs = (qh @ kh.transpose(-1, -2) / math.sqrt(d)).softmax(-1).mean(1)[..., positions]
    return (temperature * probs).softmax(-1)[..., columns].transpose(1, 2).reshape(b, len(columns), h, w)


def capture_setup(positions=(1, 2, 3, 4), columns=(0, 2), previous=None):
    capture = AttentionCapture(PLAN, previous)
    capture.configure(list(positions), list(columns))
    options = {}
    capture.install(options)
    return capture, options["transformer_options"]


def test_capture_gives_attend_and_excite_maps_and_calls_the_previous_override():
    torch.manual_seed(0)
    layer = CrossAttention(dim=16, context_dim=12, heads=2)
    x, ctx = torch.randn(2, 16, 16), torch.randn(2, 7, 12)
    calls = []

    def previous(func, *args, **kwargs):
        calls.append(args[0].shape)
        return func(*args, **kwargs)

    capture, to = capture_setup(previous=previous)
    capture.start()
    out = run_layer(layer, x, ctx, 4, 4, to, key=KEY)
    maps, feats = capture.result()
    assert calls == [x.shape]  # the override already present was kept and called
    torch.testing.assert_close(out, run_layer(layer, x, ctx, 4, 4, {}, key=KEY))  # output unchanged
    torch.testing.assert_close(maps, manual_maps(layer, x, ctx, [1, 2, 3, 4], [0, 2], 4, 4))
    assert maps.shape == (2, 2, 4, 4) and maps.dtype == torch.float32 and feats == {}


def test_capture_is_inactive_outside_start_and_skips_other_layers():
    layer = CrossAttention(dim=16, context_dim=12, heads=2)
    x, ctx = torch.randn(1, 16, 16), torch.randn(1, 7, 12)
    capture, to = capture_setup()
    run_layer(layer, x, ctx, 4, 4, to, key=KEY)  # not started
    capture.start()
    run_layer(layer, x, ctx, 4, 4, to, key=("output", 5, 0))  # not a map layer
    assert capture.result()[0] is None


def test_capture_reads_only_the_conditional_rows_and_input_block_features():
    layer = CrossAttention(dim=16, context_dim=12, heads=2)
    x, ctx = torch.randn(4, 16, 16), torch.randn(4, 7, 12)
    capture, to = capture_setup()
    capture.start()
    run_layer(layer, x, ctx, 4, 4, dict(to, cond_or_uncond=[1, 0]), key=KEY)  # uncond chunk first
    h = torch.randn(4, 8, 4, 4)
    capture.input_block_patch(h, {"block": ("input", 1), "cond_or_uncond": [1, 0]})
    maps, feats = capture.result()
    torch.testing.assert_close(maps, manual_maps(layer, x[2:], ctx[2:], [1, 2, 3, 4], [0, 2], 4, 4))
    assert torch.equal(feats[1], h[2:])


def test_capture_ends_the_forward_after_the_last_map_layer_and_lets_gradients_through():
    layer = CrossAttention(dim=16, context_dim=12, heads=2).requires_grad_(False)  # frozen, as in ComfyUI
    x = torch.randn(1, 16, 16, requires_grad=True)
    with torch.inference_mode():
        ctx = torch.randn(1, 7, 12)  # conditioning made inside ComfyUI's inference mode
    capture, to = capture_setup()
    capture.start(early_exit=True)
    with pytest.raises(CaptureDone):
        run_layer(layer, x, ctx, 4, 4, to, key=KEY)
    maps, _ = capture.result()
    maps[:, 0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_capture_refuses_word_positions_beyond_the_context():
    layer = CrossAttention(dim=16, context_dim=12, heads=2)
    capture, to = capture_setup(positions=(1, 9), columns=(0, 1))
    capture.start()
    with pytest.raises(RCDError, match="RCD Embedding Refiner"):
        run_layer(layer, torch.randn(1, 16, 16), torch.randn(1, 7, 12), 4, 4, to, key=KEY)


def test_sdpa_attention_matches_reference_and_takes_inference_tensors_under_grad():
    q = torch.randn(2, 16, 8, requires_grad=True)
    with torch.inference_mode():
        k, v = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
        mask = torch.zeros(2, 16, 5)
        mask[:, :, -1] = float("-inf")
    out = sdpa_attention(q, k, v, 2, mask=mask)
    out.sum().backward()
    qh, kh, vh = (t.detach().reshape(2, -1, 2, 4).transpose(1, 2) for t in (q, k.clone(), v.clone()))
    ref = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask.clone().unsqueeze(1)).transpose(1, 2).reshape(2, 16, 8)
    torch.testing.assert_close(out.detach(), ref)
    assert q.grad is not None


# --------------------------------------------------------------------------- latent optimiser

class ToyModel(torch.nn.Module):
    """x (B, 4, 8, 8) -> subject maps (B, 2, 4, 4) and a 'down-block' feature (B, 6, 4, 4), smooth in x."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w_map = torch.nn.Parameter(torch.randn(3, 4, 3, 3, generator=g) * 0.3)
        self.w_feat = torch.nn.Parameter(torch.randn(6, 4, 3, 3, generator=g) * 0.3)

    def forward(self, x, sigma):
        z = x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt()
        logits = F.avg_pool2d(F.conv2d(z, self.w_map, padding=1), 2)  # 3 "tokens"
        maps = (logits * 4).softmax(dim=1)[:, :2]
        return maps, {7: F.avg_pool2d(torch.tanh(F.conv2d(z, self.w_feat, padding=1)), 2)}


@pytest.fixture
def toy():
    with torch.inference_mode():  # weights made like ComfyUI's (inference tensors): never saved for backward here
        model = ToyModel()
    return model


def forward_of(model):
    def forward(x, sigma):
        with torch.inference_mode(False):
            w_map, w_feat = model.w_map.clone(), model.w_feat.clone()
        z = x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt()
        logits = F.avg_pool2d(F.conv2d(z, w_map, padding=1), 2)
        maps = (logits * 4).softmax(dim=1)[:, :2]
        return maps, {7: F.avg_pool2d(torch.tanh(F.conv2d(z, w_feat, padding=1)), 2)}
    return forward


def latent(seed=0, batch=1):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * 3


def test_step_updates_an_inference_tensor_in_place_and_lowers_the_loss(toy):
    opt = LatentOptimizer(RCDOptions(step_size=0.05, distill=False, track_loss=True))
    with torch.inference_mode():
        x = latent()
        before = x.clone()
        assert opt.step(0, x, torch.tensor([2.0]), forward_of(toy))
    assert x.is_inference() and not torch.equal(x, before)
    rec = opt.records[0]
    assert rec["iters"] == 1 and rec["loss_after"] < rec["loss"] and rec["fd"] == 0.0


def test_step_is_s_times_one_plus_sigma_squared_times_the_gradient(toy):
    o = RCDOptions(step_size=0.2, distill=False)
    x, sigma = latent(batch=2), torch.tensor([3.0, 3.0])
    xg = x.clone().requires_grad_(True)
    maps, _ = forward_of(toy)(xg, sigma)
    loss = sum(o.delta * attention_control_loss(maps[b], None, o.loss) for b in range(2))
    (grad,) = torch.autograd.grad(loss, xg)
    LatentOptimizer(o).step(0, x, sigma, forward_of(toy))
    torch.testing.assert_close(x, xg.detach() - 0.2 * (1 + 9.0) * grad, rtol=1e-5, atol=1e-5)


def test_schedule_k_zero_and_t_f_leave_the_latent_alone(toy):
    x = latent()
    for options, step in ((RCDOptions(k=0, distill=False), 0), (RCDOptions(t_f=3, distill=False), 3),
                          (RCDOptions(t_a=2, distill=False), 2)):  # no teacher and delta 0 from t_A on
        y = x.clone()
        assert not LatentOptimizer(options).step(step, y, torch.tensor([1.0]), forward_of(toy))
        assert torch.equal(y, x)


def test_region_consistency_uses_the_maps_of_t_c_steps_before(toy):
    opt = LatentOptimizer(RCDOptions(step_size=0.01, distill=False))
    x = latent()
    opt.step(0, x, torch.tensor([2.0]), forward_of(toy))
    assert 0 in opt.history and opt.records[0]["rc"] == 0.0
    opt.step(1, x, torch.tensor([1.5]), forward_of(toy))
    assert set(opt.history) == {0, 1}
    opt.step(2, x, torch.tensor([1.0]), forward_of(toy))
    assert set(opt.history) == {1, 2}  # only t_c = 1 step back is kept


def test_refinement_keeps_stepping_until_the_threshold(toy):
    unreachable = LatentOptimizer(RCDOptions(step_size=0.01, distill=False, refine=((0, 1.0),), max_refine_iters=3))
    unreachable.step(0, latent(), torch.tensor([2.0]), forward_of(toy))
    assert unreachable.records[0]["iters"] == 1 + 3
    easy = LatentOptimizer(RCDOptions(step_size=0.01, distill=False, refine=((0, 0.01),)))
    easy.step(0, latent(), torch.tensor([2.0]), forward_of(toy))
    assert easy.records[0]["iters"] == 1


def test_distillation_pulls_pooled_features_towards_the_teacher(toy):
    with torch.inference_mode():  # teachers are recorded during ComfyUI's (inference-mode) sampling
        teacher_x = latent(seed=5)
        maps, feats = toy(teacher_x, torch.tensor([2.0]))
        recorders = []
        for j in range(2):
            r = TeacherRecorder(RCDLossConfig())
            r.record(0, maps[:, j:j + 1], feats)
            recorders.append(r)
    teacher = assemble_teachers(recorders)
    assert teacher.at(0)[7].shape == (1, 2, 6) and not teacher.at(0)[7].is_inference()
    opt = LatentOptimizer(RCDOptions(step_size=0.05, delta=0.0, t_a=0, track_loss=True), teacher)
    assert opt.step(0, latent(), torch.tensor([2.0]), forward_of(toy))
    rec = opt.records[0]
    assert rec["fd"] > 0 and rec["fd_after"] < rec["fd"] and rec["rae"] == 0.0
    # the teacher's own latent is already where the teacher is: zero distillation loss
    same = LatentOptimizer(RCDOptions(step_size=0.05, delta=0.0, t_a=0), teacher)
    same.step(0, teacher_x.clone(), torch.tensor([2.0]), forward_of(toy))
    assert same.records[0]["fd"] == pytest.approx(0.0, abs=1e-5)


def test_a_forward_without_maps_is_skipped():
    opt = LatentOptimizer(RCDOptions(distill=False))
    x = latent()
    assert not opt.step(0, x, torch.tensor([1.0]), lambda x, s: (None, {}))
    assert opt.records[0]["skipped"] and torch.equal(x, latent())


# --------------------------------------------------------------------------- teachers

def test_teacher_cache_is_an_lru_with_counts():
    cache = TeacherCache(maxsize=2)
    a, b, c = TeacherFeatures(), TeacherFeatures(), TeacherFeatures()
    assert cache.get("a") is None and cache.misses == 1
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a and cache.hits == 1
    cache.put("c", c)  # evicts b, the least recently used
    assert "b" not in cache and "a" in cache and len(cache) == 2


def test_fingerprint_sees_values_not_identities():
    t = torch.arange(6.0).reshape(2, 3)
    with torch.inference_mode():
        ti = torch.arange(6.0).reshape(2, 3)
    assert fingerprint(t, {"a": 1, "b": [2, 3]}) == fingerprint(ti, {"b": [2, 3], "a": 1})
    assert fingerprint(t) != fingerprint(t + 1e-3) and fingerprint(t) != fingerprint(t.reshape(3, 2))


def test_capture_rows_with_their_own_prompts():
    """Teachers of several subjects in one batch: each conditional row has its own words and noun."""
    layer = CrossAttention(dim=16, context_dim=12, heads=2)
    x, ctx = torch.randn(2, 16, 16), torch.randn(2, 7, 12)
    capture = AttentionCapture(PLAN)
    capture.configure_rows([([1, 2, 3], [2]), ([1, 2, 3, 4, 5], [1])])
    options = {}
    capture.install(options)
    capture.start()
    run_layer(layer, x, ctx, 4, 4, options["transformer_options"], key=KEY)
    maps, _ = capture.result()
    torch.testing.assert_close(maps[0:1], manual_maps(layer, x[:1], ctx[:1], [1, 2, 3], [2], 4, 4))
    torch.testing.assert_close(maps[1:2], manual_maps(layer, x[1:], ctx[1:], [1, 2, 3, 4, 5], [1], 4, 4))
    with pytest.raises(RCDError):
        capture.configure_rows([([1, 2], [0]), ([1, 2], [0, 1])])  # different column counts
