"""RCD nodes: Embedding Refiner (CONDITIONING with subject token spans) and Latent Optimizer
(a SAMPLER wrapping any KSAMPLER-based sampler, for SamplerCustomAdvanced / SamplerCustom).

The math lives in rcca_core.rcd (parse, refine, losses, distill, optimize); this module
translates ComfyUI's CLIP, guider and sampler objects."""

from __future__ import annotations

import contextlib
import uuid
from typing import Any, Callable

import comfy.samplers
import torch
from comfy_api.latest import io

from ..rcca_core.rcd.distill import TeacherCache, TeacherRecorder, assemble_teachers, fingerprint
from ..rcca_core.rcd.losses import RCDLossConfig
from ..rcca_core.rcd.optimize import (FD_BLOCKS, AttentionCapture, CaptureDone, LatentOptimizer, RCDError, RCDOptions,
                                      parse_thresholds, plan_layers)
from ..rcca_core.rcd.parse import MAX_SUBJECTS, PARSERS, SubjectError, parse_subjects
from ..rcca_core.rcd.refine import (RCD_PROMPT_KEY, RCD_SUBJECTS_KEY, check_alignment, join_parts, locate_subjects,
                                    offset_tokenizer, prompt_record, refine_embedding, shift_subjects, subject_records,
                                    word_ids, word_positions)
from . import types
from .families import JOINT_FAMILIES, encoder_family

SUPPORTED = "SD1.5 (incl. LCM / Hyper / Turbo variants) and SDXL"  # the Latent Optimizer's models
REFINER_SUPPORTED = f"{SUPPORTED}, SD3 / SD3.5 (CLIP-L + CLIP-G + T5-XXL) and Flux.1 (T5-XXL + CLIP-L)"
CLIP_END_TOKEN = 49407  # CLIP-L / CLIP-G end-of-text id, used when the tokenizer does not say
TEACHERS = TeacherCache(maxsize=8)  # shared by every RCD Latent Optimizer: teachers per prompt + seed + settings

# sampler functions RCD cannot drive: the latent steps must come before the model evaluation at
# sigma_i of the sampler's own latent, and that evaluation must be recognisable
_OWN_SCHEDULE = "chooses its own steps or evaluates the model on a rescaled copy of its latent"
UNSUPPORTED_SAMPLERS = {"sample_unipc": ("uni_pc", _OWN_SCHEDULE), "sample_unipc_bh2": ("uni_pc_bh2", _OWN_SCHEDULE),
                        "dpm_fast_function": ("dpm_fast", _OWN_SCHEDULE),
                        "dpm_adaptive_function": ("dpm_adaptive", _OWN_SCHEDULE)}
SUGGESTED = "euler, euler_ancestral, heun, dpm_2, dpmpp_2m, dpmpp_2s_ancestral, dpmpp_sde, lcm, ddim, ddpm"


# --------------------------------------------------------------------------- Embedding Refiner

def _subject_list(text: str) -> list[str] | None:
    parts = [p.strip() for p in (text or "").replace(";", "\n").replace(",", "\n").split("\n")]
    parts = [p for p in parts if p]
    return parts or None


_KEYS = {"sd3": {"l", "g", "t5xxl"}, "flux": {"l", "t5xxl"}}


class _Tokens:
    """Token ids of ComfyUI's tokenizer output: SD1 ('l') and SDXL ('g' + 'l') CLIPs, SD3
    ('l' + 'g' + 't5xxl') and Flux.1 ('l' + 't5xxl')."""

    def __init__(self, clip) -> None:
        self.clip = clip
        # the layout of the context the text encoder returns: 'sd3', 'flux' or 'clip' (SD1.5 / SDXL, and
        # anything else, which tokenize() then refuses by its tokenizer keys)
        family = encoder_family(clip)
        self.family = family if family in JOINT_FAMILIES else "clip"
        inner = getattr(clip, "tokenizer", None)
        sub = getattr(inner, "clip_l", None)
        self.end_token = int(getattr(sub, "end_token", None) or CLIP_END_TOKEN)
        self.t5 = getattr(inner, "t5xxl", None)

    def tokenize(self, text: str) -> dict:
        tokens = self.clip.tokenize(text)
        keys = set(tokens) if isinstance(tokens, dict) else set()
        keys_ok = keys == _KEYS[self.family] if self.family in _KEYS else "l" in keys and keys <= {"l", "g"}
        if not isinstance(tokens, dict) or not keys_ok:
            raise SubjectError(f"RCD Embedding Refiner supports the text encoders of {REFINER_SUPPORTED}; this CLIP "
                               f"({type(getattr(self.clip, 'cond_stage_model', None)).__name__}) has text encoders "
                               f"{sorted(keys) if isinstance(tokens, dict) else tokens!r}")
        for key, windows in tokens.items():
            for window in windows:
                for t in window:
                    if not isinstance(t[0], int):
                        raise SubjectError(f"RCD prompts must be plain text: {text!r} uses a textual embedding "
                                           "('embedding:' name); remove it")
                    if float(t[1]) != 1.0:
                        raise SubjectError(f"RCD prompts must be plain text: {text!r} uses ComfyUI's emphasis "
                                           "('(text:1.2)' or '(text)'), which changes token weights and positions; "
                                           "remove the parentheses")
        return tokens

    @staticmethod
    def windows(tokens: dict, key: str = "l") -> list[list[int]]:
        return [[int(t[0]) for t in window] for window in tokens[key]]

    def flat(self, tokens: dict, key: str) -> list[int]:
        return [i for window in self.windows(tokens, key) for i in window]

    def word_ids(self, text: str) -> list[int]:
        return word_ids(self.windows(self.tokenize(text)), self.end_token)

    def positions(self, tokens: dict) -> tuple[int, ...]:
        return word_positions(self.windows(tokens), self.end_token)

    # -- T5-XXL (SD3, Flux): sentencepiece, no start token, ends with </s>, one window
    @property
    def t5_end(self) -> int:
        return int(getattr(self.t5, "end_token", None) or 1)

    def t5_positions(self, tokens: dict) -> tuple[int, ...]:
        return word_positions(self.windows(tokens, "t5xxl"), self.t5_end, has_start=False)

    def t5_tokenizer(self, text: str, tokens: dict):
        """locate_subjects' tokenize for the T5 pieces of ``text`` (whose ComfyUI tokens are ``tokens``)."""
        hf = getattr(self.t5, "tokenizer", None)
        try:
            enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, TypeError, ValueError) as e:
            raise SubjectError(f"RCD Embedding Refiner needs character offsets from the T5 tokenizer to find the "
                               f"subjects' pieces; {type(hf).__name__} gives none ({e})") from e
        ids = list(enc["input_ids"])
        if ids != word_ids(self.windows(tokens, "t5xxl"), self.t5_end, has_start=False):
            raise SubjectError(f"the T5 tokens ComfyUI made of {text!r} differ from the T5 tokenizer's pieces; write "
                               "RCD prompts as plain text")
        return offset_tokenizer(text, ids, [tuple(o) for o in enc["offset_mapping"]])

    def parts(self) -> list[tuple[str, tuple[str, ...]]]:
        """(encoder name, tokenizer keys) of each part of the context, in context order: what
        SD3ClipModel / FluxClipModel concatenate (an SD3 CLIP loaded without CLIP-L and -G
        has no CLIP part, one without T5 no T5 part)."""
        model = self.clip.cond_stage_model
        if self.family == "flux":
            return [("t5xxl", ("t5xxl",))]
        out = []
        if getattr(model, "clip_l", None) is not None or getattr(model, "clip_g", None) is not None:
            out.append(("clip_l+clip_g", ("l", "g")))
        if getattr(model, "t5xxl", None) is not None:
            out.append(("t5xxl", ("t5xxl",)))
        return out

    def part_length(self, tokens: dict, keys: tuple[str, ...]) -> int:
        return min(len(self.flat(tokens, k)) for k in keys)  # SD3ClipModel cuts CLIP-L/G to the shorter


def _locate_joint(tok: _Tokens, parsed, full_tokens: dict, single_tokens: list[dict]):
    """Subjects' positions over every part of an SD3 / Flux context, the word positions and the
    parts' layout (for the records)."""
    parts, positions, layout = [], [], []
    offset, single_offsets = 0, [0] * len(parsed)
    for name, keys in tok.parts():
        if name == "t5xxl":
            full_pos = tok.t5_positions(full_tokens)
            tokenize = tok.t5_tokenizer(parsed.prompt, full_tokens)
            single = {s: tok.t5_positions(t) for s, t in zip(parsed, single_tokens)}
        else:
            full_pos, tokenize = tok.positions(full_tokens), tok.word_ids
            single = {s: tok.positions(t) for s, t in zip(parsed, single_tokens)}
        try:
            located = locate_subjects(parsed, tokenize, full_pos, lambda s: single[s])
            for key in keys:
                check_alignment(tok.flat(full_tokens, key), located, [tok.flat(t, key) for t in single_tokens])
        except SubjectError as e:
            hint = (" T5 cuts text into sentencepiece pieces: start each subject after a space and end it before a "
                    "space or punctuation" if name == "t5xxl" else "")
            raise SubjectError(f"{name} tokens: {e}{hint}") from e
        length = tok.part_length(full_tokens, keys)
        shifted = shift_subjects(located, offset, single_offsets)
        parts.append((name, shifted))
        positions += [offset + p for p in full_pos]
        layout.append({"encoder": name, "offset": offset, "length": length})
        offset += length
        single_offsets = [o + tok.part_length(t, keys) for o, t in zip(single_offsets, single_tokens)]
    if not parts:
        raise SubjectError("this SD3 CLIP has no text encoder loaded; RCD needs CLIP-L / CLIP-G or T5-XXL")
    return join_parts([p[1] for p in parts]), parts, tuple(positions), layout, offset, single_offsets


def refine_conditioning(clip, prompt: str, subjects: list[str] | None = None, parser: str = "rules",
                        lambda_t: float = 0.5) -> list:
    """The refined CONDITIONING of ``prompt`` (see RCDEmbeddingRefiner)."""
    if clip is None:
        raise RuntimeError("ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node your "
                           "checkpoint does not contain a valid clip or text encoder model.")
    if not 0.0 <= float(lambda_t) <= 1.0:
        raise SubjectError(f"lambda_T must be in [0, 1], got {lambda_t}")
    parsed = parse_subjects(prompt, subjects, parser)
    if len(parsed) == 0:
        raise SubjectError(f"no subject found in {parsed.prompt!r}; mark them as [subject] in the prompt or list them "
                           "in 'subjects' (RCD needs at least one, works best with 2.."
                           f"{MAX_SUBJECTS})")
    tok = _Tokens(clip)
    full_tokens = tok.tokenize(parsed.prompt)
    single_tokens = [tok.tokenize(s.text) for s in parsed]
    if tok.family == "clip":
        single_positions = {s: tok.positions(t) for s, t in zip(parsed, single_tokens)}
        positions = tok.positions(full_tokens)
        located = locate_subjects(parsed, tok.word_ids, positions, lambda s: single_positions[s])
        for key in full_tokens:
            check_alignment(tok.flat(full_tokens, key), located, [tok.flat(t, key) for t in single_tokens])
        parts, layout, lengths = None, None, None
    else:
        located, parts, positions, layout, full_len, single_lens = _locate_joint(tok, parsed, full_tokens,
                                                                                 single_tokens)
        lengths = [full_len] + single_lens

    full = clip.encode_from_tokens_scheduled(full_tokens)
    singles = [clip.encode_from_tokens_scheduled(t) for t in single_tokens]
    out = []
    for e, (cond, extra) in enumerate(full):
        pick = [s[min(e, len(s) - 1)] for s in singles]  # same clip hook schedule for every encoding
        s_conds = [p[0] for p in pick]
        s_pooled = [p[1].get("pooled_output") for p in pick]
        if lengths is not None:
            # the positions are only right if the context is the parts laid end to end
            got = [cond.shape[1]] + [c.shape[1] for c in s_conds]
            if got != lengths:
                raise SubjectError(f"RCD Embedding Refiner: the {tok.family} text encoder returned contexts of "
                                   f"{got} tokens where its tokens make {lengths} ({layout}); unsupported encoder "
                                   "setup")
        d = dict(extra)
        d[RCD_SUBJECTS_KEY] = subject_records(located, s_conds, s_pooled, parts)
        d[RCD_PROMPT_KEY] = prompt_record(parsed.prompt, positions, lambda_t, None if layout is None else tok.family,
                                          layout)
        out.append([refine_embedding(cond, s_conds, located, lambda_t), d])
    return out


class RCDEmbeddingRefiner(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RCDEmbeddingRefiner",
            display_name="RCD Embedding Refiner",
            category=types.CATEGORY,
            description="RCD (Refine-Control-Distill), refine: every subject token's embedding becomes "
                        "lambda_T x (its embedding in the prompt) + (1 - lambda_T) x (its embedding when the subject "
                        "is encoded alone), in every text encoder's part of the context the model reads: CLIP tokens "
                        "(SD1.5, SDXL), CLIP-L/G and T5 tokens (SD3 / SD3.5), T5 tokens (Flux.1; its CLIP-L pooled "
                        "vector stays the prompt's). The CONDITIONING carries the subjects' token spans for RCD Latent "
                        f"Optimizer (SD1.5 / SDXL only). Supports {REFINER_SUPPORTED}.",
            inputs=[
                io.Clip.Input("clip", tooltip=f"The text encoder(s) of {REFINER_SUPPORTED}."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="Plain text naming the subjects, e.g. 'a black kitten and a white dog on a red "
                                        "couch'. Mark subjects yourself with [brackets] if the parser gets them wrong. "
                                        "No '(text:1.2)' emphasis or 'embedding:' names. With T5 (SD3, Flux) put "
                                        "spaces around subjects ('kitten,a dog' cuts 'a' into other pieces)."),
                io.String.Input("subjects", default="", optional=True,
                                tooltip="Empty: [bracketed] phrases of the prompt, else the parser. Otherwise the subject "
                                        f"phrases, separated by commas or new lines (at most {MAX_SUBJECTS}); each must "
                                        "occur in the prompt."),
                io.Combo.Input("parser", options=list(PARSERS), default="rules", optional=True,
                               tooltip="rules: offline rule-based parser (split at and / with / commas / prepositions; "
                                       "the noun is the phrase's last word); spacy: spaCy noun chunks (needs spaCy and "
                                       "en_core_web_sm installed); auto: spaCy when installed, else rules."),
                io.Float.Input("lambda_t", default=0.5, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="1 keeps the prompt's embeddings, 0 replaces subject tokens by the single-subject "
                                       "ones; the paper uses about 0.5."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, clip, prompt, subjects="", parser="rules", lambda_t=0.5) -> io.NodeOutput:
        return io.NodeOutput(refine_conditioning(clip, prompt, _subject_list(subjects), parser, lambda_t))


# --------------------------------------------------------------------------- Latent Optimizer

def check_supported_model(base_model) -> None:
    import comfy.supported_models as sm

    config = getattr(base_model, "model_config", None)
    if not isinstance(config, (sm.SD15, sm.SDXL)):
        raise RCDError(f"RCD Latent Optimizer supports {SUPPORTED} models; this model is "
                       f"{type(config).__name__}")


def _signature(obj: Any, depth: int = 0) -> Any:
    """A fingerprintable stand-in for model options and cond entries: values for data, identities
    for callables and objects (their state cannot be hashed)."""
    if depth > 8:
        return "..."
    if isinstance(obj, (str, int, float, bool, type(None), torch.Tensor)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _signature(v, depth + 1) for k, v in obj.items() if k not in ("uuid", "model_conds")}
    if isinstance(obj, (list, tuple)):
        return [_signature(v, depth + 1) for v in obj]
    owner = getattr(obj, "__self__", None)
    if owner is not None:
        return ("method", getattr(obj, "__qualname__", "?"), id(owner))
    return (type(obj).__qualname__, getattr(obj, "__qualname__", ""), id(obj))


_MISSING = object()


def _same(t):
    return t


@contextlib.contextmanager
def weights_for_grad(modules: list | None):
    """Make ComfyUI's layers use ordinary copies of inference-mode weights for one forward.

    Weights loaded while ComfyUI runs a node are inference tensors, which autograd cannot save
    for backward. ComfyUI's cast layers copy a weight whenever their weight_function list is not
    empty, so an identity function is appended for the duration (instance attributes, restored
    after; nothing else changes)."""
    if not modules:
        yield
        return
    saved = []
    try:
        for m in modules:
            saved.append((m, m.__dict__.get("weight_function", _MISSING), m.__dict__.get("bias_function", _MISSING)))
            if getattr(m, "weight", None) is not None and m.weight.is_inference():
                m.weight_function = list(m.weight_function) + [_same]
            if getattr(m, "bias", None) is not None and m.bias.is_inference():
                m.bias_function = list(m.bias_function) + [_same]
        yield
    finally:
        for m, w, b in saved:
            for name, value in (("weight_function", w), ("bias_function", b)):
                if value is _MISSING:
                    m.__dict__.pop(name, None)
                else:
                    setattr(m, name, value)


def _inference_weight_modules(unet: torch.nn.Module) -> list:
    out = []
    for m in unet.modules():
        if not hasattr(m, "weight_function") or not hasattr(m, "bias_function"):
            continue
        w, b = getattr(m, "weight", None), getattr(m, "bias", None)
        if (isinstance(w, torch.Tensor) and w.is_inference()) or (isinstance(b, torch.Tensor) and b.is_inference()):
            out.append(m)
    return out


class _ModelProxy:
    """Stands in for the sampler's model (KSamplerX0Inpaint): same attributes, a hook before each call."""

    def __init__(self, model, before: Callable | None, after: Callable | None = None,
                 call: Callable | None = None) -> None:
        self._model = model
        self._before = before
        self._after = after
        self._call = call or model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, x, sigma, **kwargs):
        if self._before is not None:
            self._before(x, sigma, kwargs)
        try:
            return self._call(x, sigma, **kwargs)
        finally:
            if self._after is not None:
                self._after()


class RCDSampler(comfy.samplers.KSAMPLER):
    """What RCD Latent Optimizer returns: a KSAMPLER whose sampler function runs the base
    sampler's function with RCD's latent steps before the first model evaluation of each of
    the first t_f steps (with distillation, the teacher runs come first). ``rcd.last_run``
    holds the latest run's records (loss terms per step, teacher cache hit or miss)."""

    def __init__(self, base, options: RCDOptions, cache: TeacherCache = TEACHERS) -> None:
        fn = getattr(base, "sampler_function", None)
        if not isinstance(base, comfy.samplers.KSAMPLER) or fn is None:
            raise RCDError(f"RCD Latent Optimizer wraps ComfyUI's KSAMPLER samplers (KSamplerSelect, "
                           f"SamplerEulerAncestral, ...); got {type(base).__name__}")
        name = getattr(fn, "__name__", "")
        if name in UNSUPPORTED_SAMPLERS:
            label, why = UNSUPPORTED_SAMPLERS[name]
            raise RCDError(f"RCD Latent Optimizer cannot drive '{label}': it {why}. Use {SUGGESTED} or another "
                           "k-diffusion sampler")
        self.rcd = RCDRunner(fn, options, cache)
        self.base_sampler = base
        super().__init__(self.rcd, dict(base.extra_options), dict(base.inpaint_options))


class RCDRunner:
    """The sampler function of an RCDSampler; ``last_run`` keeps the latest run's records."""

    def __init__(self, base_fn: Callable, options: RCDOptions, cache: TeacherCache) -> None:
        self.base_fn = base_fn
        self.options = options
        self.cache = cache
        self.last_run: RCDRun | None = None
        self.__name__ = f"rcd_{getattr(base_fn, '__name__', 'sampler')}"

    def __call__(self, model, noise, sigmas, extra_args=None, callback=None, disable=None, **kwargs):
        run = RCDRun(self, model, sigmas, extra_args if extra_args is not None else {}, kwargs)
        self.last_run = run
        try:
            return run.sample(noise, callback, disable)
        finally:
            run.release()


class RCDRun:
    """One sampling run with RCD."""

    def __init__(self, runner: RCDRunner, model, sigmas, extra_args: dict, kwargs: dict) -> None:
        self.runner = runner
        self.model = model
        self.sigmas = sigmas
        self.extra_args = extra_args
        self.kwargs = kwargs
        self.options = runner.options
        self.teacher_status = "off"
        self.teacher_batched = False
        self.optimizer: LatentOptimizer | None = None
        self._evals = 0  # model evaluations so far in the student run
        self._eval_step: dict[int, int] = {}  # evaluation index -> sampler step it opens (see _eval_plan)
        self._done: set[int] = set()
        self._expect: tuple[int, torch.Tensor] | None = None
        self._options_cache: tuple[int, dict] | None = None

    def release(self) -> None:
        """Drop what belongs to the sampling call (model, guider, conds), keep the records."""
        for name in ("model", "guider", "entry", "extra_args", "kwargs", "capture", "sigmas", "unet", "grad_modules",
                     "subjects", "_options_cache", "_expect"):
            if name in self.__dict__:
                setattr(self, name, None)

    @property
    def records(self) -> list[dict]:
        return self.optimizer.records if self.optimizer is not None else []

    def _base(self, model, x, sigmas, extra_args, callback, disable):
        return self.runner.base_fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                   **self.kwargs)

    # -- setup ----------------------------------------------------------------------------
    def sample(self, x, callback, disable):
        o = self.options
        steps = len(self.sigmas) - 1
        t_f = min(o.t_f, steps)
        if t_f != o.t_f:
            o = self.options = o.with_(t_f=t_f)
        steps_on = o.k > 0 or any(s < t_f for s, _ in o.refine)
        if t_f == 0 or not steps_on or not (o.distill or (o.delta > 0 and o.t_a > 0)):
            # nothing to optimise: exactly the base sampler's run
            return self._base(self.model, x, self.sigmas, self.extra_args, callback, disable)

        guider = self.model.inner_model
        self.guider = guider
        self.entry = _rcd_entry(guider)
        base_model = guider.inner_model
        check_supported_model(base_model)
        if self.entry[RCD_PROMPT_KEY].get("family") is not None:
            # positions of a joint (SD3 / Flux) context; an SD1.5 / SDXL UNet reads other tokens
            raise RCDError(f"RCD Latent Optimizer: the conditioning was refined for "
                           f"{self.entry[RCD_PROMPT_KEY]['family']} text encoders; the optimizer supports {SUPPORTED} "
                           "(connect an RCD Embedding Refiner fed by this model's own CLIP)")
        self.unet = base_model.diffusion_model
        self.plan = plan_layers(self.unet, o.attention_level, o.fd_blocks)
        self.subjects = self.entry[RCD_SUBJECTS_KEY]
        prompt = self.entry[RCD_PROMPT_KEY]
        self.word_positions = list(prompt["word_positions"])
        columns = [self.word_positions.index(s["noun_index"]) for s in self.subjects]
        self.grad_modules = _inference_weight_modules(self.unet)

        teacher = self._teachers(x) if o.distill and self.plan.feature_blocks else None
        self._eval_step = self._eval_plan(x, self.sigmas, o.t_f)
        self.optimizer = LatentOptimizer(o, teacher)
        self.capture = AttentionCapture(self.plan)
        self.capture.configure(self.word_positions, columns, o.temperature)
        student = _ModelProxy(self.model, self._before_eval)
        return self._base(student, x, self.sigmas, self.extra_args, self._callback(callback), disable)

    def _eval_plan(self, x, sigmas, t_f: int) -> dict[int, int]:
        """Which model evaluation opens each of the first t_f steps: a dry run of the base sampler
        with a free stand-in model (denoised = x) counts evaluations between step callbacks.

        k-diffusion samplers call the step callback right after the evaluation at the step's own
        latent, so step i's evaluation is the last one before callback i. A two-stage sampler
        (heun, dpm_2, dpmpp_2s_ancestral, dpmpp_sde, ...) evaluates a temporary latent between
        callbacks, sometimes at exactly the next step's sigma; counting tells them apart where
        sigmas cannot."""
        marks: dict[int, int] = {}
        self._dry_run(x, sigmas, dict(self.extra_args), marks)
        return {n: i for i, n in marks.items() if i < t_f and n >= 0}

    def _dry_run(self, x, sigmas, extra_args: dict, marks: dict | None):
        """The base sampler with a model that costs nothing (denoised = x); the global RNG is left as it was."""
        count = {"n": 0}

        def fake(xt, sigma, **kwargs):
            count["n"] += 1
            return xt.clone()

        def callback(d):
            if marks is not None:
                marks.setdefault(int(d["i"]), count["n"] - 1)

        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            return self._base(_ModelProxy(self.model, None, call=fake), x.clone(), sigmas, extra_args, callback, True)

    def _callback(self, callback):
        name = getattr(self.runner.base_fn, "__name__", "?")

        def cb(d):
            i = int(d.get("i", -1))
            if self._expect is not None and self._expect[0] == i:
                seen = d.get("x")
                if isinstance(seen, torch.Tensor) and seen.data_ptr() != self._expect[1].data_ptr():
                    raise RCDError(f"the base sampler ({name}) did not evaluate the model on its own latent, so RCD's "
                                   f"latent steps would be lost; use {SUGGESTED}")
                self._expect = None
            if 0 <= i < self.options.t_f and i not in self._done and self.optimizer.active(i):
                raise RCDError(f"the base sampler ({name}) did not make the model evaluations its dry run predicted "
                               f"(step {i}); RCD could not optimise the latent there; use {SUGGESTED}")
            if callback is not None:
                callback(d)
        return cb

    # -- student --------------------------------------------------------------------------
    def _before_eval(self, x, sigma, kwargs) -> None:
        n, self._evals = self._evals, self._evals + 1
        i = self._eval_step.get(n)
        if i is None or i in self._done:
            return
        self._done.add(i)
        options = self._capture_options(kwargs.get("model_options", {}))
        mask = kwargs.get("denoise_mask")

        def forward(x_opt, sig):
            return self._forward(x_opt, sig, options, mask)

        if self.optimizer.step(i, x, sigma, forward):
            self._expect = (i, x)

    def _capture_options(self, model_options: dict) -> dict:
        import comfy.model_patcher

        if self._options_cache is not None and self._options_cache[0] == id(model_options):
            return self._options_cache[1]
        options = comfy.model_patcher.create_model_options_clone(model_options)
        self.capture.previous_override = None
        self.capture.install(options)
        self._options_cache = (id(model_options), options)
        return options

    def _forward(self, x_opt, sig, model_options, denoise_mask):
        import comfy.samplers

        x_in = x_opt
        if denoise_mask is not None:
            with torch.no_grad():
                known = self.guider.inner_model.scale_latent_inpaint(x=x_opt.detach(), sigma=sig, noise=self.model.noise,
                                                                     latent_image=self.model.latent_image)
            x_in = x_opt * denoise_mask + _plain(known) * (1.0 - _plain(denoise_mask))
        self.capture.start(early_exit=self.options.early_exit)
        try:
            with weights_for_grad(self.grad_modules if torch.is_grad_enabled() else None):
                comfy.samplers.calc_cond_batch(self.guider.inner_model, [[self.entry]], x_in, sig, model_options)
        except CaptureDone:
            pass
        except RuntimeError as e:
            if "Inference tensors cannot be saved for backward" in str(e):
                raise RCDError("RCD: a layer of this model keeps inference-mode weights outside ComfyUI's cast layers, "
                               "so gradients cannot flow through it; please report the model type") from e
            raise
        finally:
            self.capture.stop()
        return self.capture.result()

    # -- teachers -------------------------------------------------------------------------
    def _teachers(self, x):
        o = self.options
        sigmas = self.sigmas[: o.t_f + 1]
        key = self._teacher_key(x, sigmas)
        hit = self.runner.cache.get(key)
        if hit is not None:
            self.teacher_status = "hit"
            return hit
        if self._can_batch_teachers(x, sigmas):
            recorders = self._teacher_run(self.subjects, x, sigmas)
            self.teacher_batched = True
        else:
            recorders = [r for s in self.subjects for r in self._teacher_run([s], x, sigmas)]
        teacher = assemble_teachers(recorders)
        self.runner.cache.put(key, teacher)
        self.teacher_status = "miss"
        return teacher

    def _can_batch_teachers(self, x, sigmas) -> bool:
        """All subjects' teachers in one batched run when that changes nothing but speed: a
        deterministic sampler (two dry runs with different seeds agree; a stochastic one would
        draw other noise for a bigger batch than the student's), no inpainting mask, and
        single-subject prompts of one length."""
        if len(self.subjects) < 2 or self.extra_args.get("denoise_mask") is not None:
            return False
        if len({tuple(s["cond"].shape[1:]) for s in self.subjects}) != 1:
            return False
        if len({s.get("pooled_output") is None for s in self.subjects}) != 1:
            return False
        seed = self.extra_args.get("seed")
        outs = []
        for sd in (seed if seed is not None else 0, (seed if seed is not None else 0) + 1):
            extra_args = dict(self.extra_args)
            extra_args["seed"] = sd
            outs.append(self._dry_run(x, sigmas, extra_args, None))
        return torch.equal(outs[0], outs[1])

    def _teacher_key(self, x, sigmas) -> str:
        o = self.options
        patcher = getattr(self.guider, "model_patcher", None)
        others = {k: [_signature(e) for e in v] for k, v in self.guider.conds.items() if k != "positive"}
        entry = {k: v for k, v in self.entry.items() if k not in ("cross_attn", "model_conds", "uuid", RCD_SUBJECTS_KEY,
                                                                 RCD_PROMPT_KEY)}
        return fingerprint(
            "rcd-teacher-1", id(getattr(patcher, "model", None)), getattr(patcher, "patches_uuid", None),
            _signature(self.extra_args.get("model_options", {})),
            [(s["cond"], s.get("pooled_output"), s["single_indices"], s["single_noun_index"]) for s in self.subjects],
            _signature(entry), others, x, getattr(self.model, "latent_image", None), self.extra_args.get("denoise_mask"),
            sigmas, repr(getattr(self.guider, "cfg", None)), type(self.guider).__qualname__,
            getattr(self.runner.base_fn, "__module__", ""), getattr(self.runner.base_fn, "__qualname__", ""),
            _signature(self.kwargs), self.extra_args.get("seed"),
            sorted(self.plan.map_layers), sorted(self.plan.feature_blocks), o.temperature, repr(o.loss),
        )

    def _teacher_entry(self, subjects: list[dict], x) -> dict:
        """The positive cond entry of a teacher run: the student's entry with the single-subject
        prompt(s) as cross-attention (one per row block when several subjects share a run)."""
        import comfy.samplers

        e = {k: v for k, v in self.entry.items() if k not in (RCD_SUBJECTS_KEY, RCD_PROMPT_KEY)}
        b = x.shape[0] // len(subjects)
        e["cross_attn"] = torch.cat([s["cond"].expand(b, -1, -1) if s["cond"].shape[0] == 1 else s["cond"]
                                     for s in subjects])
        if all(s.get("pooled_output") is not None for s in subjects):
            e["pooled_output"] = torch.cat([s["pooled_output"].expand(b, -1) if s["pooled_output"].shape[0] == 1
                                            else s["pooled_output"] for s in subjects])
        e["model_conds"] = dict(self.entry.get("model_conds", {}))
        e["uuid"] = uuid.uuid4()
        return comfy.samplers.encode_model_conds(
            self.guider.inner_model.extra_conds, [e], x, x.device, "positive",
            latent_image=getattr(self.model, "latent_image", None), denoise_mask=self.extra_args.get("denoise_mask"),
            seed=self.extra_args.get("seed"))[0]

    def _teacher_run(self, subjects: list[dict], x, sigmas) -> list[TeacherRecorder]:
        """Sample the single-subject prompts of ``subjects`` (batched when several) from the
        student's start latent for t_f steps, recording each one's pooled features."""
        import comfy.model_patcher

        o = self.options
        b = x.shape[0]
        xt = x.repeat(len(subjects), *([1] * (x.ndim - 1))) if len(subjects) > 1 else x.clone()
        rows = []
        for s in subjects:
            positions = list(s["single_indices"])
            rows += [(positions, [positions.index(s["single_noun_index"])])] * b
        capture = AttentionCapture(self.plan)
        capture.configure_rows(rows, o.temperature)
        options = comfy.model_patcher.create_model_options_clone(self.extra_args.get("model_options", {}))
        capture.install(options)
        extra_args = dict(self.extra_args)
        extra_args["model_options"] = options
        recorders = [TeacherRecorder(o.loss) for _ in subjects]
        plan = self._eval_plan(xt, sigmas, o.t_f)
        state = {"n": 0, "step": None}

        def before(x_, sigma, kwargs):
            state["step"] = plan.get(state["n"])
            state["n"] += 1
            if state["step"] is not None:
                capture.start(early_exit=False)

        def after():
            if state["step"] is not None:
                maps, features = capture.result()
                for g, recorder in enumerate(recorders):
                    rows_g = slice(g * b, (g + 1) * b)
                    recorder.record(state["step"], None if maps is None else maps[rows_g],
                                    {k: f[rows_g] for k, f in features.items()})
                state["step"] = None

        entry = self._teacher_entry(subjects, xt)
        saved = self.guider.conds
        self.guider.conds = dict(saved)
        self.guider.conds["positive"] = [entry]
        try:
            devices = [x.device] if x.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # the student's run draws the same global noise
                self._base(_ModelProxy(self.model, before, after), xt, sigmas, extra_args, None, True)
        finally:
            self.guider.conds = saved
            capture.stop()
        return recorders


def _plain(t):
    return t.clone() if isinstance(t, torch.Tensor) and t.is_inference() and torch.is_grad_enabled() else t


def _rcd_entry(guider) -> dict:
    conds = getattr(guider, "conds", None)
    if not isinstance(conds, dict) or "positive" not in conds:
        raise RCDError(f"RCD Latent Optimizer needs a guider with a positive conditioning (CFGGuider, BasicGuider); "
                       f"got {type(guider).__name__}")
    for entry in conds["positive"] or ():
        if entry.get(RCD_SUBJECTS_KEY):
            if RCD_PROMPT_KEY not in entry:
                break
            return entry
    raise RCDError("RCD Latent Optimizer: the guider's positive conditioning has no RCD subjects; connect the "
                   "RCD Embedding Refiner's CONDITIONING to the guider's positive input")


def build_options(t_f=25, t_a=15, k=1, step_size=10.0, delta=1.5, distill=True, refine_thresholds="",
                  max_refine_iters=20, lambda_rae=0.3, lambda_rcr=0.5, lambda_rc=0.5, delta_rc=0.25, attention_level=2,
                  fd_blocks="attention_level", **extra) -> RCDOptions:
    try:
        loss = RCDLossConfig(lambda_rae=lambda_rae, lambda_rcr=lambda_rcr, lambda_rc=lambda_rc, delta_rc=delta_rc)
    except ValueError as e:
        raise RCDError(str(e)) from e
    return RCDOptions(t_f=int(t_f), t_a=int(t_a), k=int(k), step_size=float(step_size), delta=float(delta),
                      distill=bool(distill), refine=parse_thresholds(refine_thresholds),
                      max_refine_iters=int(max_refine_iters), loss=loss, attention_level=int(attention_level),
                      fd_blocks=fd_blocks, **extra)


class RCDLatentOptimizer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RCDLatentOptimizer",
            display_name="RCD Latent Optimizer",
            category=types.CATEGORY,
            description="RCD (Refine-Control-Distill), control + distill: wraps a SAMPLER for SamplerCustomAdvanced. "
                        "During the first t_f steps it takes k gradient steps on the latent of "
                        "L_FD + delta x (L_RAE + L_RCR + L_RC), with attention maps of the subjects and features of "
                        "single-subject teacher runs (same noise, cached). The guider's positive must come from "
                        f"RCD Embedding Refiner. {SUPPORTED}.",
            inputs=[
                io.Sampler.Input("sampler", tooltip="The base sampler (KSamplerSelect, SamplerEulerAncestral, ...)."),
                io.Int.Input("t_f", default=25, min=0, max=10000,
                             tooltip="Optimise the latent during the first t_f steps (paper: 25 of 50)."),
                io.Int.Input("t_a", default=15, min=0, max=10000,
                             tooltip="Attention control before step t_A, feature distillation only from t_A to t_f."),
                io.Int.Input("k", default=1, min=0, max=100,
                             tooltip="Gradient steps per optimised step. 0 turns RCD off (the base sampler's output)."),
                io.Float.Input("step_size", default=10.0, min=0.0, max=10000.0, step=0.1,
                               tooltip="s in the DDPM latent scale (paper: 10); applied as s x (1 + sigma^2) to "
                                       "ComfyUI's latent."),
                io.Float.Input("delta", default=1.5, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of the attention-control loss before t_A."),
                io.Boolean.Input("distill", default=True,
                                 tooltip="Feature distillation from single-subject teacher runs (one extra sampling run "
                                         "of t_f steps per subject, cached per prompt, seed and settings)."),
                io.String.Input("refine_thresholds", default="", optional=True,
                                tooltip="Attend-and-Excite-style iterative refinement: 'step:threshold' pairs such as "
                                        "'0:0.05, 10:0.5, 20:0.8'; at those steps, keep stepping until every subject's "
                                        "attention peaks at the threshold (or max_refine_iters). Empty: off."),
                io.Int.Input("max_refine_iters", default=20, min=0, max=200, optional=True),
                io.Float.Input("lambda_rae", default=0.3, min=0.01, max=1.0, step=0.01, optional=True),
                io.Float.Input("lambda_rcr", default=0.5, min=0.01, max=1.0, step=0.01, optional=True),
                io.Float.Input("lambda_rc", default=0.5, min=0.01, max=1.0, step=0.01, optional=True),
                io.Float.Input("delta_rc", default=0.25, min=0.0, max=0.99, step=0.01, optional=True),
                io.Int.Input("attention_level", default=2, min=0, max=4, optional=True,
                             tooltip="Resolution of the attention maps, in downsamplings of the latent: 2 = 1/4 "
                                     "(16 x 16 for SD1.5 at 512 px, 32 x 32 for SDXL at 1024 px)."),
                io.Combo.Input("fd_blocks", options=list(FD_BLOCKS), default="attention_level", optional=True,
                               tooltip="Down-block transformer outputs to distil: those at the attention maps' level, "
                                       "or every down block with a transformer."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, sampler, t_f, t_a, k, step_size, delta, distill, refine_thresholds="", max_refine_iters=20,
                lambda_rae=0.3, lambda_rcr=0.5, lambda_rc=0.5, delta_rc=0.25, attention_level=2,
                fd_blocks="attention_level") -> io.NodeOutput:
        options = build_options(t_f, t_a, k, step_size, delta, distill, refine_thresholds, max_refine_iters,
                                lambda_rae, lambda_rcr, lambda_rc, delta_rc, attention_level, fd_blocks)
        return io.NodeOutput(RCDSampler(sampler, options))
