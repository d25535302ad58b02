"""RCD Embedding Refiner on the joint text encoders of SD3 / SD3.5 (CLIP-L + CLIP-G + T5-XXL) and
Flux.1 (T5-XXL, CLIP-L pooled), on the tiny random checkpoints (fp32, CPU): the refined context
against lambda * u + (1 - lambda) * v computed here from plain CLIPTextEncode outputs, with
subject positions found here from the tokenizers' own ids; a 2-step KSampler run; refusals."""

import pytest
import torch
from test_rcd_nodes import PROMPT, encode, rcd_nodes, refine  # the same refiner and encoder calls as on SD1.5

TINY_FLUX_CKPT = "tiny_flux.safetensors"  # as tests/conftest.py writes them ("conftest" is not importable by name)
TINY_SD3_CKPT = "tiny_sd3.safetensors"
SUBJECTS = ("a black kitten", "a white dog", "a red couch")  # what the rules parser finds


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two spinning OpenMP threads are much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def find(seq, sub):
    """Start of the first occurrence of list ``sub`` in ``seq``."""
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    raise AssertionError(f"{sub} not in {seq}")


def t5_pairs(clip, text, offset):
    """(positions in the prompt's context, positions in ``text``'s own context) of ``text``'s T5
    pieces, from the HF tokenizer's ids (T5: no start token)."""
    hf = clip.tokenizer.t5xxl.tokenizer
    ids = hf(PROMPT, add_special_tokens=False)["input_ids"]
    sub = hf(text, add_special_tokens=False)["input_ids"]
    k = find(ids, sub)
    return [offset + k + j for j in range(len(sub))], [offset + j for j in range(len(sub))]


def clip_pairs(clip, text):
    """The same for the CLIP-L BPE tokens (start token at 0)."""
    hf = clip.tokenizer.clip_l.tokenizer
    ids = hf(PROMPT)["input_ids"][1:-1]
    sub = hf(text)["input_ids"][1:-1]
    k = find(ids, sub)
    return [1 + k + j for j in range(len(sub))], [1 + j for j in range(len(sub))]


def pairs(family, clip, text):
    if family == "flux":
        return [t5_pairs(clip, text, 0)]
    return [clip_pairs(clip, text), t5_pairs(clip, text, 77)]  # 77 CLIP-L/G tokens, then T5


@pytest.fixture(scope="module", params=["flux", "sd3"])
def family(request, comfy_host):
    model, clip, _ = comfy_host.load_checkpoint(TINY_FLUX_CKPT if request.param == "flux" else TINY_SD3_CKPT)
    return request.param, model, clip


def test_refined_context_is_the_fusion_at_every_subject_token_and_plain_elsewhere(comfy_host, family):
    name, _, clip = family
    lam = 0.3
    got = refine(comfy_host, clip, lambda_t=lam)
    plain = encode(comfy_host, clip, PROMPT)
    assert len(got) == len(plain) == 1
    ctx, u = got[0][0], plain[0][0]
    assert ctx.shape == u.shape and ctx.dtype == torch.float32
    assert ctx.shape[1] == (256 if name == "flux" else 154)
    assert torch.equal(got[0][1]["pooled_output"], plain[0][1]["pooled_output"])  # the prompt's own pooled vector
    touched = set()
    for text in SUBJECTS:
        v = encode(comfy_host, clip, text)[0][0]
        for part, (idx, single_idx) in enumerate(pairs(name, clip, text)):
            want = lam * u[:, idx] + (1 - lam) * v[:, single_idx]
            torch.testing.assert_close(ctx[:, idx], want, rtol=1e-6, atol=1e-6)
            if part == len(pairs(name, clip, text)) - 1:  # T5 reads both ways: alone differs for every subject
                assert not torch.equal(ctx[:, idx], u[:, idx])
            touched |= set(idx)
    others = [i for i in range(u.shape[1]) if i not in touched]
    assert torch.equal(ctx[:, others], u[:, others])
    # the records: every part's positions, marked with the family (the optimizer refuses them)
    prompt = got[0][1]["rcd_prompt"]
    assert prompt["family"] == name
    assert [p["encoder"] for p in prompt["parts"]] == (["t5xxl"] if name == "flux" else ["clip_l+clip_g", "t5xxl"])
    for rec, text in zip(got[0][1]["rcd_subjects"], SUBJECTS):
        assert rec["text"] == text
        assert list(rec["indices"]) == [i for idx, _ in pairs(name, clip, text) for i in idx]
        assert [list(p["indices"]) for p in rec["parts"]] == [idx for idx, _ in pairs(name, clip, text)]
        assert rec["noun_index"] == rec["indices"][len(pairs(name, clip, text)[0][0]) - 1]


def test_lambda_one_is_the_plain_conditioning(comfy_host, family):
    _, _, clip = family
    got = refine(comfy_host, clip, lambda_t=1.0)
    plain = encode(comfy_host, clip, PROMPT)
    assert torch.equal(got[0][0], plain[0][0])
    assert torch.equal(got[0][1]["pooled_output"], plain[0][1]["pooled_output"])


def test_ksampler_with_refined_conditioning_is_finite(comfy_host, family):
    name, model, clip = family
    positive = refine(comfy_host, clip, lambda_t=0.5)
    negative = encode(comfy_host, clip, "")
    if name == "flux":
        out = comfy_host.nodes.NODE_CLASS_MAPPINGS["FluxGuidance"].execute(positive, 3.5)
        positive = out[0] if isinstance(out, tuple) else out.result[0]
    latent = comfy_host.nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    samples = comfy_host.nodes.KSampler().sample(model, seed=0, steps=2, cfg=1.0 if name == "flux" else 2.0,
                                                 sampler_name="euler", scheduler="simple", positive=positive,
                                                 negative=negative, latent_image=latent, denoise=1.0)[0]["samples"]
    assert tuple(samples.shape) == (1, 16, 8, 8) and torch.isfinite(samples).all()


def test_latent_optimizer_still_refuses_joint_models(comfy_host, family):
    name, model, clip = family
    mod = rcd_nodes(comfy_host)
    positive = refine(comfy_host, clip)
    sampler = mod.RCDSampler(comfy_host.nodes.NODE_CLASS_MAPPINGS["KSamplerSelect"].execute("euler").result[0],
                             mod.build_options(t_f=1))
    with torch.inference_mode():
        guider = comfy_host.nodes.NODE_CLASS_MAPPINGS["CFGGuider"].execute(model, positive, encode(comfy_host, clip, ""),
                                                                          2.0).result[0]
        sigmas = comfy_host.nodes.NODE_CLASS_MAPPINGS["BasicScheduler"].execute(model, "simple", 2, 1.0).result[0]
        noise = comfy_host.nodes.NODE_CLASS_MAPPINGS["RandomNoise"].execute(0).result[0]
        latent = comfy_host.nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        with pytest.raises(ValueError, match="RCD Latent Optimizer supports SD1.5 .* and SDXL models; this model is"):
            comfy_host.nodes.NODE_CLASS_MAPPINGS["SamplerCustomAdvanced"].execute(noise, guider, sampler, sigmas, latent)


def test_t5_subject_glued_to_punctuation_is_a_clear_error(comfy_host):
    _, clip, _ = comfy_host.load_checkpoint(TINY_FLUX_CKPT)
    with pytest.raises(ValueError, match="t5xxl tokens: .*a white dog.*space"):
        refine(comfy_host, clip, prompt="a black kitten,a white dog", subjects="a white dog")


class _FakeClip:
    """A CLIP whose tokenizer answers like Flux.2's Mistral encoder (one 'mistral3_24b' key)."""

    cond_stage_model = torch.nn.Module()

    def tokenize(self, text):
        return {"mistral3_24b": [[(1, 1.0), (2, 1.0)]]}


def test_unsupported_text_encoder_is_refused_naming_the_supported_ones(comfy_host):
    with pytest.raises(ValueError, match=r"supports the text encoders of SD1.5 .*SDXL, SD3 / SD3.5 .*Flux.1 .*"
                                         r"has text encoders \['mistral3_24b'\]"):
        refine(comfy_host, _FakeClip())
