"""PTQ methods, found by name in one plain dict filled by decorators or by other packages.

A layer method is a function `fn(W, stats, spec, options) -> QuantResult`:
  W        the layer weight, (out_features, in_features), any float dtype;
  stats    `LayerStats` with the Hessian H = 2/n X^T X (in, in) and, when the method asks for
           them, the calibration inputs X (n, in); None for methods that need no data (RTN);
  spec     a `QuantSpec`;
  options  an instance of the method's options dataclass.
It returns the quantized weight on the spec's grid. Built-in methods (rtn, gptq) register exactly
like a user's:

    @register_method("mine", options=MyOptions, needs_hessian=True)
    def my_method(W, stats, spec, options): ...

A block method sees a whole decoder block at once (`register_block_method`): it receives the
block, a `BlockData` (its selected linear layers, their calibration inputs, the FP block's outputs
on them, each layer's Hessian) and returns {layer name: QuantResult}. The block-by-block driver
runs both kinds on the same budget with the same propagation options and the same per-layer
report, and checks every result before it touches the model (`ptq.validate`).

Other packages add methods through the entry-point group `qalign.methods`: each entry point names
a module whose import registers its methods with the decorators above. They load on the first
lookup (`get_method`, `available_methods`); one that fails to import is recorded in
`PLUGIN_ERRORS` with its error and does not stop the others.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .errors import OptionsError, QalignError
from .formats import QuantizedTensor, QuantSpec

__all__ = ["LayerStats", "BlockData", "QuantResult", "Method", "METHODS", "PLUGIN_ERRORS",
           "ENTRY_POINT_GROUP", "UnknownMethodError", "register_method", "register_block_method",
           "get_method", "available_methods", "load_plugins", "load_plugin"]

ENTRY_POINT_GROUP = "qalign.methods"
KINDS = ("layer", "block")


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer. H: (in, in) float32 or float64; X: (n, in)."""

    H: torch.Tensor | None = None
    X: torch.Tensor | None = None
    n_tokens: int = 0


@dataclass
class BlockData:
    """What a block method receives besides the block. `layers` are its selected linear layers
    under their full model names (`relative(name)` gives the name inside the block); batch i is
    `inputs[i]` (batch, seq, hidden) with keyword arguments `kwargs[i]` (attention masks, rotary
    embeddings), and `targets[i]` is the FP block's output on it. `stats[name].H` is the layer's
    Hessian 2/n X^T X on the same inputs. Tensors are on the compute device, in the model's
    dtype."""

    index: int
    prefix: str  # the block's own name, e.g. "model.layers.3"
    layers: dict[str, nn.Module]
    inputs: Sequence[torch.Tensor]
    kwargs: list[dict]
    targets: Sequence[torch.Tensor]
    stats: dict[str, LayerStats]

    def relative(self, name: str) -> str:
        """The layer's name inside the block ("self_attn.q_proj")."""
        return name[len(self.prefix) + 1:]


@dataclass
class QuantResult:
    """What a method returns. `weight` is dequantized (W's shape and dtype); `quantized` holds
    codes and scales when the method has them; `loss` is the method's own proxy loss."""

    weight: torch.Tensor
    quantized: QuantizedTensor | None = None
    loss: float | None = None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[torch.Tensor, LayerStats | None, QuantSpec, object], QuantResult]
    options: type
    needs_hessian: bool = False
    needs_inputs: bool = False
    search_space: dict = field(default_factory=dict)  # {option field: values to tune over}
    kind: str = "layer"  # "layer": fn(W, stats, spec, options); "block": fn(block, data, ...)
    source: str = "qalign"  # the distribution (or module) that registered it

    @property
    def needs_data(self) -> bool:
        """Whether the method calibrates (and so runs block by block on calibration data)."""
        return self.kind == "block" or self.needs_hessian or self.needs_inputs

    def make_options(self, **kwargs):
        """Options from keyword arguments; unknown keys are an error naming the known ones."""
        known = set(getattr(self.options, "__dataclass_fields__", {}))
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise OptionsError(
                f"unknown option(s) {unknown} for method {self.name!r}; known: {sorted(known)}"
            )
        return self.options(**kwargs)

    def resolve_options(self, options=None):
        """The method's options from None (its defaults), a dict of fields, or an instance."""
        if options is None:
            return self.options()
        if isinstance(options, dict):
            return self.make_options(**options)
        if not isinstance(options, self.options):
            raise OptionsError(f"method {self.name!r} takes {self.options.__name__}, not "
                               f"{type(options).__name__}")
        return options


METHODS: dict[str, Method] = {}
PLUGIN_ERRORS: dict[str, str] = {}  # {entry point name: why it failed to load}
_loading: list[str] = []  # the distribution whose entry point is being imported
_plugins_loaded = False


class UnknownMethodError(QalignError, KeyError):
    """A method name that nothing registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def register_method(name: str, *, options: type, needs_hessian: bool = False,
                    needs_inputs: bool = False, search_space: dict | None = None):
    """Decorator that registers `fn` under `name`; registering a taken name is an error.
    `search_space` {option field: (values, ...)} is what matched tuning may try (recipes draw
    the same number of trials for every method from these spaces)."""

    return _registrar(name, options, search_space, needs_hessian=needs_hessian,
                      needs_inputs=needs_inputs, kind="layer")


def register_block_method(name: str, *, options: type, search_space: dict | None = None):
    """Decorator that registers a block method `fn(block, data: BlockData, spec, options) ->
    {layer name: QuantResult}` under `name`. It may change the weights of `data.layers` while it
    works (the driver writes the returned weights afterwards), nothing else of the block."""
    return _registrar(name, options, search_space, kind="block")


def _registrar(name, options, search_space, **how):
    def wrap(fn):
        if name in METHODS:
            raise QalignError(f"a PTQ method named {name!r} is already registered")
        if not hasattr(options, "__dataclass_fields__"):
            raise OptionsError(f"options of {name!r} must be a dataclass (with no fields if the "
                               f"method has no options), not {options!r}")
        space = {k: tuple(v) for k, v in (search_space or {}).items()}
        unknown = sorted(set(space) - set(options.__dataclass_fields__))
        if unknown or any(not v for v in space.values()):
            raise OptionsError(f"search space of {name!r}: {unknown or 'an empty value list'}; "
                               f"give non-empty value tuples for fields of {options.__name__}")
        source = _loading[-1] if _loading else _module_source(getattr(fn, "__module__", None))
        METHODS[name] = Method(name, fn, options, search_space=space, source=source, **how)
        return fn

    return wrap


def _module_source(module: str | None) -> str:
    """"qalign" for the toolkit's own packages, else the module that registered the method."""
    top = (module or "?").split(".")[0]
    return "qalign" if top in ("ptq", "qaft", "compare", "recipes") else module or "?"


def load_plugins() -> dict[str, str]:
    """Import every `qalign.methods` entry point once; returns PLUGIN_ERRORS. A plug-in that
    fails (import error, a name clash, anything) is recorded there and warned about by name."""
    global _plugins_loaded
    if _plugins_loaded:
        return PLUGIN_ERRORS
    _plugins_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else ep.value
        _loading.append(dist)
        try:
            ep.load()
        except Exception as e:  # a broken plug-in must not stop the others or the toolkit
            PLUGIN_ERRORS[ep.name] = f"{dist} ({ep.value}): {type(e).__name__}: {e}"
            warnings.warn(f"qalign: the method plug-in {ep.name!r} failed to load: "
                          f"{PLUGIN_ERRORS[ep.name]}", stacklevel=2)
        finally:
            _loading.pop()
    return PLUGIN_ERRORS


def load_plugin(target: str) -> None:
    """Import a module by name ("my_package.methods") or a Python file by path ("mine.py"),
    which registers its methods: `qalign --plugin TARGET` for methods not installed as a
    package. An import that fails is an error naming the target."""
    import importlib
    import importlib.util
    from pathlib import Path

    path = Path(target)
    _loading.append(str(target))
    try:
        if path.suffix == ".py":
            if not path.is_file():
                raise QalignError(f"--plugin {target}: no such file; give a .py file that "
                                  "registers methods, or an importable module name")
            spec = importlib.util.spec_from_file_location(f"qalign_plugin_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            importlib.import_module(target)
    except QalignError:
        raise
    except Exception as e:
        raise QalignError(f"plug-in {target} failed to import: {type(e).__name__}: {e}") from e
    finally:
        _loading.pop()


def available_methods() -> dict[str, Method]:
    """Every registered method, plug-ins included (loaded on the first call)."""
    load_plugins()
    return METHODS


def get_method(name: str) -> Method:
    try:
        return available_methods()[name]
    except KeyError:
        why = (f" (its plug-in failed to load: {PLUGIN_ERRORS[name]})" if name in PLUGIN_ERRORS
               else "")
        raise UnknownMethodError(
            f"unknown PTQ method {name!r}{why}; registered: {sorted(METHODS)}. "
            "Register your own with @ptq.register_method(name, options=YourOptions)."
        ) from None
