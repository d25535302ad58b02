"""RCD nodes on a real in-process ComfyUI (tiny random SD1.5, CPU): the Embedding Refiner against
CLIPTextEncode, the Latent Optimizer as a SAMPLER for SamplerCustomAdvanced under inference mode
(weights loaded the way ComfyUI loads them: inference tensors), its composition with RCCA, the
teacher cache, bad input, and a whole graph through ComfyUI's executor."""

import importlib

import pytest
import torch

SIZE = 128  # latent 16 x 16: the tiny UNet's maps are 8 x 8
PROMPT = "a black kitten and a white dog on a red couch"


def rcd_nodes(host):
    """nodes/rcd.py as a submodule of the pack ComfyUI loaded (works before it is registered)."""
    return importlib.import_module(host.pack_module("nodes").__name__ + ".rcd")


def node(host, node_id):
    return host.nodes.NODE_CLASS_MAPPINGS[node_id]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two spinning OpenMP threads are 10-20 x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(comfy_host):
    """(model, clip): loaded inside inference mode like a node would, so the weights are inference tensors."""
    with torch.inference_mode():
        model, clip = comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(comfy_host.ckpt_name)[:2]
    assert next(model.model.diffusion_model.parameters()).is_inference()
    return model, clip


def refine(host, clip, prompt=PROMPT, subjects="", lambda_t=0.5):
    with torch.inference_mode():
        return rcd_nodes(host).RCDEmbeddingRefiner.execute(clip, prompt, subjects, "rules", lambda_t).result[0]


def encode(host, clip, text):
    with torch.inference_mode():
        return host.nodes.CLIPTextEncode().encode(clip, text)[0]


def sample(host, model, positive, negative, sampler, steps=6, cfg=3.0, seed=7, size=SIZE, batch=1):
    """SamplerCustomAdvanced with CFGGuider under ComfyUI's inference mode."""
    with torch.inference_mode():
        guider = node(host, "CFGGuider").execute(model, positive, negative, cfg).result[0]
        sigmas = node(host, "BasicScheduler").execute(model, "normal", steps, 1.0).result[0]
        noise = node(host, "RandomNoise").execute(seed).result[0]
        latent = host.nodes.EmptyLatentImage().generate(size, size, batch)[0]
        return node(host, "SamplerCustomAdvanced").execute(noise, guider, sampler, sigmas, latent).result[0]["samples"]


def base_sampler(host, name="euler"):
    return node(host, "KSamplerSelect").execute(name).result[0]


def rcd_sampler(host, base, **options):
    mod = rcd_nodes(host)
    return mod.RCDSampler(base, mod.build_options(**options))


# --------------------------------------------------------------------------- Embedding Refiner

def test_refiner_lambda_one_equals_clip_text_encode_and_carries_the_spans(comfy_host, tiny):
    _, clip = tiny
    got = refine(comfy_host, clip, lambda_t=1.0)
    want = encode(comfy_host, clip, PROMPT)
    assert len(got) == len(want) == 1
    assert torch.equal(got[0][0], want[0][0])
    assert torch.equal(got[0][1]["pooled_output"], want[0][1]["pooled_output"])
    subjects = got[0][1]["rcd_subjects"]
    assert [(s["text"], s["indices"], s["noun_index"]) for s in subjects] == [
        ("a black kitten", (1, 2, 3), 3), ("a white dog", (5, 6, 7), 7), ("a red couch", (9, 10, 11), 11)]
    assert got[0][1]["rcd_prompt"]["word_positions"] == tuple(range(1, 12))


def test_refiner_lambda_zero_puts_single_subject_tokens_in_place(comfy_host, tiny):
    _, clip = tiny
    got = refine(comfy_host, clip, lambda_t=0.0)[0][0]
    full = encode(comfy_host, clip, PROMPT)[0][0]
    for text, idx in (("a black kitten", [1, 2, 3]), ("a white dog", [5, 6, 7]), ("a red couch", [9, 10, 11])):
        alone = encode(comfy_host, clip, text)[0][0]
        assert torch.equal(got[:, idx], alone[:, 1:4])
        # CLIP is causal: the first subject (a prefix of the prompt) has the same embeddings alone
        assert torch.equal(alone[:, 1:4], full[:, idx]) == (text == "a black kitten")
    others = [i for i in range(77) if i not in (1, 2, 3, 5, 6, 7, 9, 10, 11)]
    assert torch.equal(got[:, others], full[:, others])


def test_refiner_half_and_given_subjects(comfy_host, tiny):
    _, clip = tiny
    got = refine(comfy_host, clip, subjects="white dog, black kitten", lambda_t=0.5)[0]
    full = encode(comfy_host, clip, PROMPT)[0][0]
    dog = encode(comfy_host, clip, "white dog")[0][0]
    assert [s["text"] for s in got[1]["rcd_subjects"]] == ["black kitten", "white dog"]  # prompt order
    torch.testing.assert_close(got[0][:, [6, 7]], 0.5 * full[:, [6, 7]] + 0.5 * dog[:, [1, 2]])
    assert torch.equal(got[0][:, [1, 5, 8, 9, 10, 11]], full[:, [1, 5, 8, 9, 10, 11]])


def test_refiner_spans_follow_comfyuis_windows_past_77_tokens(comfy_host, tiny):
    _, clip = tiny
    prompt = "soft morning light over a quiet old town, " * 9 + "a black kitten and a white dog"
    got = refine(comfy_host, clip, prompt, subjects="black kitten, white dog", lambda_t=0.0)[0]
    subjects = got[1]["rcd_subjects"]
    assert got[0].shape[1] == 154 and all(min(s["indices"]) > 77 for s in subjects)
    for s in subjects:
        alone = encode(comfy_host, clip, s["text"])[0][0]
        assert torch.equal(got[0][:, list(s["indices"])], alone[:, 1:1 + len(s["indices"])])
    tokens = clip.tokenize(prompt)["l"]
    flat = [t[0] for w in tokens for t in w]
    assert [flat[i] for i in subjects[1]["indices"]] == [t[0] for t in clip.tokenize("white dog")["l"][0][1:3]]


def test_refiner_one_subject_is_a_documented_fallback(comfy_host, tiny):
    _, clip = tiny
    got = refine(comfy_host, clip, "a photo of a black kitten", lambda_t=0.0)[0]
    assert [s["text"] for s in got[1]["rcd_subjects"]] == ["a black kitten"]


class FakeSDXLClip:
    """ComfyUI's real SDXL tokenizer (CLIP-L + CLIP-G windows) with a small contextual stand-in encoder:
    CLIP-L 768 + CLIP-G 1280 features per token, concatenated like ComfyUI's SDXL CLIP, pooled from CLIP-G."""

    def __init__(self):
        import comfy.sdxl_clip
        self.tokenizer = comfy.sdxl_clip.SDXLTokenizer()

    def tokenize(self, text):
        return self.tokenizer.tokenize_with_weights(text)

    @staticmethod
    def _encode(windows, width, phase):
        ids = torch.tensor([[t[0] for t in w] for w in windows], dtype=torch.float32).reshape(1, -1, 1)
        freq = torch.linspace(0.001, 0.1, width)
        tok = torch.sin(ids * freq + phase)
        return tok.cumsum(1) / torch.arange(1, tok.shape[1] + 1).view(1, -1, 1)  # causal: depends on the context

    def encode_from_tokens_scheduled(self, tokens):
        l = self._encode(tokens["l"], 768, 0.0)
        g = self._encode(tokens["g"], 1280, 1.0)
        return [[torch.cat([l, g], dim=-1), {"pooled_output": g[:, -1].clone()}]]


def test_refiner_sdxl_refines_both_encoders_and_keeps_the_pooled_output(comfy_host):
    clip = FakeSDXLClip()
    prompt = "a red apple next to a green bottle"
    got = rcd_nodes(comfy_host).refine_conditioning(clip, prompt, None, "rules", 0.0)[0]
    full = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))[0]
    apple = clip.encode_from_tokens_scheduled(clip.tokenize("a red apple"))[0][0]
    assert got[0].shape == (1, 77, 2048)
    assert [(s["text"], s["indices"]) for s in got[1]["rcd_subjects"]] == [("a red apple", (1, 2, 3)),
                                                                          ("a green bottle", (6, 7, 8))]
    assert torch.equal(got[0][:, 1:4], apple[:, 1:4])  # CLIP-L and CLIP-G columns both replaced
    assert torch.equal(got[0][:, 4:6], full[0][:, 4:6]) and torch.equal(got[0][:, 9:], full[0][:, 9:])
    assert torch.equal(got[1]["pooled_output"], full[1]["pooled_output"])  # the full prompt's pooled output
    assert got[1]["rcd_subjects"][0]["pooled_output"].shape == (1, 1280)  # the teacher's own


@pytest.mark.parametrize("prompt, subjects, match", [
    ("", "", "empty"),
    ("a black kitten and a white dog", "a purple giraffe", "not in the prompt"),
    ("a cat, a dog, a cow, a pig and a hen", "", "at most 4"),
    ("highly detailed, 8k", "", "no subject found"),
    ("(a black kitten:1.2) and a white dog", "", "plain text.*emphasis"),
    ("a black (kitten:1.2) and a white dog", "", "plain text.*emphasis"),
    ("embedding:foo a black kitten and a white dog", "", "plain text.*embedding"),
    ("a black kitten and a white dog", "(a white dog:1.1)", "plain text.*emphasis"),
    ("a [black kitten and a white dog", "", "not closed"),
])
def test_refiner_bad_input_is_a_clear_error(comfy_host, tiny, prompt, subjects, match):
    _, clip = tiny
    with pytest.raises(ValueError, match=match):
        refine(comfy_host, clip, prompt, subjects)


# --------------------------------------------------------------------------- Latent Optimizer

def test_k_zero_returns_exactly_the_base_samplers_output(comfy_host, tiny):
    model, clip = tiny
    positive, negative = refine(comfy_host, clip), encode(comfy_host, clip, "blurry")
    base = base_sampler(comfy_host)
    want = sample(comfy_host, model, positive, negative, base)
    got = sample(comfy_host, model, positive, negative, rcd_sampler(comfy_host, base, k=0))
    assert torch.equal(got, want)


def test_step_size_zero_keeps_the_trajectory_and_optimising_lowers_the_loss(comfy_host, tiny):
    """Same seed: with s = 0 RCD evaluates its loss along the plain trajectory (and must not change
    it); with s > 0 the loss after the steps, summed over the optimised steps, is lower."""
    model, clip = tiny
    positive, negative = refine(comfy_host, clip), encode(comfy_host, clip, "blurry")
    base = base_sampler(comfy_host)
    plain = sample(comfy_host, model, positive, negative, base)
    measure = rcd_sampler(comfy_host, base, t_f=4, t_a=3, step_size=0.0, track_loss=True)
    assert torch.equal(sample(comfy_host, model, positive, negative, measure), plain)
    optimise = rcd_sampler(comfy_host, base, t_f=4, t_a=3, step_size=2.0, track_loss=True)
    out = sample(comfy_host, model, positive, negative, optimise)
    before, after = measure.rcd.last_run.records, optimise.rcd.last_run.records
    assert [r["step"] for r in after] == [0, 1, 2, 3] and all(r["iters"] == 1 for r in after)
    assert [r["delta"] for r in after] == [1.5, 1.5, 1.5, 0.0]
    assert after[0]["fd"] > 0 and after[1]["rc"] >= 0
    assert sum(r["loss_after"] for r in after) < sum(r["loss_after"] for r in before)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3


def test_teacher_cache_hit_on_a_second_run(comfy_host, tiny):
    model, clip = tiny
    positive, negative = refine(comfy_host, clip, "a red fox and a blue car"), encode(comfy_host, clip, "")
    sampler = rcd_sampler(comfy_host, base_sampler(comfy_host), t_f=3, t_a=2, step_size=0.5)
    first = sample(comfy_host, model, positive, negative, sampler, seed=11)
    assert sampler.rcd.last_run.teacher_status == "miss"
    hits = sampler.rcd.cache.hits
    second = sample(comfy_host, model, positive, negative, sampler, seed=11)
    assert sampler.rcd.last_run.teacher_status == "hit" and sampler.rcd.cache.hits == hits + 1
    assert torch.equal(first, second)
    sample(comfy_host, model, positive, negative, sampler, seed=12)  # another seed: other noise, other teachers
    assert sampler.rcd.last_run.teacher_status == "miss"


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m", "lcm", "heun", "dpmpp_2s_ancestral", "dpmpp_sde"])
def test_other_base_samplers_take_the_latent_steps(comfy_host, tiny, name):
    model, clip = tiny
    positive, negative = refine(comfy_host, clip, "a red fox and a blue car"), encode(comfy_host, clip, "")
    base = base_sampler(comfy_host, name)
    plain = sample(comfy_host, model, positive, negative, base, steps=3)
    sampler = rcd_sampler(comfy_host, base, t_f=2, t_a=2, step_size=0.5, distill=False)
    out = sample(comfy_host, model, positive, negative, sampler, steps=3)
    assert len(sampler.rcd.last_run.records) == 2
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-4


def test_a_batch_of_two_latents_is_optimised_per_latent(comfy_host, tiny):
    model, clip = tiny
    positive, negative = refine(comfy_host, clip, "a red fox and a blue car"), encode(comfy_host, clip, "")
    base = base_sampler(comfy_host)
    plain = sample(comfy_host, model, positive, negative, base, steps=3, size=64, batch=2)
    sampler = rcd_sampler(comfy_host, base, t_f=2, t_a=1, step_size=0.5)
    out = sample(comfy_host, model, positive, negative, sampler, steps=3, size=64, batch=2)
    run = sampler.rcd.last_run
    assert out.shape == plain.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert all((out[b] - plain[b]).abs().max() > 1e-5 for b in range(2))
    assert {t.shape[:2] for t in run.optimizer.teacher.at(0).values()} == {(2, 2)}
    assert run.model is None and run.guider is None  # the sampling call's objects are not kept


def test_composes_with_the_rcca_patch_and_leaves_the_model_as_it_was(comfy_host, tiny):
    model, clip = tiny
    left = torch.zeros(1, SIZE, SIZE)
    left[..., : SIZE // 2] = 1
    with torch.inference_mode():
        regions = node(comfy_host, "RCCAAddRegion").execute(left, "a red fox", 1.0).result[0]
        regions = node(comfy_host, "RCCAAddRegion").execute(1 - left, "a blue car", 1.0, regions=regions).result[0]
        palette = node(comfy_host, "RCCARegionalPromptPalette").execute(clip, "a meadow", SIZE, SIZE, regions).result[0]
        patched = node(comfy_host, "RCCAAttentionPatch").execute(model, palette, "soft", 0.0, 1.0, "all").result[0]
    positive = refine(comfy_host, clip, "a red fox and a blue car in a meadow")
    negative = encode(comfy_host, clip, "")
    options_before = repr(patched.model_options)
    unet = model.model.diffusion_model
    functions_before = {n: (m.__dict__.get("weight_function"), m.__dict__.get("bias_function"))
                        for n, m in unet.named_modules() if hasattr(m, "weight_function")}
    base = base_sampler(comfy_host)
    plain = sample(comfy_host, patched, positive, negative, base, steps=4)
    sampler = rcd_sampler(comfy_host, base, t_f=2, t_a=2, step_size=0.5)
    out = sample(comfy_host, patched, positive, negative, sampler, steps=4)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-4
    assert sampler.rcd.last_run.records[0]["rae"] >= 0 and sampler.rcd.last_run.teacher_status == "miss"
    assert repr(patched.model_options) == options_before
    assert functions_before == {n: (m.__dict__.get("weight_function"), m.__dict__.get("bias_function"))
                                for n, m in unet.named_modules() if hasattr(m, "weight_function")}
    assert torch.equal(sample(comfy_host, patched, positive, negative, base, steps=4), plain)


def test_optimizer_bad_input_is_a_clear_error(comfy_host, tiny):
    model, clip = tiny
    mod = rcd_nodes(comfy_host)
    for name in ("uni_pc", "dpm_adaptive"):
        with pytest.raises(ValueError, match=f"cannot drive '{name}'"):
            mod.RCDLatentOptimizer.execute(base_sampler(comfy_host, name), 25, 15, 1, 10.0, 1.5, True)
    with pytest.raises(ValueError, match="KSAMPLER"):
        mod.RCDSampler(object(), mod.build_options())
    with pytest.raises(ValueError, match="step:threshold"):
        mod.RCDLatentOptimizer.execute(base_sampler(comfy_host), 25, 15, 1, 10.0, 1.5, True, refine_thresholds="soon")
    plain_positive = encode(comfy_host, clip, PROMPT)  # CLIPTextEncode: no subject spans
    sampler = rcd_sampler(comfy_host, base_sampler(comfy_host), t_f=2)
    with pytest.raises(ValueError, match="RCD Embedding Refiner"):
        sample(comfy_host, model, plain_positive, encode(comfy_host, clip, ""), sampler, steps=2)


# --------------------------------------------------------------------------- a whole graph

@pytest.fixture
def registered(comfy_host, monkeypatch):
    """The two nodes in ComfyUI's registry (until nodes/__init__.py lists them, then as they are)."""
    import nodes
    mod = rcd_nodes(comfy_host)
    for cls in (mod.RCDEmbeddingRefiner, mod.RCDLatentOptimizer):
        schema = cls.GET_SCHEMA()
        if schema.node_id not in nodes.NODE_CLASS_MAPPINGS:
            monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, schema.node_id, cls)
            monkeypatch.setitem(nodes.NODE_DISPLAY_NAME_MAPPINGS, schema.node_id, schema.display_name)
    return nodes.NODE_CLASS_MAPPINGS


def rcd_graph(ckpt, size=64, steps=4):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "RCDEmbeddingRefiner", "inputs": {"clip": ["1", 1], "prompt": "a red fox and a blue car",
                                                              "subjects": "", "parser": "rules", "lambda_t": 0.5}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                    "cfg": 3.0}},
        "5": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "6": {"class_type": "RCDLatentOptimizer", "inputs": {"sampler": ["5", 0], "t_f": 2, "t_a": 1, "k": 1,
                                                             "step_size": 0.5, "delta": 1.5, "distill": True}},
        "7": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": steps,
                                                         "denoise": 1.0}},
        "8": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "10": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["8", 0], "guider": ["4", 0],
                                                                 "sampler": ["6", 0], "sigmas": ["7", 0],
                                                                 "latent_image": ["9", 0]}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}},
    }


def test_whole_graph_runs_under_comfyuis_executor(comfy_host, registered):
    comfy_host.run_graph(rcd_graph(comfy_host.ckpt_name))
    sampler = comfy_host.node_output("6")[0]
    run = sampler.rcd.last_run
    assert [r["step"] for r in run.records] == [0, 1] and run.teacher_status in ("miss", "hit")
    assert [r["delta"] for r in run.records] == [1.5, 0.0] and run.records[1]["fd"] > 0
    assert torch.isfinite(comfy_host.node_output("10")[0]["samples"]).all()


def test_teachers_run_batched_for_deterministic_samplers_and_match_one_by_one(comfy_host, tiny, monkeypatch):
    model, clip = tiny
    mod = rcd_nodes(comfy_host)
    positive, negative = refine(comfy_host, clip, "a red fox and a blue car"), encode(comfy_host, clip, "")
    teachers = {}
    for batched in (True, False):
        if not batched:
            monkeypatch.setattr(mod.RCDRun, "_can_batch_teachers", lambda self, x, sigmas: False)
        sampler = rcd_sampler(comfy_host, base_sampler(comfy_host), t_f=3, t_a=2, step_size=0.5)
        sampler.rcd.cache.clear()
        sample(comfy_host, model, positive, negative, sampler, steps=4, seed=21)
        assert sampler.rcd.last_run.teacher_batched == batched
        teachers[batched] = sampler.rcd.last_run.optimizer.teacher
    assert set(teachers[True].steps) == set(teachers[False].steps) == {0, 1, 2}
    for step, blocks in teachers[True].steps.items():
        for block, t in blocks.items():
            assert t.shape[:2] == (1, 2)
            torch.testing.assert_close(t, teachers[False].steps[step][block], atol=1e-4, rtol=1e-4)
    monkeypatch.undo()
    stochastic = rcd_sampler(comfy_host, base_sampler(comfy_host, "euler_ancestral"), t_f=2, t_a=1, step_size=0.5)
    stochastic.rcd.cache.clear()
    sample(comfy_host, model, positive, negative, stochastic, steps=3, seed=21)
    assert not stochastic.rcd.last_run.teacher_batched  # another batch size would draw other noise


def test_sdxl_layout_with_pooled_teachers(comfy_host):
    """A small SDXL-layout UNet (2048-wide context, ADM from the pooled output): the teachers get their
    own pooled output, batched (euler) and one by one (euler_ancestral)."""
    from test_sdxl import small_sdxl  # tests/host/test_sdxl.py

    core = comfy_host.pack_module("rcca_core.rcd.refine")
    model = small_sdxl()
    g = torch.Generator().manual_seed(3)
    full, singles = torch.randn(1, 77, 2048, generator=g), [torch.randn(1, 77, 2048, generator=g) for _ in range(2)]
    subjects = [core.SubjectTokens("a red fox", (1, 2, 3), 3, (1, 2, 3), 3),
                core.SubjectTokens("a blue car", (5, 6, 7), 7, (1, 2, 3), 3)]
    pooled = [torch.randn(1, 1280, generator=g) for _ in range(3)]
    positive = [[core.refine_embedding(full, singles, subjects, 0.5),
                 {"pooled_output": pooled[0], core.RCD_SUBJECTS_KEY: core.subject_records(subjects, singles, pooled[1:]),
                  core.RCD_PROMPT_KEY: core.prompt_record("a red fox and a blue car", range(1, 8), 0.5)}]]
    negative = [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    for name, batched in (("euler", True), ("euler_ancestral", False)):
        base = base_sampler(comfy_host, name)
        plain = sample(comfy_host, model, positive, negative, base, steps=3, size=64)
        sampler = rcd_sampler(comfy_host, base, t_f=2, t_a=1, step_size=0.5)
        out = sample(comfy_host, model, positive, negative, sampler, steps=3, size=64)
        run = sampler.rcd.last_run
        assert run.teacher_batched == batched and run.plan.level == 1 and len(run.records) == 2
        assert run.records[1]["fd"] > 0 and torch.isfinite(out).all() and (out - plain).abs().max() > 1e-5
