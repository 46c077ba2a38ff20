"""Models from the ecosystem by name: ``timm:NAME``, ``hf:MODEL_TYPE`` and ``diffusers:NAME``, built with random
weights from a config (nothing is downloaded), as a module of tensors that ``jvpgraph verify|draw|bench`` and
:func:`jvpgraph.jvp` take as they are.

* ``timm:NAME`` — ``timm.create_model(NAME, pretrained=False, num_classes=10)``, input ``(B, 3, S, S)``: the
  smallest of 64, 96, 128, 160, 224 the model runs on (passing ``img_size=S`` to the models that take it), else its
  ``pretrained_cfg`` input size. ``--size`` picks ``S``.
* ``hf:MODEL_TYPE`` — ``transformers.AutoModel.from_config(AutoConfig.for_model(MODEL_TYPE, <small sizes>))``
  (hidden 32, 2 layers, 4 heads, vocabulary 100), called the way its library calls it, with the tangent on the
  input that carries real numbers: ``inputs_embeds`` ``(B, 6, 32)`` for text models (an encoder-decoder gets the
  same embeddings as ``decoder_inputs_embeds``), ``pixel_values`` ``(B, 3, 32, 32)`` for vision models,
  ``input_values`` ``(B, 1600)`` for speech models; the output is the first tensor of its ``ModelOutput``
  (``last_hidden_state``). A tangent at ``input_ids`` enters at the embedding output: this is that Jv.
* ``diffusers:NAME`` — ``UNet2DModel``, ``UNet2DConditionModel``, ``DiTTransformer2DModel``, ``AutoencoderKL``,
  from tiny configs. A denoiser takes two inputs, the latent ``(B, C, S, S)`` and a float
  timestep ``(B,)`` (Jv with respect to both); the text embeddings (``encoder_hidden_states``) and DiT's class
  labels are fixed buffers. ``inputs="latent"`` fixes the timestep too (one input, for ``jvpgraph bench``).

The libraries are imported only when such a name is built; without them the error says
``pip install 'jvpgraph[zoo]'``.

Example (skipped where timm is not installed):
    >>> import torch, jvpgraph
    >>> b = build("timm:resnet10t") if has("timm") else None
    >>> b.shapes if b else [(2, 3, 64, 64)]
    [(2, 3, 64, 64)]
    >>> if b:
    ...     x = torch.randn(b.shapes[0]); v = torch.randn_like(x)
    ...     m = b.model.eval()
    ...     _, jv = jvpgraph.jvp(m, (x,), (v,))
    ...     ref = torch.autograd.functional.jvp(m, x, v)[1]
    ...     torch.testing.assert_close(jv, ref, rtol=1e-4, atol=1e-4)
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn as nn

__all__ = ["PREFIXES", "ZOO_HINT", "Built", "is_ecosystem", "has", "build", "input_shapes", "timm_families",
           "DIFFUSERS", "HF_SMALL"]

PREFIXES = ("timm:", "hf:", "diffusers:")
ZOO_HINT = "pip install 'jvpgraph[zoo]'"
#: image sizes tried for a timm model, smallest first (its pretrained_cfg size comes last)
TIMM_SIZES = (64, 96, 128, 160, 224)


@dataclass
class Built:
    """A model resolved from a name: ``model`` takes tensors of ``shapes`` (batch first) and returns a tensor."""

    model: nn.Module
    shapes: list[tuple[int, ...]]
    what: str
    dtypes: list[torch.dtype] = field(default_factory=list)


def is_ecosystem(spec: str) -> bool:
    """Whether ``spec`` names a model of timm, Hugging Face transformers or diffusers.

    Example:
        >>> is_ecosystem("timm:resnet18"), is_ecosystem("hf:bert"), is_ecosystem("torch.nn:Identity")
        (True, True, False)
    """
    return isinstance(spec, str) and spec.startswith(PREFIXES)


def has(library: str) -> bool:
    """Whether ``library`` imports (timm, transformers, diffusers).

    Example:
        >>> has("torch"), has("no_such_library_here")
        (True, False)
    """
    try:
        importlib.import_module(library)
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True


def _require(library: str, spec: str):
    try:
        return importlib.import_module(library)
    except ImportError as e:
        raise ValueError(f"{spec!r} needs {library}, which does not import here ({e}); install the zoo extra: "
                         f"{ZOO_HINT} (or pip install {library})") from None


def build(spec: str, batch: int = 2, size: int | None = None, shapes=None, inputs: str = "all") -> Built:
    """The model ``spec`` names, with random weights, and the input shapes it takes (see the module docstring).

    ``shapes``: the input shapes wanted (their first entry's last dimension sets the image size and batch);
    ``inputs="latent"``: a diffusers denoiser as a module of the latent alone (the timestep fixed at 500).
    A ValueError says what is wrong (unknown name, library absent, a shape the model does not take).

    Example:
        >>> try:  # (the same whether or not the libraries are installed: CI has none of them)
        ...     build("keras:resnet")
        ... except ValueError as e:
        ...     print(e)
        'keras:resnet': expected one of timm:NAME, hf:NAME, diffusers:NAME
        >>> if has("timm"):
        ...     try:
        ...         build("timm:no_such_model")
        ...     except ValueError as e:
        ...         print(str(e).split(":")[0])
        ... else:
        ...     print("unknown timm model 'no_such_model'")
        unknown timm model 'no_such_model'
    """
    if shapes:
        batch = shapes[0][0]
        if len(shapes[0]) >= 3:
            size = shapes[0][-1]
    lib, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"{spec!r}: give a name after the colon, e.g. timm:resnet18, hf:bert, diffusers:UNet2DModel")
    if lib == "timm":
        return _timm(name, spec, batch, size)
    if lib == "hf":
        return _hf(name, spec, batch, shapes)
    if lib == "diffusers":
        return _diffusers(name, spec, batch, size, inputs)
    raise ValueError(f"{spec!r}: expected one of {', '.join(p + 'NAME' for p in PREFIXES)}")


def input_shapes(spec: str, batch: int = 2, size: int | None = None) -> list[tuple[int, ...]]:
    """The input shapes :func:`build` gives ``spec``.

    Example:
        >>> input_shapes("diffusers:UNet2DModel") if has("diffusers") else [(2, 3, 16, 16), (2,)]
        [(2, 3, 16, 16), (2,)]
    """
    return build(spec, batch, size).shapes


# ------------------------------------------------------------------ timm
def timm_families() -> dict[str, list[str]]:
    """timm's architectures grouped by family: the module that registers them (``resnet``, ``vision_transformer``).

    Example:
        >>> fam = timm_families() if has("timm") else {"resnet": ["resnet18"]}
        >>> "resnet18" in fam["resnet"]
        True
    """
    timm = _require("timm", "timm:")
    from timm.models import _registry

    out: dict[str, list[str]] = {}
    for n in timm.list_models():
        out.setdefault(_registry._model_to_module[n], []).append(n)
    return out


def _timm_create(timm, name, size, device=None):
    kw = dict(pretrained=False, num_classes=10)
    ctx = torch.device(device) if device else contextlib.nullcontext()
    with ctx:
        if size is not None:
            try:
                return timm.create_model(name, img_size=size, **kw), True
            except TypeError:
                pass
        return timm.create_model(name, **kw), False


def _runs(model, shape, device) -> bool:
    try:
        with torch.no_grad():
            model.eval()(torch.empty(shape, device=device) if device == "meta" else torch.randn(shape))
        return True
    except Exception:  # noqa: BLE001 - the size does not fit this model
        return False


_TIMM_SIZE: dict[str, int] = {}


def _timm(name, spec, batch, size) -> Built:
    timm = _require("timm", spec)
    if name not in timm.list_models():
        close = timm.list_models(f"*{name[:5]}*")[:6]
        raise ValueError(f"unknown timm model {name!r}: timm.list_models() has no such name"
                         + (f" (similar: {', '.join(close)})" if close else ""))
    cfg_size = tuple(timm.get_pretrained_cfg(name).input_size) if timm.get_pretrained_cfg(name) else (3, 224, 224)
    if size is None and name not in _TIMM_SIZE:  # the smallest size the model runs on (on the meta device: cheap)
        for s in sorted({*TIMM_SIZES, cfg_size[-1]}):
            for device in ("meta", None):
                try:
                    m, _ = _timm_create(timm, name, s, device)
                except Exception:  # noqa: BLE001 - this size is refused at construction
                    break
                if _runs(m, (1, cfg_size[0], s, s), device or "cpu"):
                    _TIMM_SIZE[name] = s
                    break
            if name in _TIMM_SIZE:
                break
        else:
            _TIMM_SIZE[name] = cfg_size[-1]
    s = size or _TIMM_SIZE.get(name, cfg_size[-1])
    model, _ = _timm_create(timm, name, s)
    return Built(model, [(batch, cfg_size[0], s, s)], f"timm {name} at {s}x{s}", [torch.float32])


# ------------------------------------------------------------------ Hugging Face transformers
#: the small sizes a ``hf:`` config is built with (each under the names the config classes use)
HF_SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, max_position_embeddings=64, head_dim=8,
                d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=64, decoder_ffn_dim=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_ff=64,
                d_kv=8, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64,
                image_size=32, patch_size=8, num_channels=3,
                conv_dim=(32, 32), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=4)
HF_LENGTH = 6  # tokens of a text input
HF_AUDIO = 1600  # samples of a speech input


class HFCall(nn.Module):
    """``model(**{name: x, ...})`` as a module of one tensor, returning the first tensor of the output."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, x):
        out = self.model(**{n: x for n in self.names}, return_dict=True)
        return out.logits if "logits" in out else out[0]


def _hf(model_type, spec, batch, shapes) -> Built:
    T = _require("transformers", spec)
    try:
        cfg_cls = T.CONFIG_MAPPING[model_type]
    except KeyError:
        raise ValueError(f"unknown Hugging Face model type {model_type!r} (a transformers model_type: bert, gpt2, "
                         "t5, vit, wav2vec2, ...)") from None
    params = inspect.signature(cfg_cls.__init__).parameters
    keys = set(params) | set(getattr(cfg_cls, "attribute_map", {}))
    small = {k: v for k, v in HF_SMALL.items() if k in keys}
    cfg = T.AutoConfig.for_model(model_type, **small)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        try:
            model = T.AutoModel.from_config(cfg)
        except Exception as e:  # noqa: BLE001 - say which model type and why
            raise ValueError(f"hf:{model_type}: AutoModel.from_config(AutoConfig.for_model({model_type!r}, small "
                             f"sizes)) raised {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    fwd = inspect.signature(model.forward).parameters
    hidden = getattr(cfg, "hidden_size", 32)
    if "inputs_embeds" in fwd:
        names = ("inputs_embeds", "decoder_inputs_embeds") if "decoder_inputs_embeds" in fwd else ("inputs_embeds",)
        shape = (batch, HF_LENGTH, hidden)
    elif "pixel_values" in fwd:
        names, shape = ("pixel_values",), (batch, getattr(cfg, "num_channels", 3), 32, 32)
    elif "input_values" in fwd:
        names, shape = ("input_values",), (batch, HF_AUDIO)
    else:
        raise ValueError(f"hf:{model_type}: {type(model).__name__}.forward takes none of inputs_embeds, "
                         "pixel_values, input_values (the inputs jvpgraph's hf: names put a tangent on); build it "
                         "yourself and pass package.module:factory")
    if shapes:
        shape = tuple(shapes[0])
    return Built(HFCall(model, names), [shape], f"transformers {type(model).__name__} ({', '.join(names)})",
                 [torch.float32])


# ------------------------------------------------------------------ diffusers
def _tiny_diffusers(D, name):
    if name == "UNet2DModel":
        return D.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                             block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                             up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                             attention_head_dim=8), 3, 16
    if name == "UNet2DConditionModel":
        return D.UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                      block_out_channels=(16, 32),
                                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                      attention_head_dim=8, norm_num_groups=8), 4, 16
    if name == "DiTTransformer2DModel":
        return D.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                       sample_size=8, patch_size=2, num_embeds_ada_norm=10), 4, 8
    if name == "AutoencoderKL":
        return D.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                               up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                               latent_channels=4, norm_num_groups=8, sample_size=16), 3, 16
    return None


#: the diffusers models ``diffusers:NAME`` builds
DIFFUSERS = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "AutoencoderKL")
TEXT_LENGTH = 7  # encoder_hidden_states: (B, 7, cross_attention_dim)


class Denoiser(nn.Module):
    """``model(latent, timestep, **fixed).sample`` as a module of the latent and the (float) timestep; the fixed
    inputs (text embeddings, class labels) are buffers. ``timestep`` given at construction: a module of the latent
    alone."""

    def __init__(self, model: nn.Module, fixed: dict[str, torch.Tensor], timestep: torch.Tensor | None = None):
        super().__init__()
        self.model, self.fixed_names = model, tuple(fixed)
        for k, t in fixed.items():
            self.register_buffer(k, t, persistent=False)
        self.register_buffer("timestep", timestep, persistent=False)

    def forward(self, sample, timestep=None):
        t = self.timestep if timestep is None else timestep
        kw = {k: getattr(self, k) for k in self.fixed_names}
        return self.model(sample, t, **kw, return_dict=False)[0]


class Autoencoder(nn.Module):
    """``model(sample).sample`` (the posterior's mode: deterministic)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample):
        return self.model(sample, return_dict=False)[0]


def _diffusers(name, spec, batch, size, inputs) -> Built:
    D = _require("diffusers", spec)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        made = _tiny_diffusers(D, name)
    if made is None:
        raise ValueError(f"diffusers:{name}: not one of the tiny configs jvpgraph has ({', '.join(DIFFUSERS)}); "
                         "build your own and pass package.module:factory")
    model, channels, s = made
    s = size or s
    latent = (batch, channels, s, s)
    if name == "AutoencoderKL":
        return Built(Autoencoder(model), [latent], f"diffusers {name}", [torch.float32])
    fixed = {}
    g = torch.Generator().manual_seed(3)
    if name == "UNet2DConditionModel":
        fixed["encoder_hidden_states"] = torch.randn(batch, TEXT_LENGTH, model.config.cross_attention_dim, generator=g)
    if name == "DiTTransformer2DModel":
        fixed["class_labels"] = torch.arange(batch) % model.config.num_embeds_ada_norm
    if inputs == "latent":
        return Built(Denoiser(model, fixed, torch.full((batch,), 500.0)), [latent], f"diffusers {name} (latent)",
                     [torch.float32])
    return Built(Denoiser(model, fixed), [latent, (batch,)], f"diffusers {name} (latent, timestep)",
                 [torch.float32, torch.float32])
