"""Question: does jvpgraph give the right Jv across the Hugging Face transformers zoo, with sdpa and eager
attention, where torch.func.jvp does not?

For each architecture (decoder LLMs, encoders, encoder-decoders, vision and speech models), built from a tiny
config with random weights (2 layers, hidden 32, vocabulary 100; nothing is downloaded), for each attention
implementation the model takes (``sdpa``, ``eager``): eval mode, batch 2, float32, the tangent on the input that
carries real numbers (``inputs_embeds`` (2, 6, E) for text, the same tensor as ``decoder_inputs_embeds`` for an
encoder-decoder; ``pixel_values`` (2, 3, 32, 32); ``input_values`` (2, 1600); Whisper's encoder
``input_features`` (2, 8, 32)). The output: ``logits`` where the model has a head (``*ForCausalLM``,
``*ForConditionalGeneration``), else ``last_hidden_state``. For the decoders, one more row in train mode with
every dropout of the config at 0.1 (the same seed on both sides: the same masks).

Each case: ``jvpgraph.jvp(f, (x,), (v,))`` against double-backward (:func:`jvpgraph.testing.double_backward`, on
the math SDPA kernel), tolerance 1e-4 relative in float32; a miss is redone in float64 (tolerance 1e-9) to tell
rounding from a wrong answer. Also: whether ``torch.func.jvp`` runs and its error against the same reference; the
Jv on a second batch (the cached trace) against double-backward, and the time of each (median of 3); the first
call's time (trace, flip, first Jv); the ops jvpgraph had no rule for (fallbacks); whether the model is left as it
was (:class:`jvpgraph.testing.ModelState`). Parameters initialized to all zeros (biases, LayerNorm shifts, Gemma's
norm weights, some heads) are redrawn from N(0, 0.02^2) so that no Jv is vacuously 0; the rows say how many.

Each case runs in its own process (a crash or a hang is a row, not the end of the sweep); the report is
rewritten after each. Writes benchmarks/results/zoo_transformers.json and .md.

    HF_HUB_OFFLINE=1 python benchmarks/zoo_transformers.py               # every architecture
    HF_HUB_OFFLINE=1 python benchmarks/zoo_transformers.py llama bert    # some
    python benchmarks/zoo_transformers.py --one llama sdpa eval          # one case, its row as JSON
    python benchmarks/zoo_transformers.py --report-only                  # the .md again from the .json
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import jvpgraph  # noqa: E402
from jvpgraph import testing  # noqa: E402
from jvpgraph.experiments.ecosystem import HF_SMALL  # noqa: E402
from jvpgraph.measure import timeit  # noqa: E402

TOL = 1e-4  # float32 relative (max|Jv - ref| / max|ref|)
TOL64 = 1e-9  # float64, for the cases float32 misses
REPEAT = 3  # timed calls (median)
TIMEOUT_S = 300  # per case (one process)
B, L, AUDIO = 2, 6, 1600
DROPOUT = 0.1  # train rows: every dropout probability the config has
FALLBACKS = ("decomposition", "flipped-vjp", "forward-ad")
NO_SDPA = "does not support an attention implementation through torch.nn.functional.scaled_dot_product_attention"

# model_type -> (category, config overrides on top of HF_SMALL)
ARCHS: dict[str, tuple[str, dict]] = {
    # decoders (AutoModelForCausalLM, logits)
    "gpt2": ("decoder", {}),
    "gpt_neo": ("decoder", dict(attention_types=[[["global", "local"], 1]], window_size=4)),  # local window < 6
    "gptj": ("decoder", dict(rotary_dim=4)),
    "gpt_neox": ("decoder", {}),
    "llama": ("decoder", {}),
    "mistral": ("decoder", dict(sliding_window=4)),
    "mixtral": ("decoder", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "qwen2": ("decoder", {}),
    "qwen2_moe": ("decoder", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                  shared_expert_intermediate_size=64, decoder_sparse_step=1)),
    "qwen3": ("decoder", {}),
    "qwen3_moe": ("decoder", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                  decoder_sparse_step=1)),
    "gemma": ("decoder", {}),
    "gemma2": ("decoder", dict(sliding_window=4, query_pre_attn_scalar=8)),
    "phi": ("decoder", {}),
    "phi3": ("decoder", dict(original_max_position_embeddings=64)),
    "falcon": ("decoder", {}),
    "opt": ("decoder", dict(ffn_dim=64, word_embed_proj_dim=32)),
    "bloom": ("decoder", {}),
    "stablelm": ("decoder", {}),
    "olmo": ("decoder", {}),
    "olmo2": ("decoder", {}),
    "starcoder2": ("decoder", {}),
    "cohere": ("decoder", {}),
    # encoders (AutoModel, last_hidden_state)
    "bert": ("encoder", {}),
    "roberta": ("encoder", {}),
    "distilbert": ("encoder", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64)),
    "albert": ("encoder", dict(embedding_size=16)),
    "electra": ("encoder", dict(embedding_size=16)),
    "deberta-v2": ("encoder", dict(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
                                   max_relative_positions=-1, norm_rel_ebd="layer_norm", share_att_key=True)),
    "xlm-roberta": ("encoder", {}),
    "mpnet": ("encoder", {}),  # its position bias reads 32 buckets whatever the config says
    # encoder-decoders (AutoModelForSeq2SeqLM, logits; inputs_embeds = decoder_inputs_embeds = x)
    "t5": ("encoder-decoder", dict(relative_attention_num_buckets=16, decoder_start_token_id=0)),
    "bart": ("encoder-decoder", {}),
    "marian": ("encoder-decoder", dict(decoder_start_token_id=0)),
    "pegasus": ("encoder-decoder", {}),
    "mbart": ("encoder-decoder", {}),
    # vision (AutoModel, last_hidden_state)
    "vit": ("vision", {}),
    "deit": ("vision", {}),
    "swin": ("vision", dict(embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, patch_size=4)),
    "convnext": ("vision", dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], patch_size=4)),
    "beit": ("vision", dict(use_relative_position_bias=True)),
    "dinov2": ("vision", {}),
    "clip_vision_model": ("vision", {}),
    "segformer": ("vision", dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                 patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                                 decoder_hidden_size=16)),
    # speech (AutoModel, last_hidden_state)
    "wav2vec2": ("audio", {}),
    "hubert": ("audio", {}),
    "wavlm": ("audio", dict(num_buckets=32, max_bucket_distance=64)),
    "whisper": ("audio", dict(num_mel_bins=8, max_source_positions=16, max_target_positions=64,
                              decoder_start_token_id=0)),
}
ATTENTION = ("sdpa", "eager")
DROPOUT_KEYS = ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop",
                "embd_pdrop", "embed_dropout", "resid_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob",
                "residual_dropout", "embedding_dropout", "summary_first_dropout", "classifier_dropout")


class Call(nn.Module):
    """``model(**{name: x for name in names}, **kw)`` as a module of one tensor: its ``logits``, else its first
    tensor (``last_hidden_state``)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], **kw):
        super().__init__()
        self.model, self.names, self.kw = model, names, kw

    def forward(self, x):
        out = self.model(**{n: x for n in self.names}, **self.kw, return_dict=True)
        return out.logits if "logits" in out else out[0]


def config(model_type: str, train: bool = False):
    """The tiny config: the :data:`HF_SMALL` sizes the config class takes, pad/bos/eos ids inside the vocabulary,
    the overrides of :data:`ARCHS`; ``train``: every dropout probability at :data:`DROPOUT`."""
    import transformers as T

    cls = T.CONFIG_MAPPING[model_type]
    keys = set(inspect.signature(cls.__init__).parameters) | set(getattr(cls, "attribute_map", {}))
    kw = {k: v for k, v in HF_SMALL.items() if k in keys}
    kw.update({k: i for i, k in enumerate(("pad_token_id", "bos_token_id", "eos_token_id")) if k in keys})
    kw.update(ARCHS[model_type][1])
    cfg = T.AutoConfig.for_model(model_type, **kw)
    if train:
        for k in DROPOUT_KEYS:
            if isinstance(getattr(cfg, k, None), (int, float)) and not isinstance(getattr(cfg, k), bool):
                setattr(cfg, k, DROPOUT)
    return cfg


def build(model_type: str, attn: str, train: bool = False, dtype: torch.dtype = torch.float32):
    """``(f, shape, info)``: the model as a module of one tensor (seed 0; all-zero parameters redrawn), the input
    shape, and what was built."""
    import transformers as T

    category = ARCHS[model_type][0]
    cfg = config(model_type, train)
    auto = {"decoder": T.AutoModelForCausalLM, "encoder-decoder": T.AutoModelForSeq2SeqLM}.get(category, T.AutoModel)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = auto.from_config(cfg, attn_implementation=attn)
        zero = [k for k, p in model.named_parameters() if p.is_floating_point() and not bool(p.detach().any())]
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for k, p in model.named_parameters():
                if k in zero:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    info = dict(cls=type(model).__name__, attn_used=getattr(model.config, "_attn_implementation", None),
                zero_params_redrawn=len(zero), params=sum(p.numel() for p in model.parameters()))
    if model_type == "whisper":
        model = model.get_encoder()
        info["cls"] = type(model).__name__
        f, shape = Call(model, ("input_features",)), (B, cfg.num_mel_bins, 2 * cfg.max_source_positions)
    elif category == "vision":
        f, shape = Call(model, ("pixel_values",)), (B, getattr(cfg, "num_channels", 3), 32, 32)
    elif category == "audio":
        f, shape = Call(model, ("input_values",)), (B, AUDIO)
    else:
        names = ("inputs_embeds", "decoder_inputs_embeds") if category == "encoder-decoder" else ("inputs_embeds",)
        kw = dict(use_cache=False) if category in ("decoder", "encoder-decoder") else {}
        f, shape = Call(model, names, **kw), (B, L, model.get_input_embeddings().embedding_dim)
    f = f.to(dtype).train(train)
    return f, shape, info


def inputs(shape, dtype=torch.float32, seed=1):
    """``(x, v)``: seed-fixed N(0, 1) (drawn in float32, then cast: the float64 redo sees the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    x, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return x.to(dtype), v.to(dtype)


def _seeded(fn, no_grad=False):
    """``fn`` under the same seed each call (train mode: the same dropout masks), the caller's RNG untouched."""
    def run():
        with torch.random.fork_rng():
            torch.manual_seed(2)
            if no_grad:
                with torch.no_grad():
                    return fn()
            return fn()
    return run


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]


def _math(fn):
    def run():
        with sdpa_kernel(SDPBackend.MATH):  # the CPU flash kernel's backward has no derivative
            return fn()
    return run


def run_one(model_type: str, attn: str, mode: str = "eval") -> dict:
    """One case (see the module docstring); a failure is a row with ``error``."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    train = mode == "train"
    row = dict(type=model_type, category=ARCHS[model_type][0], attn=attn, mode=mode, ok=False)
    try:
        try:
            f, shape, info = build(model_type, attn, train)
        except ValueError as e:
            if not (train and NO_SDPA in str(e)):
                raise
            attn = row["attn"] = "eager"  # a train row of a decoder without sdpa: eager attention
            f, shape, info = build(model_type, attn, train)
        row.update(info, shape=list(shape))
        x, v = inputs(shape)
        with torch.no_grad():
            y = _seeded(lambda: f(x))()
            if train:  # does dropout act? (another seed, other masks)
                with torch.random.fork_rng():
                    torch.manual_seed(5)
                    row["dropout_acts"] = not torch.equal(y, f(x))
    except Exception as e:  # noqa: BLE001 - the tiny config does not build or run
        row["stage"] = "no-sdpa" if NO_SDPA in str(e) else "build"
        row["error"] = _first_line(e)
        return row
    before = testing.ModelState(f)
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, jv = _seeded(lambda: jvpgraph.jvp(f, (x,), (v,)), no_grad=True)()
        row["value_traced"] = any("branches on tensor values" in str(w.message) for w in caught)
        row["trace_s"] = time.perf_counter() - t0  # first call: trace, flip, emit, one Jv
        traced = jvpgraph.api._traced_for(f, (x,), "batch")  # the trace jvpgraph.jvp cached for f
        nodes = traced.graph.nx.nodes
        row["fallback_ops"] = sorted({str(nodes[n]["target"]) for n, h in traced.flipped.how.items()
                                      if h in FALLBACKS and n in nodes})
        row["max_abs_jv"] = jv.abs().max().item()
        row["out_rel_err"] = testing.max_rel_err(out, y)  # jvpgraph's f(x) vs eager's, under the same seed
        row["jvpgraph"] = "runs"
    except Exception as e:  # noqa: BLE001
        row["jvpgraph"] = row["error"] = "jvpgraph: " + _first_line(e)
        row["stage"] = "jvpgraph"
    try:
        ref = _seeded(lambda: testing.double_backward(f, x, v))()
        row["double_backward"] = "runs"
        row["max_abs_ref"] = ref.abs().max().item()
    except Exception as e:  # noqa: BLE001
        row["double_backward"], ref = _first_line(e), None
        row.setdefault("error", "reference: " + row["double_backward"])
        row.setdefault("stage", "reference")
    try:
        fj = _seeded(lambda: testing.func_jvp(f, x, v), no_grad=True)()
        row["func_jvp"] = "runs"
        if ref is not None:
            row["func_jvp_rel_err"] = testing.max_rel_err(fj, ref)
    except Exception as e:  # noqa: BLE001
        row["func_jvp"] = _first_line(e)
        try:  # the usual workaround: the math attention kernel, which has a forward-mode formula
            _seeded(_math(lambda: testing.func_jvp(f, x, v)), no_grad=True)()
            row["func_jvp_math"] = "runs"
        except Exception as e2:  # noqa: BLE001
            row["func_jvp_math"] = _first_line(e2)
    if row["jvpgraph"] != "runs" or ref is None:
        row["state_unchanged"] = not before.changes(f)
        return row
    row["rel_err"] = testing.max_rel_err(jv, ref)
    row["reference"] = "double-backward float32"
    ok = row["rel_err"] <= TOL
    if not ok:  # float32 missed: is it rounding? The same case in float64 decides
        try:
            f64, _, _ = build(model_type, attn, train, torch.float64)
            x64, v64 = inputs(shape, torch.float64)
            jv64 = _seeded(lambda: jvpgraph.jvp(f64, (x64,), (v64,))[1], no_grad=True)()
            ref64 = _seeded(lambda: testing.double_backward(f64, x64, v64))()
            row["rel_err_float64"] = testing.max_rel_err(jv64, ref64)
            row["reference"] = "double-backward float64"
            ok = row["rel_err_float64"] <= TOL64
        except Exception as e:  # noqa: BLE001
            row["float64"] = _first_line(e)
    # a new batch through the cached trace, and the times of a Jv there
    x2, v2 = inputs(shape, seed=3)
    mine = _seeded(lambda: jvpgraph.jvp(f, (x2,), (v2,)), no_grad=True)
    try:
        jv2 = mine()[1]
        row["traces"] = len(jvpgraph.api._traced_for(f, (x,), "batch").history)  # after the second batch
        twin = copy.deepcopy(f)  # double-backward's own copy, made once (as testing.double_backward does per call)
        db = _seeded(_math(lambda: torch.autograd.functional.jvp(twin, x2, v2)[1]))
        row["rel_err_new_batch"] = testing.max_rel_err(jv2, db())
        ok = ok and (row["rel_err_new_batch"] <= TOL or "rel_err_float64" in row)
        for _ in range(5):  # the first calls time both op orders and keep one (jvpgraph.api._FasterOrder)
            mine()
        row["jvp_s"] = timeit(mine, repeat=REPEAT, warmup=0)
        row["double_backward_s"] = timeit(db, repeat=REPEAT, warmup=1)
    except Exception as e:  # noqa: BLE001
        row["new_batch"] = _first_line(e)
        ok = False
    row["state_unchanged"] = not before.changes(f)
    row["ok"] = bool(ok and row["state_unchanged"] and row["max_abs_jv"] > 0)
    if not row["ok"] and "error" not in row:
        row["stage"] = "jvpgraph"
        row["error"] = ("model changed: " + ", ".join(before.changes(f))[:200] if not row["state_unchanged"] else
                        f"wrong Jv: rel err {row['rel_err']:.1e}" + (f" (float64 {row['rel_err_float64']:.1e})"
                                                                     if "rel_err_float64" in row else ""))
        if row["out_rel_err"] > TOL:
            row["error"] += (f"; jvpgraph's output differs from eager's under the same seed (rel err "
                             f"{row['out_rel_err']:.1e}): other random draws")
    return row


def cases(types):
    for t in types:
        for attn in ATTENTION:
            yield t, attn, "eval"
        if ARCHS[t][0] == "decoder":
            yield t, "sdpa", "train"


def run_case(t, attn, mode, timeout=TIMEOUT_S) -> dict:
    """:func:`run_one` in a fresh process (a crash or a hang is a row)."""
    cmd = [sys.executable, __file__, "--one", t, attn, mode]
    t0 = time.perf_counter()
    base = dict(type=t, category=ARCHS[t][0], attn=attn, mode=mode, ok=False)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "stage": "timeout", "error": f"timeout after {timeout} s", "wall_s": timeout}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        return {**base, "stage": "crash", "error": f"process exited {p.returncode}: {tail}",
                "wall_s": time.perf_counter() - t0}
    return {**json.loads(lines[-1]), "wall_s": time.perf_counter() - t0}


def _fmt(x, spec=".1e"):
    return "-" if x is None else format(x, spec)


def write_report(rows, out: Path, final: bool) -> str:
    import transformers

    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, transformers=transformers.__version__, threads=1, batch=B, length=L,
                dtype="float32", tol=TOL, tol_float64=TOL64, complete=final)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    types = list(dict.fromkeys(r["type"] for r in rows))
    skip = ("build", "no-sdpa")
    built = [t for t in types if any(r["type"] == t and r.get("stage") not in skip for r in rows)]
    head = [f"transformers {transformers.__version__}, torch {torch.__version__}, CPU, 1 thread per process; "
            f"batch {B}, text length {L}, hidden 32, 2 layers, float32, tolerance {TOL} relative "
            f"(float64 {TOL64} where float32 misses)", ""]
    if not final:
        head = ["(partial run: the sweep was stopped before the end)", ""] + head
    head.append(f"- {len(built)}/{len(types)} architectures build from a tiny config and run")
    for attn in ATTENTION:
        rs = [r for r in rows if r["attn"] == attn and r["mode"] == "eval" and r.get("stage") not in skip]
        fj = sum(r.get("func_jvp") == "runs" for r in rs)
        fj_ok = sum(r.get("func_jvp_rel_err", float("inf")) <= TOL for r in rs)
        fj_math = sum(r.get("func_jvp") == "runs" or r.get("func_jvp_math") == "runs" for r in rs)
        head.append(f"- eval, {attn}: jvpgraph agrees with double-backward on {sum(r['ok'] for r in rs)}/{len(rs)} "
                    f"architectures; torch.func.jvp runs on {fj}/{len(rs)} (within tolerance on {fj_ok}; runs on "
                    f"{fj_math}/{len(rs)} under the math attention kernel)")
    rs = [r for r in rows if r["mode"] == "train" and r.get("stage") not in skip]
    if rs:
        head.append(f"- train (dropout {DROPOUT}; sdpa, eager where the model has no sdpa), decoders: jvpgraph agrees on {sum(r['ok'] for r in rs)}/"
                    f"{len(rs)}; torch.func.jvp runs on {sum(r.get('func_jvp') == 'runs' for r in rs)}/{len(rs)}")
    ratios = sorted(r["jvp_s"] / r["double_backward_s"] for r in rows if "jvp_s" in r and not r.get("value_traced"))
    if ratios:
        head.append(f"- Jv on a new batch (the cached trace): median {ratios[len(ratios) // 2]:.2f}x double-backward's "
                    f"time (range {ratios[0]:.2f}x-{ratios[-1]:.2f}x, {len(ratios)} cases traced once; the models "
                    "traced at their values are traced again for each new batch, see 'traces')")
    no_sdpa = [r["type"] for r in rows if r.get("stage") == "no-sdpa"]
    if no_sdpa:
        head.append(f"- no sdpa attention in transformers (eager only): {', '.join(no_sdpa)}")
    nobuild = [r for r in rows if r.get("stage") == "build"]
    if nobuild:
        head.append("- not built or not run (the tiny config or the attention kind):")
        head += [f"  - {r['type']} {r['attn']} {r['mode']}: {r['error'][:200]}" for r in nobuild]
    fails = [r for r in rows if not r["ok"] and r.get("stage") not in skip]
    if fails:
        head.append("- failures:")
        head += [f"  - {r['type']} {r['attn']} {r['mode']} ({r.get('stage', '?')}): {r.get('error', '')[:200]}"
                 for r in fails]
    zero = sorted({(r["type"], r["zero_params_redrawn"]) for r in rows if r.get("zero_params_redrawn")})
    head += ["", "Inputs: `inputs_embeds` (2, 6, E) (E: the embedding width, 16 for ALBERT/ELECTRA, else 32; an "
             "encoder-decoder gets the same tensor as `decoder_inputs_embeds`), `pixel_values` (2, 3, 32, 32), "
             "`input_values` (2, 1600), Whisper's encoder `input_features` (2, 8, 32); the tangent on that input. "
             "Output: `logits` (decoders: *ForCausalLM; encoder-decoders: *ForConditionalGeneration/*MTModel), "
             "else `last_hidden_state`. No attention mask, no cache.",
             "- reference: double-backward (`jvpgraph.testing.double_backward`, math SDPA kernel) in float32; "
             "for a miss, both again in float64 (the column says which decided). Several models compute parts in "
             "float32 whatever their dtype (LLaMA-family RMSNorm, rotary embeddings), so float64 cannot "
             "adjudicate those fully",
             "- all-zero parameters redrawn from N(0, 0.02^2) before anything runs (so that no Jv is vacuously "
             "0): " + (", ".join(f"{t} {n}" for t, n in zero) or "none"),
             "- train rows: model.train(), every dropout probability of the config at 0.1, torch.manual_seed(2) "
             "before each evaluation (jvpgraph's, the reference's, torch.func.jvp's: the same masks)",
             "- Jv s / double-backward s: a second batch through jvpgraph.jvp (the cached trace, under no_grad; "
             "after 6 calls) and torch.autograd.functional.jvp on the math kernel, median of 3 (seconds); "
             "'new batch' is jvpgraph's error there; trace s: the first jvpgraph.jvp call (trace, flip, one Jv)",
             "- fallback ops: nodes without a jvpgraph rule (decomposed, flipped vjp or forward AD)",
             "- traces: how many traces jvpgraph made for the two batches (2: the model branches on tensor values, "
             "e.g. MoE routing or a random LayerDrop draw: traced at the values, and again for each new batch; its "
             "Jv s is then a call on a batch already traced, not counting the ~seconds of the new trace): "
             + (", ".join(sorted({f"{r['type']} {r['mode']}" for r in rows if r.get("value_traced")})) or "none"),
             "", "Command: `HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/zoo_transformers.py` (each case in its "
             f"own process, {TIMEOUT_S} s limit); a shared machine (2 cores, other jobs): read the ratios.", ""]
    lines = ["| type | class | category | attention | mode | jvpgraph rel err (reference) | new batch | max\\|Jv\\| "
             "| torch.func.jvp | Jv s / double-backward s | trace s | traces | fallback ops | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "rel_err" in r:
            res = f"{r['rel_err']:.1e}" + (f" (float64 {r['rel_err_float64']:.1e})" if "rel_err_float64" in r else
                                           " (float32)")
            res += "" if r["ok"] else " FAIL"
        else:
            res = {"build": "not built", "no-sdpa": "no sdpa"}.get(r.get("stage"), "FAIL")
        if r.get("func_jvp") == "runs":
            fj = f"runs, {_fmt(r.get('func_jvp_rel_err'))}"
        else:
            fj = "fails" if "func_jvp" in r else "-"
            if "func_jvp_math" in r:
                fj += "; math kernel: " + ("runs" if r["func_jvp_math"] == "runs" else "fails")
        t = f"{r['jvp_s']:.4f} / {r['double_backward_s']:.4f}" if "jvp_s" in r else "-"
        err = "" if r.get("stage") == "no-sdpa" else (r.get("error") or "").replace("|", "\\|")[:140]
        if r["mode"] == "train" and r.get("dropout_acts") is False:
            err += ("; " if err else "") + "dropout does not act"
        if r.get("func_jvp", "runs") != "runs":
            err += ("; " if err else "") + "func.jvp: " + r["func_jvp"].replace("|", "\\|")[:90]
        lines.append(f"| {r['type']} | {r.get('cls', '-')} | {r['category']} | {r['attn']} | {r['mode']} | {res} | "
                     f"{_fmt(r.get('rel_err_new_batch'))} | {_fmt(r.get('max_abs_jv'), '.2g')} | {fj} | {t} | "
                     f"{_fmt(r.get('trace_s'), '.2f')} | {r.get('traces', '-')} | {', '.join(r.get('fallback_ops', [])) or '-'} | {err} |")
    out.with_suffix(".md").write_text("\n".join(head + lines) + "\n")
    return "\n".join(head)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("types", nargs="*", default=list(ARCHS))
    p.add_argument("--one", nargs=3, metavar=("TYPE", "ATTN", "MODE"), help="run one case here, print its row")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "zoo_transformers")
    p.add_argument("--timeout", type=int, default=TIMEOUT_S)
    p.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    p.add_argument("--update", action="store_true", help="run the given types again and replace their rows in "
                   "the .json (the others kept)")
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(*a.one)), flush=True)
        return 0
    if a.report_only:
        data = json.loads(a.out.with_suffix(".json").read_text())
        print(write_report(data["rows"], a.out, data["meta"]["complete"]))
        return 0
    unknown = [t for t in a.types if t not in ARCHS]
    if unknown:
        p.error(f"unknown types {unknown}; known: {', '.join(ARCHS)}")
    rows, t00 = [], time.perf_counter()
    kept = []
    if a.update:
        kept = [r for r in json.loads(a.out.with_suffix(".json").read_text())["rows"] if r["type"] not in a.types]
    order = list(ARCHS)

    def report(final):
        return write_report(sorted(kept + rows, key=lambda r: order.index(r["type"])), a.out, final)

    for t, attn, mode in cases(a.types):
        rows.append(run_case(t, attn, mode, a.timeout))
        r = rows[-1]
        err = f"rel err {r['rel_err']:.1e}" if "rel_err" in r else r.get("error", "")
        print(f"{'ok  ' if r['ok'] else 'skip' if r.get('stage') == 'no-sdpa' else 'FAIL'} {t:18s} {attn:5s} {mode:5s} {err[:90]:90s} "
              f"func.jvp={'runs' if r.get('func_jvp') == 'runs' else 'fails'} ({r.get('wall_s', 0):.0f} s)", flush=True)
        report(final=False)
    print(report(final=True))
    print(f"total {time.perf_counter() - t00:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
